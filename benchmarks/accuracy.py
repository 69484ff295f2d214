"""Accuracy end to end: the FER+ CPU pipeline, flat vs hierarchical (hard, soft, oracle).

    python benchmarks/accuracy.py [--config configs/ferplus-cpu.toml] [--run artifacts/ferplus-cpu]
                                  [--split val] [--set section.key=value ...]

Runs fit-flat, fit-stage1, fit-experts (+ router), compare, timing each stage, and saves
accuracy, balanced accuracy, contempt and disgust recall and wall time per stage.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from common import ROOT, save


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "configs" / "ferplus-cpu.toml"))
    ap.add_argument("--run", default=str(ROOT / "artifacts" / "ferplus-cpu"))
    ap.add_argument("--split", default="val", help="FER+ ships no test split here: FER2013Valid is 'val'")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--out", default=None)
    ap.add_argument("--name", default="accuracy")
    args = ap.parse_args()

    from ensemble.config import load_config
    from ensemble.experiment import open_experiment
    from ensemble.reports import compare
    from ensemble.routing import fit_experts_and_router
    from stages.flat import fit_flat
    from stages.stage1 import fit_stage1

    cfg = load_config(args.config, args.overrides)
    seconds = {}
    t = time.time()
    exp = open_experiment(cfg, Path(args.run))
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
    result = compare(exp, args.split)
    seconds["compare"] = time.time() - t
    models = {
        m: {
            "accuracy": r["accuracy"],
            "balanced_accuracy": r["balanced_accuracy"],
            "macro_f1": r["macro_f1"],
            "recall_contempt": r["per_class_recall"]["contempt"],
            "recall_disgust": r["per_class_recall"]["disgust"],
            "per_class_recall": r["per_class_recall"],
        }
        for m, r in result["models"].items()
    }
    best = max(("hard", "soft"), key=lambda m: models[m]["balanced_accuracy"])
    gain = models[best]["balanced_accuracy"] - models["flat"]["balanced_accuracy"]
    print(
        f"best router {best}: balanced accuracy {100 * models[best]['balanced_accuracy']:.1f} vs flat "
        f"{100 * models['flat']['balanced_accuracy']:.1f} ({100 * gain:+.1f} points); accuracy "
        f"{100 * models[best]['accuracy']:.1f} vs {100 * models['flat']['accuracy']:.1f}"
    )
    save(
        args.name,
        {
            "config": args.config,
            "overrides": args.overrides,
            "split": result["split"],
            "n": result["n"],
            "models": models,
            "routing_accuracy": result["routing_accuracy"],
            "stage1": result["stage1"],
            "router_default": result["router_default"],
            "best_router": best,
            "best_minus_flat_balanced_accuracy": gain,
            "seconds": seconds,
            "total_minutes": sum(seconds.values()) / 60,
        },
        args.out,
    )


if __name__ == "__main__":
    main()
