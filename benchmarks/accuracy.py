"""Accuracy end to end: the FER+ CPU pipeline, flat vs hierarchical, over seeds.

    python benchmarks/accuracy.py [--seeds 3] [--first-seed 0] [--config configs/ferplus-cpu.toml]
                                  [--run artifacts/ferplus-cpu] [--split valid] [--set section.key=value ...]
                                  [--reuse benchmarks/results/accuracy-….json ...]

For each seed (``train.seed`` = 0, 1, …; it also draws the selection split held out of
FER2013Train) runs fit-flat, fit-stage1, fit-experts (+ router, α and τ chosen on the selection
split), then compare on a test split (FER2013Valid = ``valid`` by default: nothing was tuned on
it), timing each stage. Saves per seed: accuracy, balanced accuracy, per-class recall of every
model, the paired bootstrap intervals of hierarchy − flat; over seeds: mean ± standard deviation.

``--reuse FILE ...`` takes the seeds already measured in earlier result files of this benchmark (same
config file, overrides and split, else it stops) and runs only the missing ones: one seed is about 45
minutes on 2 idle CPU cores. ``--first-seed K`` runs seeds K … K + seeds − 1, so that seeds can train in
parallel (one process each, e.g. on one GPU) and be summed up by a last call that reuses their files.
Each seed records the commit it ran on.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from pathlib import Path

import numpy as np
from common import ROOT, save

METRICS = ("accuracy", "balanced_accuracy")


def one_seed(config: str, overrides: list, run: Path, split: str) -> dict:
    """fit-flat, fit-stage1, fit-experts, compare for one config; figures and seconds per stage."""
    from ensemble.config import load_config
    from ensemble.experiment import open_experiment
    from ensemble.reports import compare
    from ensemble.routing import fit_experts_and_router
    from stages.flat import fit_flat
    from stages.stage1 import fit_stage1

    cfg = load_config(config, overrides)
    seconds = {}
    t = time.time()
    exp = open_experiment(cfg, run)
    seconds["data"] = time.time() - t
    for name, step in (
        ("fit-flat", lambda: fit_flat(exp)),
        ("fit-stage1", lambda: fit_stage1(exp)),
        ("fit-experts", lambda: fit_experts_and_router(exp)),
    ):
        t = time.time()
        step()
        seconds[name] = time.time() - t
        print(f"{name}: {seconds[name]:.0f}s")
    t = time.time()
    result = compare(exp, split)
    seconds["compare"] = time.time() - t
    models = {
        m: {
            "accuracy": r["accuracy"],
            "balanced_accuracy": r["balanced_accuracy"],
            "macro_f1": r["macro_f1"],
            "per_class_recall": r["per_class_recall"],
        }
        for m, r in result["models"].items()
    }
    return {
        "seed": cfg.train.seed,
        "commit": _commit(),
        "run": str(run),
        "split": result["split"],
        "n": result["n"],
        "models": models,
        "vs_flat": result["vs_flat"],
        "routing_accuracy": result["routing_accuracy"],
        "stage1": result["stage1"],
        "router_default": result["router_default"],
        "alpha": result["alpha"],
        "tau": result["tau"],
        "flat_tau": result["flat_tau"],
        "seconds": seconds,
        "total_minutes": sum(seconds.values()) / 60,
    }


def _commit() -> str | None:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def reused_runs(path: str, config: str, overrides: list, split: str) -> dict[int, dict]:
    """Per-seed results of an earlier run of this benchmark, by seed; stops if it measured something else."""
    try:
        old = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise SystemExit(f"--reuse {path}: cannot read it ({e})") from None
    if old.get("benchmark", "").split("-")[0] != "accuracy" or "runs" not in old:
        raise SystemExit(f"--reuse {path}: not a result of benchmarks/accuracy.py")
    mine = (Path(config).name, list(overrides), split)
    theirs = (Path(old.get("config", "")).name, list(old.get("overrides", [])), old.get("split"))
    if mine != theirs:
        raise SystemExit(f"--reuse {path}: it measured config, overrides, split = {theirs}, not {mine}")
    return {r["seed"]: {**r, "reused_from": str(path)} for r in old["runs"]}


def stats(values) -> dict:
    """Mean and standard deviation (ddof 1; 0 for one value) of ``values``, and the values."""
    v = np.array(values, float)
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0, "values": v.tolist()}


def over_seeds(runs: list[dict]) -> dict:
    """Mean and standard deviation (ddof 1; 0 for one seed) over seeds, per model and metric, and
    of each hierarchy − flat difference."""
    out = {"models": {}, "vs_flat": {}}
    for m in runs[0]["models"]:
        out["models"][m] = {k: stats([r["models"][m][k] for r in runs]) for k in METRICS}
    for m in runs[0]["vs_flat"]:
        out["vs_flat"][m] = {k: stats([r["vs_flat"][m][k]["diff"] for r in runs]) for k in METRICS}
    out["total_minutes"] = stats([r["total_minutes"] for r in runs])
    return out


def table(summary: dict, n_seeds: int) -> str:
    """Mean ± std over seeds, in %."""
    lines = [f"{'model':<10}{'accuracy':>16}{'balanced acc.':>18}   (mean ± std over {n_seeds} seed(s), %)"]
    for m, s in summary["models"].items():
        a, b = s["accuracy"], s["balanced_accuracy"]
        lines.append(
            f"{m:<10}{100 * a['mean']:>9.1f} ± {100 * a['std']:<4.1f}{100 * b['mean']:>11.1f} ± {100 * b['std']:<4.1f}"
        )
    for m, s in summary["vs_flat"].items():
        a, b = s["accuracy"], s["balanced_accuracy"]
        lines.append(
            f"{m + ' - flat':<16}{100 * a['mean']:>+5.1f} ± {100 * a['std']:<4.1f}"
            f"{100 * b['mean']:>+9.1f} ± {100 * b['std']:<4.1f} points"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "configs" / "ferplus-cpu.toml"))
    ap.add_argument("--run", default=str(ROOT / "artifacts" / "ferplus-cpu"), help="one run folder per seed beneath")
    ap.add_argument("--seeds", type=int, default=1, help="runs with train.seed = first-seed .. first-seed+seeds-1")
    ap.add_argument("--first-seed", type=int, default=0)
    ap.add_argument(
        "--split", default="valid", help="valid = FER2013Valid, a test split (the selection split is held out of train)"
    )
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--out", default=None)
    ap.add_argument("--name", default="accuracy")
    ap.add_argument(
        "--reuse", nargs="+", action="extend", default=[], help="earlier result files: their seeds are taken, not rerun"
    )
    args = ap.parse_args()
    if args.seeds < 1 or args.first_seed < 0:
        ap.error("--seeds must be at least 1 and --first-seed at least 0")

    earlier = {}
    for path in args.reuse:
        for seed, r in reused_runs(path, args.config, args.overrides, args.split).items():
            if seed in earlier:
                ap.error(f"seed {seed} is in both {earlier[seed]['reused_from']} and {path}")
            earlier[seed] = r
    runs = []
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        if seed in earlier:
            print(
                f"seed {seed}: taken from {earlier[seed]['reused_from']} (commit {earlier[seed].get('commit', 'not recorded')})"
            )
            runs.append(earlier[seed])
            continue
        print(f"seed {seed}")
        runs.append(
            one_seed(args.config, [*args.overrides, f"train.seed={seed}"], Path(args.run) / f"seed{seed}", args.split)
        )
    summary = over_seeds(runs)
    print(table(summary, args.seeds))
    save(
        args.name,
        {
            "command": "python benchmarks/accuracy.py "
            + " ".join(
                [
                    f"--seeds {args.seeds}",
                    *([f"--first-seed {args.first_seed}"] if args.first_seed else []),
                    f"--split {args.split}",
                    *(f"--set {o}" for o in args.overrides),
                    *([f"--reuse {' '.join(args.reuse)}"] if args.reuse else []),
                    f"--config {args.config}",
                    f"--run {args.run}",
                    f"--name {args.name}",
                ]
            ),
            "config": args.config,
            "overrides": args.overrides,
            "protocol": "choices on the selection split held out of the training data; reported on a test split",
            "split": runs[0]["split"],
            "n": runs[0]["n"],
            "seeds": [r["seed"] for r in runs],
            "summary": summary,
            "runs": runs,
        },
        args.out,
    )


if __name__ == "__main__":
    main()
