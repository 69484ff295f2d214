"""Mean ± standard deviation over seeds from result files of ``accuracy.py`` and ``rejudge_experts.py``.

    python benchmarks/seeds_table.py FILE [FILE ...] [--name NAME]

``accuracy.py`` files give their ``runs``; ``rejudge_experts.py`` files give each seed's ``now``
figures (the run's choices re-made by the current rule, without retraining). A seed may come
from one file only, and every file must have measured the same split. The table has each
model's accuracy and balanced accuracy, and the run's default output (``mixed+la``: the
hierarchy mixed with the flat model and logit-adjusted as chosen on the selection split)
against the flat model given the same logit adjustment (``flat+la``), per seed and on average.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from accuracy import stats
from common import save

METRICS = ("accuracy", "balanced_accuracy")


def seeds_of(path: Path) -> tuple[str, dict[int, dict]]:
    """(split, {seed: {"models": ..., "alpha", "tau", "from"}}) of one result file."""
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        sys.exit(f"{path}: cannot read it ({e})")
    if "runs" in d:
        rows = {r["seed"]: {"models": r["models"], "alpha": r.get("alpha"), "tau": r.get("tau")} for r in d["runs"]}
    elif "seeds" in d and all("now" in s for s in d["seeds"]):
        rows = {
            s["seed"]: {"models": s["now"]["models"], "alpha": s["now"].get("alpha"), "tau": s["now"].get("tau")}
            for s in d["seeds"]
        }
    else:
        sys.exit(f"{path}: not a result of benchmarks/accuracy.py or benchmarks/rejudge_experts.py")
    for r in rows.values():
        r["from"] = str(path)
    return d.get("split"), rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="+")
    ap.add_argument("--name", default="seeds-table")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    seeds, splits = {}, set()
    for f in args.files:
        split, rows = seeds_of(Path(f))
        splits.add(split)
        for seed, r in rows.items():
            if seed in seeds:
                sys.exit(f"seed {seed} is in both {seeds[seed]['from']} and {f}")
            seeds[seed] = r
    if len(splits) != 1:
        sys.exit(f"the files measured different splits: {sorted(map(str, splits))}")
    order = sorted(seeds)
    models = [m for m in seeds[order[0]]["models"] if all(m in seeds[s]["models"] for s in order)]
    summary = {m: {k: stats([seeds[s]["models"][m][k] for s in order]) for k in METRICS} for m in models}
    gain = {}
    if "mixed+la" in models and "flat+la" in models:
        gain = {
            k: stats([seeds[s]["models"]["mixed+la"][k] - seeds[s]["models"]["flat+la"][k] for s in order])
            for k in METRICS
        }
    print(f"{len(order)} seed(s) {order} on {splits.pop()}, %: mean ± std (ddof 1)")
    print(f"{'model':<10}{'accuracy':>16}{'balanced acc.':>18}")
    for m, s in summary.items():
        a, b = s["accuracy"], s["balanced_accuracy"]
        print(
            f"{m:<10}{100 * a['mean']:>9.1f} ± {100 * a['std']:<4.1f}{100 * b['mean']:>11.1f} ± {100 * b['std']:<4.1f}"
        )
    if gain:
        a, b = gain["accuracy"], gain["balanced_accuracy"]
        print(
            f"{'default - flat+la':<18}{100 * a['mean']:>+5.1f} ± {100 * a['std']:<4.1f}"
            f"{100 * b['mean']:>+9.1f} ± {100 * b['std']:<4.1f}"
        )
    print("α, τ chosen per seed: " + ", ".join(f"{s}: {seeds[s]['alpha']}, {seeds[s]['tau']}" for s in order))
    save(
        args.name,
        {
            "command": "python benchmarks/seeds_table.py " + " ".join(args.files) + f" --name {args.name}",
            "seeds": {s: {k: v for k, v in seeds[s].items() if k != "models"} for s in order},
            "summary": summary,
            "default_minus_flat_la": gain,
        },
        args.out,
    )


if __name__ == "__main__":
    main()
