"""``fit-experts`` whole: neighborhoods, one expert each, the router calibrated on the selection
split, then the probabilities' temperatures (:func:`ensemble.calibration.calibrate`, ``RUN/calibration``).

The CLI, the demo and the benchmarks call :func:`fit_experts_and_router`; the router and the
temperature scaling are part of the step that trains the experts they apply to, so no caller can
forget them (``fit-flat`` calibrates the flat model the same way when it ends).
"""

from __future__ import annotations

import numpy as np

from .artifacts import StageWriter, read_meta
from .calibration import calibrate
from .classes import CLASSES
from .combine import choose_alpha, choose_tau, final_proba, log_prior
from .config import DEFAULT_TEMPERATURE, records_config
from .errors import UserError
from .metrics import classification_metrics
from .predictors import FlatPredictor, HierarchicalPredictor, flat_identity, uint8_to_input
from .router import fit_temperature


@records_config
def fit_experts_and_router(exp, resume: bool = False, log=print) -> dict:
    """Neighborhoods, experts, router: ``RUN/neighborhoods``, ``RUN/experts``, ``RUN/router``.

    Stage 1 must exist before anything trains: the router routes on its V/A (and
    ``experts.train_on = "routed"``/``"both"`` trains on it). Returns the experts' index and,
    on the main process, the router's record and the temperature calibration (flat and hierarchy)."""
    from stages.experts import fit_experts

    if not (exp.run / "stage1" / "meta.json").is_file():
        raise UserError(
            f"fit-experts needs stage 1 ({exp.run / 'stage1'} has none): the router routes on its "
            "valence/arousal; run ensemble fit-stage1 first"
        )
    index = fit_experts(exp, resume, log)
    if not exp.rt.is_main:
        return {"experts": index, "router": None, "calibration": None}
    router = calibrate_router(exp, log)
    return {"experts": index, "router": router, "calibration": calibrate(exp, log)}


