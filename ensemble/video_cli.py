"""``ensemble predict`` on videos: the options, and the run over the video files among the paths.

Kept apart from ``cli.py`` and ``predict.py``: the predict command adds ``@video_options``
and calls ``predict_videos`` first, which hands back the image paths for the image path.
Imports only click at module level, so ``ensemble --help`` stays light.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import click

from .errors import UserError
from .paths import Protected, check_target, make_dir, shown, write_user_file

VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm")  # = video.VIDEO_EXTENSIONS, without importing it


OPTION_NAMES = {"target_fps": "--fps", "summary_dir": "--summary"}  # parameter -> the option a user typed


def video_options(f):
    """The predict command's options for videos only (they are errors when no video is given);
    ``--csv`` and ``--annotate`` are the predict command's own and serve images and videos."""
    options = [
        click.option("--every", type=int, default=None, help="Videos: analyse every N-th frame."),
        click.option("--fps", "target_fps", type=float, default=None, help="Videos: analyse about F frames a second."),
        click.option("--start", type=float, default=None, help="Videos: from this second."),
        click.option("--end", type=float, default=None, help="Videos: up to this second."),
        click.option(
            "--smooth",
            type=float,
            default=None,
            metavar="SECONDS",
            help="Videos: smooth each track's probabilities and V/A over this window (reported beside the raw).",
        ),
        click.option(
            "--smooth-method",
            type=click.Choice(["centred", "ema"]),
            default="centred",
            show_default=True,
            help="Videos: centred window, or exponential with this time constant.",
        ),
        click.option(
            "--summary",
            "summary_dir",
            type=click.Path(file_okay=False),
            default=None,
            help="Videos: write per-track summary CSV and V/A + probability plots here.",
        ),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def split_paths(paths) -> tuple[list[Path], list]:
    """(video files, paths for the image path). Folders are walked here only if they hold a
    video; without any video the paths come back untouched, for the image path to walk."""
    from .images import IMAGE_EXTENSIONS

    def is_video(f: Path) -> bool:
        return f.suffix.lower() in VIDEO_SUFFIXES

    walked = {}
    for p in map(Path, paths):
        if p.is_dir():
            walked[p] = sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith("."))
    if not any(is_video(Path(p)) for p in paths) and not any(is_video(f) for fs in walked.values() for f in fs):
        return [], list(paths)
    videos, rest, skipped = [], [], []
    for p in map(Path, paths):
        for f in walked.get(p, [p]):
            if is_video(f):
                videos.append(f)
            elif p not in walked or f.suffix.lower() in IMAGE_EXTENSIONS:
                rest.append(f)  # a file named explicitly is always tried
            else:
                skipped.append(f)
    if skipped:
        click.echo(
            f"skipped {len(skipped)} file(s) without an image or video extension in folders "
            f"(e.g. {', '.join(str(f) for f in skipped[:3])})",
            err=True,
        )
    return videos, rest


def load_for_cli(
    run,
    use_flat: bool,
    router,
    detector,
    min_confidence,
    precision: str = "auto",
    device: str = "cpu",
    backend: str = "auto",
):
    """The model a predict command uses (its notes on stderr): one loader for images and videos."""
    from .api import load

    return load(
        run,
        flat=use_flat,
        router=router,
        detector=detector,
        min_confidence=min_confidence,
        precision=precision,
        device=device,
        backend=backend,
        log=lambda m: click.echo(m, err=True),
    )


def predict_videos(
    paths,
    options: dict,
    *,
    run,
    as_json: bool,
    detector: str,
    router,
    use_flat: bool,
    batch_size: int,
    min_confidence: float = 0.0,
    annotate: Path | None = None,
    csv_file: Path | None = None,
    precision: str = "auto",
    device: str = "cpu",
    backend: str = "auto",
) -> tuple[list, int, object]:
    """Predict the videos among ``paths``; returns (the other paths, the number of videos that
    failed, the loaded model or None) so that the images of the same command reuse the model."""
    videos, rest = split_paths(paths)
    given = [
        OPTION_NAMES.get(k, f"--{k.replace('_', '-')}")
        for k, v in options.items()
        if v is not None and k != "smooth_method"
    ]
    if not videos:
        if given:
            raise UserError(
                f"{', '.join(given)} appl{'ies' if len(given) == 1 else 'y'} to videos "
                f"({', '.join(VIDEO_SUFFIXES)}); none among the inputs"
            )
        return rest, 0, None
    if rest and csv_file is not None:
        raise UserError(
            "--csv with both images and videos: their tables differ (videos have frame, time and track); "
            "predict the images and the videos in separate commands"
        )
    if rest and annotate is not None and annotate.suffix.lower() in VIDEO_SUFFIXES:
        raise UserError(f"--annotate {annotate} names one video file, but images are given too: pass a folder")
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")
    check_video_outputs(videos, options, annotate, csv_file)  # before the model loads
    model = load_for_cli(run, use_flat, router, detector, min_confidence, precision, device, backend)
    failed = run_videos(
        videos, options, model=model, as_json=as_json, batch_size=batch_size, annotate=annotate, csv_file=csv_file
    )
    return rest, failed, model


def _annotate_targets(videos: list[Path], annotate: Path | None) -> list[Path | None]:
    if annotate is None:
        return [None] * len(videos)
    out = Path(annotate)
    if out.suffix.lower() in VIDEO_SUFFIXES:
        if len(videos) > 1:
            raise UserError(
                f"--annotate {out} names one video file, but {len(videos)} videos are given: pass a folder instead"
            )
        return [out]
    if out.exists() and not out.is_dir():
        raise UserError(f"--annotate {out}: not a folder (and not a video file name)")
    names: dict[str, int] = {}
    targets = []
    for v in videos:  # same names from different folders get a number
        k = names[v.stem] = names.get(v.stem, 0) + 1
        targets.append(out / f"{v.stem}{'' if k == 1 else f'-{k}'}.annotated.mp4")
    return targets


