"""``ensemble compare``: flat vs hierarchical (hard, soft, oracle) on the same faces."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from .classes import CLASSES
from .combine import final_proba
from .data import SELECTION_SPLIT, TEST_SPLITS
from .files import write_json
from .metrics import classification_metrics, paired_bootstrap, regression_metrics
from .predictors import FlatPredictor, HierarchicalPredictor, uint8_to_input

#: flat; the hierarchy alone (hard, soft, oracle routing); mixed: the run's router with the flat
#: model's share α; +la: with the logit adjustment chosen for each (the run's final output: mixed+la)
MODELS = ("flat", "hard", "soft", "oracle", "mixed", "flat+la", "mixed+la")


def compare(exp, split: str = "test", out: Path | None = None, log=print, n_resamples: int = 1000) -> dict:
    """Score every model on one split, with paired bootstrap intervals of each hierarchy − flat;
    write report.md, metrics.json, metrics.csv, confusion PNGs."""
    idx = exp.idx(split)
    if len(idx) == 0:
        fallback = next((s for s in (*TEST_SPLITS, SELECTION_SPLIT) if len(exp.idx(s))), None)
        if fallback is None:
            from .errors import UserError

            raise UserError(
                f"compare: the data set has neither a {split} nor a {'val' if split != 'val' else 'test'} split "
                f"to score on (set data.val_fraction, or add a {split} split)"
            )
        note = " (the selection split: every choice was made on it, so the figures are optimistic)"
        log(f"compare: no {split} split in this data set; using {fallback}" + (note if fallback == "val" else ""))
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
    int8 = _int8_graph(exp.run, log)
    fp, vas, eps, p8, w8 = [], [], [], [], []
    for s in range(0, len(idx), 512):
        faces = np.stack([exp.images.get(int(i)) for i in idx[s : s + 512]])
        fp.append(flat.proba_from_input(uint8_to_input(faces, flat.mean, flat.std)))
        va, ep = hier.parts_from_input(uint8_to_input(faces, hier.mean, hier.std))
        vas.append(va)
        eps.append(ep)
        if int8 is not None:
            p8_batch, _va, w8_batch = int8.infer(uint8_to_input(faces, int8.mean, int8.std))
            p8.append(p8_batch)
            w8.append(w8_batch)
    probs = {"flat": np.concatenate(fp)}
    va, ep = np.concatenate(vas), np.concatenate(eps, axis=1)
    true_region = hier.nbh.predict(true_va)
    routing = {}
    for mode in ("hard", "soft", "oracle"):  # the hierarchy alone
        probs[mode], w = hier.route(va, ep, mode, true_va, final=False)
        routing[mode] = float((w.argmax(1) == true_region).mean())
    # the run's final distribution (ensemble.combine), with and without the logit adjustment, and
    # the flat model with its own adjustment: both chosen on the selection split
    r = hier.router
    alpha, tau, flat_tau, lp = r.get("alpha", 0.0), r.get("tau", 0.0), r.get("flat_tau", 0.0), r.get("log_prior")
    probs["mixed"] = final_proba(probs[hier.mode], probs["flat"], alpha)
    probs["flat+la"] = final_proba(probs["flat"], tau=flat_tau, log_prior=lp)
    probs["mixed+la"] = final_proba(probs["mixed"], tau=tau, log_prior=lp)
    routing["mixed"] = routing["mixed+la"] = routing[hier.mode]
    pairs = [("hard", "flat"), ("soft", "flat"), ("mixed", "flat"), ("mixed+la", "flat+la")]
    if p8:  # the run's final distribution again, its trunk in int8 (ONNX Runtime): against fp32
        probs["int8"] = np.concatenate(p8)
        routing["int8"] = float((np.concatenate(w8).argmax(1) == true_region).mean())
        pairs.append(("int8", "mixed+la"))
    models = [m for m in (*MODELS, "int8") if m in probs]
    metrics = {m: classification_metrics(y, probs[m].argmax(1), CLASSES) for m in models}
    by_inputs = _routing_by_inputs(hier, va, probs["flat"], true_region)
    pred = {m: probs[m].argmax(1) for m in models}
    vs_flat = {
        m: {"baseline": base, **paired_bootstrap(y, pred[base], pred[m], n_resamples=n_resamples, seed=0)}
        for m, base in pairs
    }
    if p8:
        vs_flat["int8"]["agreement"] = float((pred["int8"] == pred["mixed+la"]).mean())
    stage1 = regression_metrics(true_va, va)
    experts = _experts_in_true_neighborhood(exp.run, ep, probs["flat"], y, true_region)
    result = {
        "split": split,
        "n": int(len(idx)),
        "router_default": hier.mode,
        "alpha": alpha,
        "tau": tau,
        "flat_tau": flat_tau,
        "models": metrics,
        "routing_accuracy": routing,
        "router_inputs": hier.net.inputs,
        "routing_accuracy_by_inputs": by_inputs,
        "vs_flat": vs_flat,
        "stage1": stage1,
        "experts": experts,
        "params": hierarchy_params(hier, flat),
    }
    write_json(out / "metrics.json", result)
    _write_csv(out / "metrics.csv", metrics, routing)
    for m in models:
        _plot_confusion(
            np.array(metrics[m]["confusion"]), f"{m} ({split})", out / f"confusion_{m.replace('+', '_')}.png"
        )
    (out / "report.md").write_text(render_report(result, exp.run))
    log(summary_table(result))
    log(f"report: {out / 'report.md'}")
    return result


def _int8_graph(run: Path, log):
    """The run's int8 graph on ONNX Runtime (:mod:`ensemble.quantize`), where it has an
    up-to-date one; compare scores it beside fp32."""
    from .errors import UserError
    from .onnx_runtime import OnnxHierarchy, has_int8, runtime_installed, stale_reason

    if not (has_int8(run) and runtime_installed()):
        return None
    try:
        if stale := stale_reason(run):
            raise UserError(stale)
        return OnnxHierarchy.load(run, precision="int8")
    except UserError as exc:  # compare itself runs on torch: a damaged onnx stage does not stop it
        log(f"compare: the int8 graph is not scored: {exc}")
        return None


def _experts_in_true_neighborhood(run: Path, ep: np.ndarray, p_flat: np.ndarray, y, true_region) -> list[dict]:
    """Per expert, on this split's faces whose true V/A lies in its neighborhood and whose class it
    covers: its balanced accuracy and the flat model's restricted to its classes (what the expert
    started from), beside the same pair on the selection split that decided which was kept."""
    import json

    from stages.experts import read_index

    rows = []
    for e in read_index(run)["experts"]:
        r = int(e["region"])
        if e.get("constant"):
            continue
        cls = np.array([CLASSES.index(c) for c in e["classes"]])
        sel = (true_region == r) & np.isin(y, cls)
        meta = json.loads((run / "experts" / str(r) / "meta.json").read_text())  # verified by the predictor's load
        row = {
            "region": r,
            "classes": e["classes"],
            "trainable": meta.get("trainable", "head"),
            "n_own_params": meta.get("n_own_params"),
            "kept": meta.get("kept"),
            "selection": e.get("true_neighborhood_val"),
            "n": int(sel.sum()),
        }
        for name, p in (("expert", ep[r]), ("restricted_flat", p_flat)):
            pred = cls[p[sel][:, cls].argmax(1)] if sel.any() else np.zeros(0, int)
            row[name] = classification_metrics(y[sel], pred, CLASSES)["balanced_accuracy"] if sel.any() else None
        rows.append(row)
    return rows


def hierarchy_params(hier, flat) -> dict:
    """Parameters the hierarchy runs beyond the flat model: stage 1's head, each expert's own blocks
    and head, and any trunk other than the flat model's (the shared trunk is the flat model's)."""

    def n(module) -> int:
        return sum(p.numel() for p in module.parameters())

    flat_key = str(flat.meta.get("trunk_sha256", ""))[:16]
    out = {
        "flat": n(flat.net),
        "stage1_head": n(hier.net.stage1_head),
        "experts": [n(m) for m in hier.net.expert_heads],
        "other_trunks": sum(n(t) for key, t in hier.net.trunks.items() if key != flat_key),
    }
    out["extra_over_flat"] = out["stage1_head"] + sum(out["experts"]) + out["other_trunks"]
    return out


def _routing_by_inputs(hier, va: np.ndarray, p_flat: np.ndarray, true_region: np.ndarray) -> dict:
    """Routing accuracy of hard and soft routing on V/A alone and on V/A with the flat model's evidence."""
    out, chosen = {}, hier.net.inputs
    try:
        for inputs in ("va", "va+flat"):
            hier.net.inputs = inputs
            ep = np.zeros((len(hier.net.expert_heads), len(va), len(CLASSES)), np.float32)  # routing only
            out[inputs] = {
                mode: float((hier.route(va, ep, mode, p_flat=p_flat, final=False)[1].argmax(1) == true_region).mean())
                for mode in ("hard", "soft")
            }
    finally:
        hier.net.inputs = chosen
    return out


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
    lines.append(
        "routing accuracy by router input (%): "
        + "; ".join(
            f"{i}: hard {_pct(r['hard'])}, soft {_pct(r['soft'])}"
            for i, r in result["routing_accuracy_by_inputs"].items()
        )
        + f" (the run routes on {result['router_inputs']})"
    )
    lines += _interval_lines(result)
    lines += _expert_lines(result)
    s = result["stage1"]
    lines.append(
        f"stage 1: RMSE valence {s['rmse_valence']:.3f} arousal {s['rmse_arousal']:.3f}, "
        f"CCC valence {s['ccc_valence']:.3f} arousal {s['ccc_arousal']:.3f}; "
        f"default router: {result['router_default']}, flat weight alpha {result['alpha']:g}, "
        f"logit adjustment tau {result['tau']:g} (flat: {result['flat_tau']:g})"
    )
    return "\n".join(lines)