def calibrate_router(exp, log=print) -> dict:
    """Make the router's choices on the selection split (``val``, never a test split); write ``RUN/router``.

    In order: the soft router's temperature (``router.temperature`` when not 0, else fitted), what
    routes and how (``router.inputs``: V/A, or V/A with the flat model's class evidence;
    ``router.mode``; ``auto`` picks the better), the flat model's weight α in the final
    distribution (``router.alpha``; -1: chosen) and the logit adjustment τ
    (``router.logit_adjust = "auto"``: chosen, for the hierarchy and, separately, for the flat
    model); α and τ by ``router.select``: the simplest (α = 1, τ = 0, then nearest) within one
    paired standard error of the best, or the best. Without selection faces nothing can be fitted or compared: the
    configured values (else the defaults: soft, α = 0, τ = 0) are recorded, and the log says so."""
    import shutil

    from stages.experts import neighborhoods_sha

    shutil.rmtree(exp.run / "router", ignore_errors=True)  # rewritten below; never read while being chosen
    hp = HierarchicalPredictor.load(exp.run, router="soft", device=str(exp.rt.device))
    vi = exp.idx("val")
    ok = exp.images.ok[vi]
    vi = vi[ok]
    rc = exp.cfg.router
    labels = exp.manifest["label"].to_numpy()
    has_flat = (exp.run / "flat" / "meta.json").is_file()
    result = {
        "mode": "soft",
        "temperature": hp.net.posterior.temperature,
        "val": {},
        "neighborhoods_sha256": neighborhoods_sha(exp.run / "neighborhoods"),
        "inputs": "va",
        "alpha": 0.0,
        "tau": 0.0,
        "flat_tau": 0.0,
        "log_prior": log_prior(labels[exp.idx("train")], len(CLASSES)).tolist(),
    }
    if has_flat:
        result["flat_model"] = flat_identity(read_meta(exp.run / "flat", "flat"))
    result["stage1_model"] = flat_identity(read_meta(exp.run / "stage1", "stage1"))  # the V/A it routes on
    if len(vi) == 0:
        result["temperature"] = rc.temperature or DEFAULT_TEMPERATURE
        result["mode"] = "soft" if rc.mode == "auto" else rc.mode
        result["alpha"] = rc.alpha if rc.alpha > 0 and has_flat else 0.0
        result["inputs"] = "va+flat" if rc.inputs == "va+flat" and has_flat else "va"
        log(
            f"router: no validation faces, nothing to fit or compare: {result['mode']} routing, temperature "
            f"{result['temperature']:g} ({'router.temperature' if rc.temperature else 'the default'}), "
            f"flat weight {result['alpha']:g}, no logit adjustment"
        )
    else:
        faces = np.stack([exp.images.get(int(i)) for i in vi])
        va, ep = hp.parts_from_input(uint8_to_input(faces, hp.mean, hp.std))
        true_va = exp.manifest[["valence", "arousal"]].to_numpy()[vi]
        if rc.temperature:  # as configured, and the soft router is compared with it
            hp.net.posterior.temperature = result["temperature"] = rc.temperature
        else:
            result["temperature"] = fit_temperature(hp.net.posterior, va, hp.nbh.predict(true_va))
        y = labels[vi]
        p_flat = None
        if has_flat:
            flat = FlatPredictor.load(exp.run, device=str(exp.rt.device))
            p_flat = flat.proba_from_input(uint8_to_input(faces, flat.mean, flat.std))
        inputs = ("va", "va+flat") if rc.inputs == "auto" else (rc.inputs,)
        if p_flat is None and "va+flat" in inputs:
            if rc.inputs == "va+flat":
                log('router: router.inputs = "va+flat" but the run has no flat model: routing on V/A alone')
            inputs = ("va",)
        modes = ("hard", "soft") if rc.mode == "auto" else (rc.mode,)
        scores = {}
        for inp in inputs:
            hp.net.inputs = inp
            for mode in ("hard", "soft"):
                p, _ = hp.route(va, ep, mode, final=False, p_flat=p_flat)
                scores[(inp, mode)] = classification_metrics(y, p.argmax(1), CLASSES)["balanced_accuracy"]
        result["val"] = {mode: scores[(inputs[0], mode)] for mode in ("hard", "soft")}
        result["val_inputs"] = {inp: {mode: scores[(inp, mode)] for mode in ("hard", "soft")} for inp in inputs}
        result["inputs"], result["mode"] = max(
            ((i, m) for i in inputs for m in modes), key=lambda im: scores[im]
        )  # ties: V/A alone, then hard
        log(
            "router: validation balanced accuracy "
            + "; ".join(f"{i}: hard {scores[(i, 'hard')]:.4f}, soft {scores[(i, 'soft')]:.4f}" for i in inputs)
            + f" (T={result['temperature']:.3g}) -> {result['inputs']}, {result['mode']}"
        )
        hp.net.inputs = result["inputs"]
        p_hier = hp.route(va, ep, result["mode"], final=False, p_flat=p_flat)[0]
        _choose_final(exp, result, y, p_hier, p_flat, log)
    writer = StageWriter(exp.run / "router")
    writer.json("router.json", result)
    writer.publish({"stage": "router", **result})
    return result


def _choose_final(exp, result: dict, y: np.ndarray, p_hier: np.ndarray, p_flat: np.ndarray | None, log) -> None:
    """α (the flat model's weight) and then τ (logit adjustment) on the selection faces, into ``result``."""
    rc = exp.cfg.router
    if p_flat is None:
        if rc.alpha > 0:
            log(f"router: router.alpha = {rc.alpha:g} but the run has no flat model to mix in: the hierarchy alone")
    elif rc.alpha == -1:
        result["alpha"], result["val_alpha"], result["val_alpha_se"] = choose_alpha(y, p_flat, p_hier, rule=rc.select)
    else:
        result["alpha"] = rc.alpha
    p = final_proba(p_hier, p_flat, result["alpha"])
    if rc.logit_adjust == "auto":
        lp = np.array(result["log_prior"])
        result["tau"], result["val_tau"], result["val_tau_se"] = choose_tau(y, p, lp, rule=rc.select)
        if p_flat is not None:
            result["flat_tau"], result["val_flat_tau"], result["val_flat_tau_se"] = choose_tau(
                y, p_flat, lp, rule=rc.select
            )
    result["select"] = rc.select
    final = classification_metrics(
        y, final_proba(p, tau=result["tau"], log_prior=result["log_prior"]).argmax(1), CLASSES
    )
    result["val_final"] = final["balanced_accuracy"]  # the run's output on the selection split
    log(
        f"router: flat weight alpha {result['alpha']:g}, logit adjustment tau {result['tau']:g} ({rc.select}) "
        f"(flat alone: tau {result['flat_tau']:g}) -> validation balanced accuracy {final['balanced_accuracy']:.4f}"
    )
