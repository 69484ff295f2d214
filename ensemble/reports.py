"""``ensemble compare``: flat vs hierarchical (hard, soft, oracle) on the same faces."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from .classes import CLASSES
from .files import write_json
from .metrics import classification_metrics, regression_metrics
from .predictors import FlatPredictor, HierarchicalPredictor, uint8_to_input

MODELS = ("flat", "hard", "soft", "oracle")


def compare(exp, split: str = "test", out: Path | None = None, log=print) -> dict:
    """Score every model on one split; write report.md, metrics.csv, confusion PNGs."""
    idx = exp.idx(split)
    if len(idx) == 0:
        fallback = "val" if split == "test" else "test"
        if len(exp.idx(fallback)) == 0:
            from .errors import UserError

            raise UserError(
                f"compare: the data set has neither a {split} nor a {fallback} split to score on "
                f"(set data.val_fraction, or add a {split} split)"
            )
        log(f"compare: no {split} split in this data set; using {fallback}")
        split, idx = fallback, exp.idx(fallback)
    if not exp.images.ok[idx].any():
        from .errors import UserError

        raise UserError(f"compare: none of the {len(idx)} {split} image(s) could be read")
    idx = idx[exp.images.ok[idx]]
    out = Path(out) if out else exp.run / "reports"
    out.mkdir(parents=True, exist_ok=True)
    flat = FlatPredictor.load(exp.run, device=str(exp.rt.device))
    hier = HierarchicalPredictor.load(exp.run, device=str(exp.rt.device))
    y = exp.manifest["label"].to_numpy()[idx]
    true_va = exp.manifest[["valence", "arousal"]].to_numpy()[idx]
    fp, vas, eps = [], [], []
    for s in range(0, len(idx), 512):
        faces = np.stack([exp.images.get(int(i)) for i in idx[s : s + 512]])
        fp.append(flat.proba_from_input(uint8_to_input(faces, flat.mean, flat.std)))
        va, ep = hier.parts_from_input(uint8_to_input(faces, hier.mean, hier.std))
        vas.append(va)
        eps.append(ep)
    probs = {"flat": np.concatenate(fp)}
    va, ep = np.concatenate(vas), np.concatenate(eps, axis=1)
    true_region = hier.nbh.predict(true_va)
    routing = {}
    for mode in ("hard", "soft", "oracle"):
        probs[mode], w = hier.route(va, ep, mode, true_va)
        routing[mode] = float((w.argmax(1) == true_region).mean())
    metrics = {m: classification_metrics(y, probs[m].argmax(1), CLASSES) for m in MODELS}
    stage1 = regression_metrics(true_va, va)
    result = {
        "split": split,
        "n": int(len(idx)),
        "router_default": hier.mode,
        "models": metrics,
        "routing_accuracy": routing,
        "stage1": stage1,
    }
    write_json(out / "metrics.json", result)
    _write_csv(out / "metrics.csv", metrics, routing)
    for m in MODELS:
        _plot_confusion(np.array(metrics[m]["confusion"]), f"{m} ({split})", out / f"confusion_{m}.png")
    (out / "report.md").write_text(render_report(result, exp.run))
    log(summary_table(result))
    log(f"report: {out / 'report.md'}")
    return result


def _write_csv(path: Path, metrics: dict, routing: dict) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(
            ["model", "accuracy", "balanced_accuracy", "macro_f1", "routing_accuracy"]
            + [f"recall_{c}" for c in CLASSES]
        )
        for m, r in metrics.items():
            w.writerow(
                [m, r["accuracy"], r["balanced_accuracy"], r["macro_f1"], routing.get(m, "")]
                + [r["per_class_recall"][c] if r["per_class_recall"][c] is not None else "" for c in CLASSES]
            )


def _pct(v) -> str:
    return "—" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{100 * v:.1f}"


def summary_table(result: dict) -> str:
    """The comparison as the plain-text table the CLI and the demo print."""
    head = f"{'model':<8}{'acc':>7}{'bal.acc':>9}{'F1':>7}{'route':>7}  " + " ".join(f"{c[:7]:>7}" for c in CLASSES)
    lines = [f"comparison on {result['split']} ({result['n']} faces), recall per class in %", head, "-" * len(head)]
    for m, r in result["models"].items():
        lines.append(
            f"{m:<8}{_pct(r['accuracy']):>7}{_pct(r['balanced_accuracy']):>9}{_pct(r['macro_f1']):>7}"
            f"{_pct(result['routing_accuracy'].get(m)):>7}  "
            + " ".join(f"{_pct(r['per_class_recall'][c]):>7}" for c in CLASSES)
        )
    s = result["stage1"]
    lines.append(
        f"stage 1: RMSE valence {s['rmse_valence']:.3f} arousal {s['rmse_arousal']:.3f}, "
        f"CCC valence {s['ccc_valence']:.3f} arousal {s['ccc_arousal']:.3f}; "
        f"default router: {result['router_default']}"
    )
    return "\n".join(lines)


def render_report(result: dict, run: Path) -> str:
    """The comparison as report.md (tables; it names the confusion plots written beside it)."""
    rows = []
    for m, r in result["models"].items():
        rows.append(
            f"| {m} | {_pct(r['accuracy'])} | {_pct(r['balanced_accuracy'])} | {_pct(r['macro_f1'])} | "
            f"{_pct(result['routing_accuracy'].get(m))} |"
        )
    recall = ["| class | " + " | ".join(result["models"]) + " |", "|---|" + "---|" * len(result["models"])]
    for c in CLASSES:
        recall.append(
            f"| {c} | " + " | ".join(_pct(r["per_class_recall"][c]) for r in result["models"].values()) + " |"
        )
    s = result["stage1"]
    return "\n".join(
        [
            f"# Flat vs hierarchical — {run.name}, split `{result['split']}` ({result['n']} faces)",
            "",
            "Balanced accuracy is the mean per-class recall (the figure AffectNet results are compared on).",
            "`oracle` routes by the true valence/arousal: an upper bound, not a deployable model.",
            "",
            "| model | accuracy % | balanced accuracy % | macro-F1 % | routing accuracy % |",
            "|---|---|---|---|---|",
            *rows,
            "",
            "## Recall per class (%)",
            "",
            *recall,
            "",
            "## Stage 1 (valence/arousal)",
            "",
            f"RMSE valence {s['rmse_valence']:.3f}, arousal {s['rmse_arousal']:.3f}; CCC valence {s['ccc_valence']:.3f}, "
            f"arousal {s['ccc_arousal']:.3f}; PCC {s['pcc_valence']:.3f} / {s['pcc_arousal']:.3f}; "
            f"SAGR {s['sagr_valence']:.3f} / {s['sagr_arousal']:.3f}.",
            "",
            f"Default router (chosen on validation): **{result['router_default']}**.",
            "",
            "Confusion matrices: " + ", ".join(f"`confusion_{m}.png`" for m in result["models"]),
            "",
        ]
    )


def _plot_confusion(m: np.ndarray, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    norm = m / np.maximum(m.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(5.5, 5))
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(CLASSES)):
        for j in range(len(CLASSES)):
            ax.text(
                j, i, str(m[i, j]), ha="center", va="center", fontsize=7, color="white" if norm[i, j] > 0.5 else "black"
            )
    ax.set_xticks(range(len(CLASSES)), CLASSES, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(CLASSES)), CLASSES, fontsize=8)
    ax.set(xlabel="predicted", ylabel="true", title=title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