def run_videos(
    videos: list[Path],
    options: dict,
    *,
    model,
    as_json: bool,
    batch_size: int,
    annotate: Path | None = None,
    csv_file: Path | None = None,
) -> int:
    """Analyse each video with ``model`` (an :class:`ensemble.api.Model`), print its summary lines
    (and JSON rows), write the outputs; returns the number of videos that failed."""
    from .video import ModelAnalyser, VideoError, add_smoothing, analyse_video
    from .video_report import annotate_video, plot_tracks, summary_line, track_summary

    selection, smooth, method, targets, summary_dir = check_video_outputs(videos, options, annotate, csv_file)
    analyser = ModelAnalyser(model, batch_size=batch_size)
    say = click.echo if not as_json else (lambda m: click.echo(m, err=True))  # stdout holds the JSON rows
    failed, tables, summaries, stems = 0, [], [], {}
    for video, target in zip(videos, targets):
        try:
            res = analyse_video(video, analyser, selection, batch_size)
        except VideoError as exc:
            click.echo(f"error: {shown(video)}: {exc}", err=True)
            failed += 1
            continue
        table = add_smoothing(res.table, smooth, method) if smooth else res.table
        info = res.info
        rate = res.n_decoded / res.seconds if res.seconds > 0 else float("nan")
        head = (
            f"{shown(video)}: {res.n_decoded} frames ({info.width}x{info.height}, {info.fps:g} fps), "
            f"{res.n_analysed} analysed in {res.seconds:.1f} s ({rate:.1f} frames/s)"
        )
        if res.truncated:
            click.echo(f"error: {shown(video)}: {res.truncated} (the frames before it are reported)", err=True)
            failed += 1
        if as_json:
            for rec in _json_rows(table):
                click.echo(json.dumps(rec))
        if table.empty:
            say(f"{head}; no face found (use --detector none if the frames are face crops)")
        else:
            summary = track_summary(table)
            say(f"{head}; {len(summary)} track(s)")
            for _, row in summary.iterrows():
                say(summary_line(row))
            summaries.append(summary)
        tables.append(table)
        if summary_dir is not None and not table.empty:
            k = stems[video.stem] = stems.get(video.stem, 0) + 1
            stem = video.stem if k == 1 else f"{video.stem}-{k}"
            for p in plot_tracks(table, summary_dir, stem):
                say(f"wrote {shown(p)}")
        if target is not None:
            n = annotate_video(video, table, target, selection)
            say(f"wrote {shown(target)} ({n} frames)")
    import pandas as pd

    if summary_dir is not None and summaries:
        path = summary_dir / "summary.csv"
        table = pd.concat(summaries)
        write_user_file(path, lambda tmp: table.to_csv(tmp, index=False, float_format="%.4f"), "--summary table")
        say(f"wrote {shown(path)}")
    if csv_file is not None and tables:
        table = pd.concat(tables)
        write_user_file(
            csv_file, lambda tmp: table.to_csv(tmp, index=False, float_format="%.4f"), "--csv table", videos
        )
        say(f"wrote {shown(csv_file)}")
    if failed:
        click.echo(f"{failed} of {len(videos)} video(s) could not be (fully) read", err=True)
    return failed


def check_video_outputs(videos: list[Path], options: dict, annotate: Path | None, csv_file: Path | None):
    """The frame selection, smoothing and output places, checked before any model is loaded or
    frame decoded (each a one-line error): (selection, smooth, method, annotate targets, summary folder)."""
    from .video import FrameSelection

    selection = FrameSelection(
        options.get("every"), options.get("target_fps"), options.get("start"), options.get("end")
    )
    smooth, method = options.get("smooth"), options.get("smooth_method") or "centred"
    if smooth is not None and not (math.isfinite(smooth) and smooth > 0):
        raise UserError(f"--smooth must be > 0 seconds, got {smooth}")
    targets = _annotate_targets(videos, annotate)
    summary_dir = Path(options["summary_dir"]) if options.get("summary_dir") else None
    if summary_dir is not None:
        make_dir(summary_dir, "the --summary folder")
    guard = Protected(videos)  # no output may replace an input
    for t in targets:
        if t is not None:
            check_target(make_dir(t.parent, "the --annotate folder") / t.name, "--annotate video", guard)
    if csv_file is not None:
        check_target(make_dir(csv_file.parent, "the --csv folder") / csv_file.name, "--csv table", guard)
    return selection, smooth, method, targets, summary_dir


def _json_rows(table):
    from .video import PROBA_COLUMNS

    for r in table.to_dict("records"):
        rec = {
            "file": r["file"],
            "frame": int(r["frame"]),
            "time_s": r["time_s"],
            "track": int(r["track"]),
            "box": [int(r[k]) for k in ("box_x", "box_y", "box_w", "box_h")],
            "emotion": r["emotion"],
            "probabilities": {c[2:]: round(float(r[c]), 4) for c in PROBA_COLUMNS},
            "valence": _num(r["valence"]),
            "arousal": _num(r["arousal"]),
            "neighborhood": int(r["neighborhood"]),
        }
        if "emotion_smooth" in r:
            rec.update(
                emotion_smooth=r["emotion_smooth"],
                probabilities_smooth={c[2:]: round(float(r[f"{c}_smooth"]), 4) for c in PROBA_COLUMNS},
                valence_smooth=_num(r["valence_smooth"]),
                arousal_smooth=_num(r["arousal_smooth"]),
            )
        yield rec


def _num(v):
    return None if v is None or not math.isfinite(v) else round(float(v), 4)
