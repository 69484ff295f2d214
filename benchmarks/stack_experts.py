"""Do the experts know anything the flat model does not? A learned combiner, with and without them.

    python benchmarks/stack_experts.py RUN [RUN ...] [--split valid] [--name stack-experts-ferplus-long]

For each finished hierarchy run (its own ``config.json``; ``--set`` overrides, e.g. ``data.root``):
every face of the selection split (``val``) and of the test split goes through the flat model
and through *every* expert (each over all faces, not only those routed to it), with stage 1's
V/A. Multinomial logistic regressions are then fitted on the selection faces only — C and the
class weighting (none or balanced) chosen by 5-fold stratified cross-validation of balanced
accuracy there — and scored once on the test split:

- ``stack flat``: on the flat model's log-probabilities (a learned recalibration and prior shift;
  the fair baseline for the rows below);
- ``stack flat+experts``: plus every expert's log-probabilities;
- ``stack flat+experts+va``: plus stage 1's V/A.

Beside them, the plain flat model, flat + logit adjustment (τ chosen on the selection split, as
``compare`` does) and the run's own output. If the experts carried class evidence the flat model
lacks, the second and third rows would beat the first.
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

import numpy as np
from common import ROOT, save

C_GRID = (0.01, 0.03, 0.1, 0.3, 1.0)
ROWS = ("flat", "flat+la", "run output", "stack flat", "stack flat+experts", "stack flat+experts+va")


def _log(p: np.ndarray) -> np.ndarray:
    return np.log(np.clip(p, 1e-6, 1.0))


def _fit_predict(x_sel, y_sel, x_test) -> tuple[np.ndarray, dict]:
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    best = None
    for c in C_GRID:
        for cw in (None, "balanced"):
            model = LogisticRegression(C=c, class_weight=cw, max_iter=3000)
            cv = StratifiedKFold(5, shuffle=True, random_state=0)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                pred = cross_val_predict(model, x_sel, y_sel, cv=cv)
            score = balanced_accuracy_score(y_sel, pred)
            if best is None or score > best[0]:
                best = (score, c, cw)
    score, c, cw = best
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = LogisticRegression(C=c, class_weight=cw, max_iter=3000).fit(x_sel, y_sel)
    return model.predict(x_test), {"C": c, "class_weight": cw, "cv_balanced_accuracy": score}


def one_run(run: Path, split: str, overrides: list[str]) -> dict:
    from ensemble.classes import CLASSES
    from ensemble.combine import choose_tau, final_proba, log_prior
    from ensemble.experiment import open_experiment
    from ensemble.metrics import classification_metrics
    from ensemble.predictors import FlatPredictor, HierarchicalPredictor, uint8_to_input

    raw = json.loads((run / "config.json").read_text())
    cfg = _override(raw, overrides)  # the run's own config, then the overrides
    exp = open_experiment(cfg, run, save=False, progress=False)
    hp, flat = HierarchicalPredictor.load(run), FlatPredictor.load(run)
    labels = exp.manifest["label"].to_numpy()
    lp = log_prior(labels[exp.idx("train")], len(CLASSES))
    parts = {}
    for s in ("val", split):
        idx = exp.idx(s)
        idx = idx[exp.images.ok[idx]]
        if not len(idx):
            raise SystemExit(f"{run}: no faces in split {s!r}")
        faces = np.stack([exp.images.get(int(i)) for i in idx])
        va, ep = hp.parts_from_input(uint8_to_input(faces, hp.mean, hp.std))
        pf = flat.proba_from_input(uint8_to_input(faces, flat.mean, flat.std))
        out = hp.route(va, ep, p_flat=pf)[0]  # the run's own output (its α, τ and router)
        experts = [_log(e) for e in ep[: len(hp.net.expert_heads)]]
        parts[s] = {"y": labels[idx], "va": va, "pf": pf, "experts": experts, "out": out}
    sel, test = parts["val"], parts[split]
    tau = choose_tau(sel["y"], sel["pf"], lp, rule=cfg.router.select)[0]

    def figures(pred) -> dict:
        m = classification_metrics(test["y"], pred, CLASSES)
        return {"accuracy": m["accuracy"], "balanced_accuracy": m["balanced_accuracy"]}

    rows = {
        "flat": figures(test["pf"].argmax(1)),
        "flat+la": {**figures(final_proba(test["pf"], tau=tau, log_prior=lp).argmax(1)), "tau": tau},
        "run output": figures(test["out"].argmax(1)),
    }
    for name, feats in (
        ("stack flat", lambda d: _log(d["pf"])),
        ("stack flat+experts", lambda d: np.hstack([_log(d["pf"]), *d["experts"]])),
        ("stack flat+experts+va", lambda d: np.hstack([_log(d["pf"]), *d["experts"], d["va"]])),
    ):
        pred, chosen = _fit_predict(feats(sel), sel["y"], feats(test))
        rows[name] = {**figures(pred), **chosen}
    return {
        "run": str(run),
        "seed": cfg.train.seed,
        "n_selection": len(sel["y"]),
        "n_test": len(test["y"]),
        "experts": len(parts["val"]["experts"]),
        "models": rows,
    }


def _override(raw: dict, overrides: list[str]):
    from ensemble.config import config_from_dict

    raw = json.loads(json.dumps(raw))  # a copy
    for o in overrides:
        key, value = o.split("=", 1)
        section, name = key.split(".", 1)
        try:
            raw[section][name] = json.loads(value)
        except json.JSONDecodeError:
            raw[section][name] = value
    return config_from_dict(raw)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--split", default="valid", help="the test split (nothing is chosen on it)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="section.key=value")
    ap.add_argument("--name", default="stack-experts-ferplus-long")
    args = ap.parse_args()
    results = [one_run(r, args.split, args.overrides) for r in args.runs]
    for r in results:
        print(f"seed {r['seed']} ({r['run']}):")
        for row in ROWS:
            m = r["models"][row]
            print(
                f"  {row:24s} accuracy {100 * m['accuracy']:.1f}  balanced accuracy {100 * m['balanced_accuracy']:.1f}"
            )
    summary = {
        row: {
            k: [
                float(np.mean([100 * r["models"][row][k] for r in results])),
                float(np.std([100 * r["models"][row][k] for r in results], ddof=1)) if len(results) > 1 else 0.0,
            ]
            for k in ("accuracy", "balanced_accuracy")
        }
        for row in ROWS
    }
    print("mean ± sd over runs:")
    for row in ROWS:
        a, b = summary[row]["accuracy"], summary[row]["balanced_accuracy"]
        print(f"  {row:24s} {a[0]:.1f} ± {a[1]:.1f} / {b[0]:.1f} ± {b[1]:.1f}")
    rel = [str(r.resolve().relative_to(ROOT)) if r.resolve().is_relative_to(ROOT) else str(r) for r in args.runs]
    save(
        args.name,
        {
            "command": "python benchmarks/stack_experts.py "
            + " ".join(rel)
            + "".join(f" --set {o}" for o in args.overrides)
            + f" --split {args.split} --name {args.name}",
            "split": args.split,
            "summary_mean_sd_percent": summary,
            "runs": results,
        },
    )


if __name__ == "__main__":
    main()
