"""``fit-experts`` whole: neighborhoods, one expert each, the router calibrated on validation, then
the probabilities' temperatures (:func:`ensemble.calibration.calibrate`, ``RUN/calibration``).

The CLI, the demo and the benchmarks call :func:`fit_experts_and_router`; the router and the
temperature scaling are part of the step that trains the experts they apply to, so no caller can
forget them (``fit-flat`` calibrates the flat model the same way when it ends).
"""

from __future__ import annotations

import numpy as np

from .artifacts import StageWriter
from .calibration import calibrate
from .classes import CLASSES
from .config import DEFAULT_TEMPERATURE
from .errors import UserError
from .metrics import classification_metrics
from .predictors import HierarchicalPredictor, uint8_to_input
from .router import fit_temperature


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
    """Pick the router mode and the soft router's temperature on validation; write ``RUN/router``.

    ``router.temperature`` (when not 0) is used as given, else it is fitted on validation;
    ``router.mode`` is used as given, and ``auto`` picks the better on validation. Without
    validation faces nothing can be fitted or compared: the configured temperature (else the
    default) and mode (``auto``: soft) are recorded, and the log says so."""
    from stages.experts import neighborhoods_sha

    hp = HierarchicalPredictor.load(exp.run, router="soft", device=str(exp.rt.device))
    vi = exp.idx("val")
    ok = exp.images.ok[vi]
    vi = vi[ok]
    rc = exp.cfg.router
    result = {
        "mode": "soft",
        "temperature": hp.net.posterior.temperature,
        "val": {},
        "neighborhoods_sha256": neighborhoods_sha(exp.run / "neighborhoods"),
    }
    if len(vi) == 0:
        result["temperature"] = rc.temperature or DEFAULT_TEMPERATURE
        result["mode"] = "soft" if rc.mode == "auto" else rc.mode
        log(
            f"router: no validation faces, nothing to fit or compare: {result['mode']} routing, temperature "
            f"{result['temperature']:g} ({'router.temperature' if rc.temperature else 'the default'})"
        )
    else:
        x = uint8_to_input(np.stack([exp.images.get(int(i)) for i in vi]), hp.mean, hp.std)
        va, ep = hp.parts_from_input(x)
        true_va = exp.manifest[["valence", "arousal"]].to_numpy()[vi]
        if rc.temperature:  # as configured, and the soft router is compared with it
            hp.net.posterior.temperature = result["temperature"] = rc.temperature
        else:
            result["temperature"] = fit_temperature(hp.net.posterior, va, hp.nbh.predict(true_va))
        y = exp.manifest["label"].to_numpy()[vi]
        for mode in ("hard", "soft"):
            p, _ = hp.route(va, ep, mode)
            result["val"][mode] = classification_metrics(y, p.argmax(1), CLASSES)["balanced_accuracy"]
        result["mode"] = max(("hard", "soft"), key=lambda m: result["val"][m]) if rc.mode == "auto" else rc.mode
        log(
            f"router: validation balanced accuracy hard {result['val']['hard']:.4f}, soft {result['val']['soft']:.4f}"
            f" (T={result['temperature']:.3g}) -> {result['mode']}"
        )
    writer = StageWriter(exp.run / "router")
    writer.json("router.json", result)
    writer.publish({"stage": "router", **result})
    return result