def _interval_lines(result: dict) -> list[str]:
    """Each hierarchy − its flat baseline, in points, with the paired bootstrap interval."""
    any_ = next(iter(result["vs_flat"].values()))
    lines = [
        f"hierarchy - flat, points, paired bootstrap {100 * any_['level']:.0f}% ({any_['n_resamples']} resamples):"
    ]
    for m, b in result["vs_flat"].items():
        lines.append(
            f"  {m:<9} - {b['baseline']:<8} accuracy {_signed(b['accuracy'])}, balanced accuracy {_signed(b['balanced_accuracy'])}"
        )
    return lines


def _expert_lines(result: dict) -> list[str]:
    """Extra parameters over flat; per expert, balanced accuracy inside its true neighborhood."""
    if "params" not in result:
        return []
    pp = result["params"]
    lines = [
        f"parameters: flat {pp['flat']:,}; the hierarchy adds {pp['extra_over_flat']:,} "
        f"({100 * pp['extra_over_flat'] / max(1, pp['flat']):.0f}% of flat: stage 1 head {pp['stage1_head']:,}, "
        f"experts {sum(pp['experts']):,}"
        + (f", other trunks {pp['other_trunks']:,}" if pp["other_trunks"] else "")
        + ")"
    ]
    if result.get("experts"):
        lines.append(
            f"experts inside their true neighborhood, balanced accuracy % (expert vs the flat model "
            f"restricted to its classes) on {result['split']}, and on the selection split the keep rule's figure:"
        )
    for e in result.get("experts", []):
        sel = e.get("selection") or {}
        lines.append(
            f"  {e['region']} {'/'.join(c[:4] for c in e['classes'])} ({e['trainable']}, kept {e['kept'] or '-'}): "
            f"{_pct(e['expert'])} vs {_pct(e['restricted_flat'])} (n={e['n']}); "
            f"selection {_pct(sel.get('expert'))} vs {_pct(sel.get('restricted_flat'))} (n={sel.get('n', '-')}"
            + (f"; {sel['rule']}" if sel.get("rule") else "")
            + ")"
        )
    return lines


