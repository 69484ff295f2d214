"""How sure the model is: temperature scaling of the final probabilities, fitted on the selection split.

One temperature per model (flat, hierarchy), fitted by minimising the negative log-likelihood
of the selection (``val``) split and kept only where it also lowers that split's expected
calibration error (else T = 1: with hard routing a routing error leaves the true class almost
no probability, and the NLL's T then flattens every answer until the model says it is far
less sure than it is), written to ``RUN/calibration`` (``calibration.json`` + a
``meta.json`` with its sha256, like every stage) with the expected calibration error before
and after on val and, where there is one, on the held-out test split.

Scaling acts on log-probabilities, so it applies to the hierarchy's mixture as well as to the
flat model's softmax: ``p_T ∝ p ** (1 / T)``. It never changes the arg-max, only how sure.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

N_BINS = 15


def apply_temperature(proba: np.ndarray, temperature: float) -> np.ndarray:
    """(n, c) probabilities rescaled as softmax(log p / T); zeros stay zero."""
    if temperature == 1.0 or len(proba) == 0:
        return proba
    logp = np.log(np.clip(proba.astype(np.float64), 1e-12, 1.0)) / temperature
    logp[proba <= 0] = -np.inf
    logp -= logp.max(1, keepdims=True)
    p = np.exp(logp)
    return (p / p.sum(1, keepdims=True)).astype(np.float32)


def ece(proba: np.ndarray, y: np.ndarray, n_bins: int = N_BINS) -> float:
    """Expected calibration error: |accuracy - confidence| per confidence bin, weighted by bin size."""
    if len(y) == 0:
        return float("nan")
    conf, pred = proba.max(1), proba.argmax(1)
    correct = (pred == y).astype(np.float64)
    bins = np.minimum((conf * n_bins).astype(int), n_bins - 1)
    total = 0.0
    for b in range(n_bins):
        m = bins == b
        if m.any():
            total += m.sum() * abs(correct[m].mean() - conf[m].mean())
    return float(total / len(y))


def nll(proba: np.ndarray, y: np.ndarray) -> float:
    return float(-np.log(np.clip(proba[np.arange(len(y)), y], 1e-12, 1.0)).mean())


def fit_temperature(proba: np.ndarray, y: np.ndarray) -> float:
    """The T in [0.05, 20] that minimises the NLL of ``y`` (golden-section search on log T)."""
    if len(y) == 0:
        return 1.0
    lo, hi = np.log(0.05), np.log(20.0)
    g = (np.sqrt(5) - 1) / 2

    def f(log_t):
        return nll(apply_temperature(proba, float(np.exp(log_t))), y)

    a, b = lo + (1 - g) * (hi - lo), lo + g * (hi - lo)
    fa, fb = f(a), f(b)
    for _ in range(60):
        if fa < fb:
            hi, b, fb = b, a, fa
            a = lo + (1 - g) * (hi - lo)
            fa = f(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + g * (hi - lo)
            fb = f(b)
    t = float(np.exp((lo + hi) / 2))
    return t if f(np.log(t)) <= f(0.0) else 1.0  # never worse than leaving it alone


def choose_temperature(proba: np.ndarray, y: np.ndarray) -> tuple[float, float | None]:
    """The NLL's temperature where it lowers the ECE of the same faces, else 1; and the refused
    temperature (None when nothing was refused)."""
    t = fit_temperature(proba, y)
    if t != 1.0 and ece(apply_temperature(proba, t), y) >= ece(proba, y):
        return 1.0, t
    return t, None


def _figures(proba, y, t) -> dict:
    after = apply_temperature(proba, t)
    return {
        "n": len(y),
        "ece_before": round(ece(proba, y), 4),
        "ece_after": round(ece(after, y), 4),
        "nll_before": round(nll(proba, y), 4),
        "nll_after": round(nll(after, y), 4),
    }


def calibrate(exp, log=print) -> dict:
    """Fit the flat model's and the hierarchy's temperatures on val; write ``RUN/calibration``."""
    from .artifacts import StageWriter
    from .predictors import FlatPredictor, HierarchicalPredictor, uint8_to_input

    run = Path(exp.run)
    models = {}
    if (run / "flat" / "meta.json").is_file():
        models["flat"] = FlatPredictor.load(run)
    if (run / "router" / "meta.json").is_file():
        models["hierarchy"] = HierarchicalPredictor.load(run)
    result = {
        "method": "temperature scaling of log-probabilities, NLL on the selection split (val)",
        "n_bins": N_BINS,
        "models": {},
    }
    y_all = exp.manifest["label"].to_numpy()
    splits = {
        s: exp.idx(s)[exp.images.ok[exp.idx(s)]] for s in ("val", "valid", "test")
    }  # val: the fit; the others report
    for name, model in models.items():
        out = {}
        for split, idx in splits.items():
            if len(idx) == 0:
                continue
            x = uint8_to_input(np.stack([exp.images.get(int(i)) for i in idx]), model.mean, model.std)
            if name == "flat":
                p = model.proba_from_input(x)
            else:
                p, _ = model.route(*model.parts_from_input(x))
            out[split] = (p, y_all[idx].astype(int))
        if "val" not in out:
            log(f"calibration: no validation faces; the {name} model keeps T = 1")
            result["models"][name] = {"temperature": 1.0}
            continue
        t, refused = choose_temperature(*out["val"])
        if refused:
            log(f"calibration: {name} T={refused:.4g} (by NLL) would not lower the selection split's ECE; T = 1")
        entry = {"temperature": round(t, 4), **{s: _figures(p, y, t) for s, (p, y) in out.items()}}
        result["models"][name] = entry
        shown_split = next((s for s in ("test", "valid") if s in entry), "val")
        shown = entry[shown_split]
        log(f"calibration: {name} T={t:.3g}, ECE {shown_split} {shown['ece_before']:.4f} -> {shown['ece_after']:.4f}")
    if not models:
        return result
    writer = StageWriter(run / "calibration")
    writer.json("calibration.json", result)
    writer.publish({"stage": "calibration", "temperatures": {k: v["temperature"] for k, v in result["models"].items()}})
    return result


def load_temperature(run: Path, model: str) -> float:
    """The run's fitted temperature for ``flat`` or ``hierarchy`` (1.0 when it has none), verified."""
    from .artifacts import read_meta

    folder = Path(run) / "calibration"
    if not (folder / "meta.json").is_file():
        return 1.0
    read_meta(folder, "calibration")
    info = json.loads((folder / "calibration.json").read_text())
    return float(info.get("models", {}).get(model, {}).get("temperature", 1.0))
