"""The command line: each command parses, calls one function, prints.

Errors a user can cause are one line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import click

from .errors import UserError
from .video_cli import video_options

CONFIG = click.option("--config", "config_file", type=click.Path(dir_okay=False), help="Experiment TOML file.")
SET = click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="SECTION.KEY=VALUE",
    help="Override one config value (repeatable), e.g. --set train.epochs=1.",
)
OUT = click.option(
    "--out", "run", type=click.Path(file_okay=False), default="artifacts/run", show_default=True, help="Run folder."
)


class ProcessesType(click.ParamType):
    """--processes: a number of worker processes (0: threads) or ``auto``."""

    name = "n|auto"

    def convert(self, value, param, ctx):
        from .api import check_processes  # the API's own check: the two cannot drift

        try:
            return check_processes(value)
        except UserError:
            self.fail(f"{value!r} is not a number of processes (0 or more) nor 'auto'", param, ctx)


RESUME = click.option("--resume", is_flag=True, help="Continue from the last complete epoch's checkpoint.")


def _log(msg: str) -> None:
    click.echo(msg)


def _show_warning(message, category, filename, lineno, file=None, line=None):
    click.echo(f"warning: {message}", err=True)


def _experiment(config_file, overrides, run):
    from .config import load_config
    from .experiment import open_experiment

    return open_experiment(load_config(config_file, overrides), Path(run), _log)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="ensemble")
def cli():
    """Hierarchical facial-emotion recognition: stage 1 places a face in valence/arousal space,
    a router picks the expert of its neighborhood, the expert names the emotion. Compare it
    with a flat 8-class classifier on AffectNet, FER+, a folder or a CSV of your own faces."""


@cli.command("demo", short_help="The whole pipeline on built-in synthetic faces (CPU, minutes).")
@click.option("--quick", is_flag=True, help="Smaller and shorter (about a minute): a smoke check.")
@click.option("--out", type=click.Path(file_okay=False), default="artifacts/demo", show_default=True)
@SET
def demo_cmd(quick, out, overrides):
    """Synthetic faces, fit-flat, fit-stage1, fit-experts, compare and a predict, with progress."""
    from .demo import run_demo

    run_demo(Path(out), quick, overrides, _log)


@cli.group("data", short_help="Inspect data sets.")
def data_grp():
    """Inspect data sets."""


@data_grp.command("summary", short_help="Counts per split and class, V/A per class, dropped rows.")
@CONFIG
@SET
@click.option("--format", "fmt", help="Data format (affectnet, affectnet-folder, ferplus, folder, csv, synthetic).")
@click.option("--root", type=click.Path(), help="Data-set root (csv: the manifest file).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--no-verify", is_flag=True, help="Skip opening every image.")
@click.option("--strict", is_flag=True, help="A bad row is an error instead of a counted skip.")
def summary_cmd(config_file, overrides, fmt, root, as_json, no_verify, strict):
    """Per-split, per-class counts, valence/arousal mean and std per class, and how many rows were
    dropped and why. Every image is opened; those that do not open are counted as dropped."""
    from .config import load_config
    from .summary import summarize

    extra = ([f"data.format={json.dumps(fmt)}"] if fmt else []) + ([f"data.root={json.dumps(root)}"] if root else [])
    extra += ["data.strict=true"] if strict else []
    cfg = load_config(config_file, list(overrides) + extra)
    result = summarize(cfg, verify=not no_verify)
    from .summary import render_summary

    click.echo(json.dumps(result, indent=2) if as_json else render_summary(result))


@cli.command("prepare", short_help="Decode, crop and resize every image once into shards.")
@CONFIG
@SET
@click.option(
    "--workers", type=click.IntRange(0, 256), default=None, help="Decoder processes, 0-256 (default: data.num_workers)."
)
def prepare_cmd(config_file, overrides, workers):
    """Write the uint8 shard that training and evaluation read (it is also built on first use)."""
    from .config import load_config
    from .data import load_dataset
    from .prepare import prepare_images

    cfg = load_config(config_file, overrides)
    ds = load_dataset(cfg.data, seed=cfg.train.seed)
    folder, info = prepare_images(
        ds.manifest, cfg.data.image_size, cfg.data.cache_dir, cfg.data.num_workers if workers is None else workers
    )
    click.echo(f"prepared {info['n']} faces at {info['size']} px in {folder} ({info['n_bad']} unreadable)")


@cli.command("fit-stage1", short_help="Train the valence/arousal regressor (stage 1).")
@CONFIG
@SET
@OUT
@RESUME
def fit_stage1_cmd(config_file, overrides, run, resume):
    """Train the stage-1 regressor to (valence, arousal); writes RUN/stage1."""
    from stages.stage1 import fit_stage1

    from .calibration import calibrate

    had_flat = (Path(run) / "flat" / "meta.json").is_file()
    exp = _experiment(config_file, overrides, run)
    metrics = fit_stage1(exp, resume, _log)
    if not had_flat and (exp.run / "flat" / "meta.json").is_file() and exp.rt.is_main:
        # the flat model it trained first, calibrated as fit-flat does (fit-experts does it itself)
        calibrate(exp, _log)
    _print_metrics("stage1", metrics)


@cli.command("fit-flat", short_help="Train the flat 8-class baseline.")
@CONFIG
@SET
@OUT
@RESUME
def fit_flat_cmd(config_file, overrides, run, resume):
    """Train the flat 8-class classifier; writes RUN/flat."""
    from stages.flat import fit_flat, stages_on_flat_trunk

    from .calibration import calibrate

    built_on = stages_on_flat_trunk(Path(run))  # before any data is read: nothing is replaced
    if built_on:
        raise UserError(
            f"{run}/flat is the trunk of {', '.join(built_on)}: retraining it would leave "
            f"{'them' if len(built_on) > 1 else 'it'} unusable; train into a new --out, or remove those stages first"
        )
    exp = _experiment(config_file, overrides, run)
    metrics = fit_flat(exp, resume, _log)
    if exp.rt.is_main:
        calibrate(exp, _log)
    _print_metrics("flat", metrics)


@cli.command("fit-experts", short_help="Fit neighborhoods, one expert each, and the router.")
@CONFIG
@SET
@OUT
@RESUME
def fit_experts_cmd(config_file, overrides, run, resume):
    """Cluster the training V/A labels into neighborhoods, train one expert per neighborhood,
    then fit the router on validation; writes RUN/neighborhoods, RUN/experts, RUN/router."""
    from .routing import fit_experts_and_router

    fit_experts_and_router(_experiment(config_file, overrides, run), resume, _log)


def _print_metrics(stage: str, metrics: dict) -> None:
    for split in ("val", "valid", "test"):
        m = metrics.get(split)
        if not m:
            continue
        if "balanced_accuracy" in m:
            click.echo(
                f"{stage} {split}: accuracy {m['accuracy']:.4f}, balanced accuracy {m['balanced_accuracy']:.4f}, "
                f"macro-F1 {m['macro_f1']:.4f}"
            )
        else:
            click.echo(
                f"{stage} {split}: RMSE V {m['rmse_valence']:.3f} A {m['rmse_arousal']:.3f}, "
                f"CCC V {m['ccc_valence']:.3f} A {m['ccc_arousal']:.3f}"
            )


@cli.command("tune", short_help="Search a stage's settings with Optuna: pruned, resumable, parallel.")
@CONFIG
@SET
@click.option(
    "--stage",
    type=click.Choice(["flat", "stage1", "experts"]),
    default=None,
    help="Stage each trial trains (default: [tune] stage, else flat).",
)
@click.option("--trials", type=click.IntRange(min=1), default=None, help="The study's total number of trials.")
@click.option("--minutes", type=click.FloatRange(min=0), default=None, help="Start no trial after this many minutes.")
@click.option("--study", default=None, help="Study name (default: CONFIG-STAGE).")
@click.option(
    "--storage", default=None, help="Optuna storage URL (default: sqlite:///OUT/study.db), e.g. postgresql://..."
)
@click.option(
    "--out", type=click.Path(file_okay=False), default=None, help="Tuning folder (default: artifacts/tune/STUDY)."
)
@click.option(
    "--run",
    type=click.Path(file_okay=False),
    default=None,
    help="Run folder with the trained stages a stage1 or experts trial builds on.",
)
@click.option("--keep", type=click.Choice(["best", "all", "none"]), default=None, help="Trial run folders kept.")
@click.option(
    "--repeats",
    type=click.IntRange(min=0),
    default=None,
    help="Re-train the top configurations with R new seeds; the best mean wins.",
)
@click.option("--pruner", type=click.Choice(["median", "hyperband", "none"]), default=None)
def tune_cmd(config_file, overrides, **opts):
    """Each trial trains the stage with values sampled from the config's [tune.space] table and
    is scored on the validation split (never the test split). The study lives in Optuna storage:
    rerun the command to continue it, or start more processes on it. Writes OUT/trials.csv,
    OUT/best.toml, OUT/plots/*.png and prints a summary."""
    from .tune import TuneOptions, run_tune

    run_tune(config_file, overrides, TuneOptions(**opts), _log)


@cli.command("predict", short_help="Emotion, valence and arousal of every face in images and videos.")
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@click.option(
    "--run",
    type=click.Path(file_okay=False),
    default=None,
    help="Run folder (default: the bundled model; see ensemble models).",
)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per face.")
@click.option(
    "--detector",
    type=click.Choice(["mtcnn", "blazeface", "haar", "none"]),
    default="blazeface",  # ensemble.detect.DEFAULT_DETECTOR (not imported here: --help stays light; a test compares)
    show_default=True,
    help="Face detector; none: the images are face crops.",
)
@click.option("--no-detect", is_flag=True, help="Same as --detector none.")
@click.option(
    "--min-confidence",
    type=click.FloatRange(0, 1),
    default=0.0,
    show_default=True,
    help="Below this calibrated probability a face is marked uncertain instead of labelled.",
)
@click.option(
    "--annotate",
    type=click.Path(),
    default=None,
    help="Draw the faces: images go into this folder (one JPEG each); one video into this .mp4/.avi/.mkv/"
    ".mov/.webm file, or into this folder as <video>.annotated.mp4 (several videos: a folder).",
)
@click.option(
    "--csv",
    "csv_file",
    type=click.Path(dir_okay=False),
    default=None,
    help="Write the table here: one row per face (images), or per face per analysed frame with a track id "
    "(videos; all videos in one file). With --csv, give images and videos in separate commands.",
)
@click.option("--router", type=click.Choice(["hard", "soft"]), default=None, help="Router mode (default: the run's).")
@click.option("--flat", "use_flat", is_flag=True, help="Use the run's flat model instead of the hierarchy.")
@click.option("--batch-size", type=click.IntRange(1), default=32, show_default=True, help="Faces per network batch.")
@click.option(
    "--precision",
    type=click.Choice(["auto", "fp32", "bf16", "fp16", "int8"]),
    default="auto",
    show_default=True,
    help="The networks' arithmetic. auto: int8 where the run's onnx stage has an int8 graph and the "
    "hierarchy runs on the CPU (the bundled model), else fp32. int8 (ONNX Runtime, CPU) runs the trunk in "
    "8-bit integers, the networks about twice as fast as fp32, the same label on 99% of faces; bf16 (or "
    "fp16, CUDA only) autocast is faster where the hardware has those units. The model card gives fp32's "
    "and int8's figures.",
)
@click.option(
    "--device",
    default="cpu",
    show_default=True,
    help="Where the networks run: cpu, cuda, cuda:N, mps, or auto (the first of those this machine has).",
)
@click.option(
    "--backend",
    type=click.Choice(["auto", "torch", "onnx"]),  # ensemble.onnx_runtime.BACKENDS (a test compares)
    default="auto",
    show_default=True,
    help="What runs the networks: onnx (ONNX Runtime, without torch: about half the memory) needs the run's "
    "onnx/ stage, which bundled models have (ensemble export --run RUN --format onnx-run writes one); auto: "
    "onnx where it can (the hierarchy, fp32, CPU, an up-to-date stage), else torch.",
)
@click.option(
    "--processes",
    type=ProcessesType(),
    default="auto",
    show_default=True,
    help="Detect faces in N worker processes (0: threads in this process); auto: worker processes "
    "(one per core but one, at most 8) on machines with 8 or more cores for 256 or more images to detect in, "
    "else threads.",
)
@video_options
def predict_cmd(
    paths,
    run,
    as_json,
    detector,
    no_detect,
    min_confidence,
    annotate,
    csv_file,
    router,
    use_flat,
    batch_size,
    precision,
    device,
    backend,
    processes,
    **video,
):
    """Detect every face (BlazeFace with landmarks by default), turn it upright by its eyes, crop it
    as the model's training faces were cropped, then predict emotion, probabilities, valence,
    arousal and neighborhood. Directories are walked. Unreadable files are named on stderr and
    the exit code is non-zero; the other files are still predicted.

    Videos (mp4, avi, mov, mkv, webm): one row per face per analysed frame with a track id
    (--csv, --json), one summary line per track, --annotate, --summary; see the video options."""
    from .commands import run_predict
    from .video_cli import predict_videos

    if use_flat and router:
        raise UserError("--router chooses how the hierarchy routes; the flat model (--flat) has no router")
    detector = "none" if no_detect else detector
    annotate = Path(annotate) if annotate else None
    csv_file = Path(csv_file) if csv_file else None
    paths, n_failed, model = predict_videos(
        paths,
        video,
        run=run,
        as_json=as_json,
        detector=detector,
        router=router,
        use_flat=use_flat,
        batch_size=batch_size,
        min_confidence=min_confidence,
        annotate=annotate,
        csv_file=csv_file,
        precision=precision,
        device=device,
        backend=backend,
    )
    if paths:
        n_failed += run_predict(
            paths,
            run,
            as_json,
            detector,
            router,
            use_flat,
            batch_size,
            min_confidence,
            annotate,
            csv_file,
            model=model,
            precision=precision,
            device=device,
            processes=processes,
            backend=backend,
        )
    if n_failed:
        sys.exit(1)


@cli.command("models", short_help="Bundled models and runs under artifacts/, with their model cards.")
@click.option("--artifacts", type=click.Path(file_okay=False), default="artifacts", show_default=True)
def models_cmd(artifacts):
    """Each model's card: data and licence, classes, input size, the command and commit that
    trained it, its figures (flat vs hierarchy, calibration) and what it is not for."""
    from .bundle import list_models, render_models

    if artifacts != "artifacts" and not Path(artifacts).is_dir():  # the default may well not exist yet
        raise UserError(f"--artifacts {artifacts}: no such folder")
    click.echo(render_models(list_models(Path(artifacts))))


@cli.command("bundle", short_help="Store a finished run inside the package (float16) as a bundled model.")
@click.option("--run", type=click.Path(file_okay=False), required=True)
@click.option("--name", default="ferplus", show_default=True, help="Folder name under ensemble/models/.")
@click.option("--out", type=click.Path(file_okay=False), default=None, help="Elsewhere than ensemble/models/NAME.")
@click.option("--command", "train_command", default=None, help="The exact command that trained the run (model card).")
def bundle_cmd(run, name, out, train_command):
    """Copy the run's stages with float16 weights and their sha256 checks rewritten, plus a model card."""
    from .bundle import bundle

    bundle(Path(run), name, Path(out) if out else None, train_command, _log)


@cli.command("calibrate", short_help="Fit temperature scaling on the selection split (val).")
@CONFIG
@SET
@click.option("--run", type=click.Path(file_okay=False), default="artifacts/run", show_default=True)
def calibrate_cmd(config_file, overrides, run):
    """Fit the flat model's and the hierarchy's temperatures on val; writes RUN/calibration with
    the expected calibration error before and after (val, and each test split present: valid, test)."""
    from .calibration import calibrate

    calibrate(_experiment_for_run(config_file, overrides, run), _log)


def _run_config(config_file, overrides, run_p: Path):
    """The config a trained run was made with (its config.json) unless a config or overrides are given."""
    from .config import config_from_dict, load_config

    saved = run_p / "config.json"
    if config_file or overrides or not saved.is_file():
        return load_config(config_file, overrides)
    try:
        raw = json.loads(saved.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{saved} cannot be read ({exc}); pass the run's config with --config") from None
    if not isinstance(raw, dict):
        raise UserError(f"{saved} is not a config (a JSON object of sections); pass the run's config with --config")
    return config_from_dict(raw)


def _experiment_for_run(config_file, overrides, run):
    """An experiment on a trained run's own config (config.json) unless a config is given."""
    from .experiment import open_experiment

    run_p = Path(run)
    return open_experiment(_run_config(config_file, overrides, run_p), run_p, _log, save=False)


@cli.command("compare", short_help="Flat vs hierarchical (hard, soft, oracle) on the same faces.")
@CONFIG
@SET
@click.option("--run", type=click.Path(file_okay=False), default="artifacts/run", show_default=True)
@click.option(
    "--split",
    type=click.Choice(["test", "valid", "val"]),
    default="test",
    show_default=True,
    help="test / valid: test splits (FER+: FER2013Test / FER2013Valid); val: the selection split (optimistic).",
)
@click.option("--out", type=click.Path(file_okay=False), default=None, help="Report folder (default RUN/reports).")
def compare_cmd(config_file, overrides, run, split, out):
    """Accuracy, balanced accuracy, macro-F1, per-class recall, confusion matrices, routing
    accuracy and stage-1 RMSE/CCC; writes report.md, metrics.csv and plots."""
    from .artifacts import read_meta
    from .experiment import open_experiment
    from .reports import compare

    run_p = Path(run)
    if not (run_p / "flat" / "meta.json").is_file():  # before any data is read or prepared
        raise UserError(f"{run_p} holds no trained run (no flat/meta.json): train it first, or pass --run")
    cfg = _run_config(config_file, overrides, run_p)
    trained = read_meta(run_p / "flat", "flat").get("input_size")
    if trained != cfg.data.image_size:
        raise UserError(
            f"the run's models take {trained}-px faces but the config says data.image_size = "
            f"{cfg.data.image_size}; compare with the config the run was trained with"
        )
    report_dir = Path(out) if out else run_p / "reports"  # the run itself is only read
    compare(open_experiment(cfg, run_p, _log, out=report_dir), split, report_dir, _log)


@cli.command("export", short_help="Export the whole hierarchy as one ONNX or TorchScript graph.")
@click.option(
    "--run",
    type=click.Path(file_okay=False),
    default=None,
    help="Run folder (default: the bundled model; see ensemble models).",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["onnx", "onnx-run", "torchscript"]),
    default="onnx",
    show_default=True,
    help="onnx-run: into the run itself (RUN/onnx, no --out), a graph that reads the run's own weights, so "
    "that predict runs it on ONNX Runtime without torch.",
)
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="The file to write (onnx, torchscript).")
@click.option("--router", type=click.Choice(["hard", "soft"]), default=None, help="Router mode (default: the run's).")
def export_cmd(run, fmt, out, router):
    """Trunk(s), stage 1, router, experts and the mixture as one graph with a dynamic batch:
    input HierarchicalPredictor.preprocess(images), output (n, 8) probabilities (onnx-run: also
    valence/arousal and region weights)."""
    from .bundle import resolve_run

    if fmt == "onnx-run":
        if out is not None or router is not None or run is None:
            raise UserError(
                "--format onnx-run writes RUN/onnx into the run named by --run, under its own router: "
                "no --out, no --router"
            )
    elif out is None:
        raise UserError(f"--format {fmt} needs --out FILE")
    run = resolve_run(run, lambda m: click.echo(m, err=True), "export")
    if fmt == "onnx-run":
        from .export import write_onnx_stage

        write_onnx_stage(Path(run), _log)
        return
    from .export import export

    path = export(Path(run), fmt, Path(out), router)
    click.echo(f"wrote {path}")


def main(argv=None) -> None:
    """The ``ensemble`` command: a user error is one ``error:`` line and exit 2, never a traceback."""
    warnings.showwarning = _show_warning
    try:
        cli.main(args=argv, prog_name="ensemble", standalone_mode=False)
    except UserError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.UsageError as exc:  # a wrong option or argument: one line too, and where to look
        if isinstance(exc, getattr(click.exceptions, "NoArgsIsHelpError", ())):  # bare `ensemble`: the help
            click.echo(exc.ctx.get_help() if exc.ctx is not None else exc.format_message())
            sys.exit(0)
        where = exc.ctx.command_path if exc.ctx is not None else "ensemble"
        message = " ".join(exc.format_message().split())
        click.echo(f"error: {message} (see {where} --help)", err=True)
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except Exception as exc:  # the engine's interruption and other expected stops
        from .engine import TrainingInterrupted

        if isinstance(exc, TrainingInterrupted):
            click.echo(f"stopped: {exc}", err=True)
            sys.exit(130)
        raise
    finally:
        if "torch.distributed" in sys.modules:  # (a command that never imported torch has no group)
            from .runtime import shutdown

            shutdown()


def entry() -> None:
    """The installed ``ensemble`` command (and ``python -m ensemble``): :func:`main`, then, once torch
    has been imported, a quick exit. Python's exit handlers run (logging, worker processes,
    temporary folders), the output is flushed, and the process ends without the interpreter's
    teardown and the C++ destructors of torch's libraries, which with its CUDA build took 0.5 s
    and raised the peak memory by about 130 MB after the answer was out (`import torch` alone:
    2.2 s and 647 MB against 1.7 s and 519 MB). Exceptions other than exits keep the normal path.
    A thread still running that is not a daemon (which Python would wait for) keeps the normal
    exit too. Tests and scripts call :func:`main`, which returns or raises as before."""
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code
    import threading

    busy = any(t is not threading.main_thread() and t.is_alive() and not t.daemon for t in threading.enumerate())
    if "torch" not in sys.modules or busy:  # nothing slow to skip, or threads Python must wait for
        sys.exit(code)
    if code is None:
        code = 0
    elif not isinstance(code, int):  # sys.exit("message"): printed, status 1, as Python does
        print(code, file=sys.stderr)
        code = 1
    import atexit
    import os

    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: Python would report it and exit 120
            code = code or 120
    os._exit(code)