def _signed(d: dict) -> str:
    return f"{100 * d['diff']:+.1f} [{100 * d['low']:+.1f}, {100 * d['high']:+.1f}]"


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
            "`hard`/`soft`/`oracle`: the hierarchy alone; `mixed`: the run's router with the flat model's share α;",
            "`+la`: with post-hoc logit adjustment for class priors. `mixed+la` is what `ensemble predict` outputs;",
            "`int8` (where the run's onnx stage has an int8 graph): the same, its trunk in 8-bit integers (`--precision int8`).",
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
            "Routing accuracy by router input (%): "
            + "; ".join(
                f"{i}: hard {_pct(r['hard'])}, soft {_pct(r['soft'])}"
                for i, r in result["routing_accuracy_by_inputs"].items()
            )
            + f"; the run routes on **{result['router_inputs']}**.",
            "",
            "## Hierarchy − flat (paired bootstrap)",
            "",
            *[f"    {line}" for line in _interval_lines(result)],
            "",
            "## Experts and parameters",
            "",
            *[f"    {line}" for line in _expert_lines(result)],
            "",
            f"Chosen on the selection split: router **{result['router_default']}**, flat weight "
            f"α = {result['alpha']:g} (`mixed`), logit adjustment τ = {result['tau']:g} (`mixed+la`, the run's "
            f"output) and τ = {result['flat_tau']:g} for the flat model (`flat+la`).",
            "",
            "Confusion matrices: " + ", ".join(f"`confusion_{m.replace('+', '_')}.png`" for m in result["models"]),
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
