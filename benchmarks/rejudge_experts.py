"""Re-judge the experts of finished runs by the current keep rule, and re-make the router's
choices by the current selection rule (α and τ: ``router.select``), without retraining.

    python benchmarks/rejudge_experts.py [--result benchmarks/results/accuracy-ferplus-3seeds.json]
                                         [--seeds 1 2] [--work artifacts/rejudge] [--split valid]

For each seed of an ``accuracy.py`` result: copy its run, judge every *kept* expert again with
``stages.experts._keep_or_restricted_flat`` (the rule of this commit; an expert it rejects is
published as the restricted flat head), re-choose the router, α, τ and the temperatures on the
selection split, and score the test split; saves old and new figures side by side. Experts that
an earlier rule already replaced cannot be re-judged (their trained weights were not kept), so
this measures what the rule takes away, not what it might have kept.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
from common import ROOT, save

MODELS = ("flat", "hard", "soft", "mixed", "flat+la", "mixed+la", "oracle")


def _rel(path: str) -> str:
    p = Path(path).resolve()
    return str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else path


def rejudge(result: dict, seed: int, work: Path, split: str) -> dict:
    from ensemble.calibration import calibrate
    from ensemble.classes import CLASSES
    from ensemble.config import load_config
    from ensemble.experiment import open_experiment
    from ensemble.predictors import HierarchicalPredictor
    from ensemble.reports import compare
    from ensemble.routing import calibrate_router
    from stages.experts import _keep_or_restricted_flat, read_index, restricted_flat_head, write_index

    old = next(r for r in result["runs"] if r["seed"] == seed)
    run = work / f"seed{seed}"
    shutil.rmtree(run, ignore_errors=True)
    shutil.copytree(ROOT / old["run"], run)  # ROOT / an absolute path is that path
    config = Path(result["config"])  # recorded where it ran (a worktree, perhaps): the same file here
    config = config if config.is_file() else ROOT / "configs" / config.name
    cfg = load_config(config, [*result["overrides"], f"train.seed={seed}"])
    exp = open_experiment(cfg, run)
    vi, labels = exp.idx("val"), exp.manifest["label"].to_numpy()
    true_region = HierarchicalPredictor.load(run).nbh.predict(exp.manifest[["valence", "arousal"]].to_numpy()[vi])
    index, judged = read_index(run), []
    for e in index["experts"]:
        if e.get("constant") or (e.get("true_neighborhood_val") or {}).get("kept") != "expert":
            continue
        r, cls = int(e["region"]), [CLASSES.index(c) for c in e["classes"]]
        idx = vi[(true_region == r) & np.isin(labels[vi], cls)]
        local = {c: i for i, c in enumerate(cls)}
        y = np.array([local[int(c)] for c in labels[idx]])
        head = restricted_flat_head(run, exp.cfg.for_stage("experts"), cls)
        fig = _keep_or_restricted_flat(exp, run / "experts" / str(r), r, e["classes"], head, idx, y, {}, print)
        judged.append({"region": r, "classes": e["classes"], "before": e["true_neighborhood_val"], "now": fig})
        e["true_neighborhood_val"] = fig
    write_index(run / "experts", index)
    calibrate_router(exp)
    calibrate(exp)
    new = compare(exp, split, log=lambda *a: None)

    def figures(models: dict) -> dict:
        return {m: {k: models[m][k] for k in ("accuracy", "balanced_accuracy")} for m in MODELS}

    return {
        "seed": seed,
        "experts": judged,
        "before": {"models": figures(old["models"]), "vs_flat_la": old["vs_flat"]["mixed+la"]},
        "now": {
            "models": figures(new["models"]),
            "vs_flat_la": new["vs_flat"]["mixed+la"],
            "router": new["router_default"],
            "alpha": new["alpha"],
            "tau": new["tau"],
        },
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--result", default=str(ROOT / "benchmarks" / "results" / "accuracy-ferplus-3seeds.json"))
    ap.add_argument("--seeds", type=int, nargs="+", default=None, help="default: every seed of the result")
    ap.add_argument("--work", default=str(ROOT / "artifacts" / "rejudge"), help="copies of the runs go here")
    ap.add_argument("--split", default="valid")
    ap.add_argument("--name", default="rejudge-experts-ferplus")
    args = ap.parse_args()
    result = json.loads(Path(args.result).read_text())
    seeds = args.seeds if args.seeds is not None else [r["seed"] for r in result["runs"]]
    rows = [rejudge(result, s, Path(args.work), args.split) for s in seeds]
    for row in rows:
        b, n = row["before"]["vs_flat_la"]["balanced_accuracy"], row["now"]["vs_flat_la"]["balanced_accuracy"]
        replaced = sum(j["now"]["kept"] != "expert" for j in row["experts"])
        print(
            f"seed {row['seed']}: {replaced} of {len(row['experts'])} kept experts replaced; mixed+la - flat+la "
            f"balanced accuracy {100 * b['diff']:+.1f} -> {100 * n['diff']:+.1f} [{100 * n['low']:+.1f}, {100 * n['high']:+.1f}]"
        )
    save(
        args.name,
        {
            "command": "python benchmarks/rejudge_experts.py "
            + f"--result {_rel(args.result)} "
            + (" ".join(["--seeds", *map(str, seeds)]) + " " if args.seeds is not None else "")
            + f"--work {_rel(args.work)} --split {args.split} --name {args.name}",
            "result": _rel(args.result),
            "split": args.split,
            "seeds": rows,
        },
    )


if __name__ == "__main__":
    main()
