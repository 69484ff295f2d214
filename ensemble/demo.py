"""``ensemble demo``: the whole pipeline on the built-in synthetic faces, on a CPU, in minutes."""

from __future__ import annotations

import time
from pathlib import Path

from .classes import CLASSES
from .config import load_config

#: configs/demo.toml, kept in the package so the demo runs from any folder (a test checks they agree)
DEMO_TOML = """\
# The built-in demo: synthetic faces, a small VGG-style net, CPU-sized.
[data]
format = "synthetic"
n_synthetic = 4000
image_size = 48

[model]
backbone = "tinyvgg"
head = "slim"
hidden = 128
dropout = 0.2

[train]
epochs = 8
batch_size = 64
lr = 0.003
optimizer = "adamw"
weight_decay = 0.0001

[balance]
mode = "transform"
cap = 600
rotation = 20.0

[experts]
train_on = "both"

[experts.model]
trunk_from = "flat"

[experts.train]
epochs = 10

[stage1.model]
trunk_from = "flat"

[stage1.train]
epochs = 10
"""

QUICK = ["data.n_synthetic=1600", "train.epochs=3", "stage1.train.epochs=4", "experts.train.epochs=4"]


def run_demo(out: Path, quick: bool = False, overrides: tuple = (), log=print) -> dict:
    """Synthetic faces -> fit-flat, fit-stage1, fit-experts, compare, and one predict."""
    from stages.flat import fit_flat
    from stages.stage1 import fit_stage1

    from .experiment import open_experiment
    from .predictors import HierarchicalPredictor
    from .reports import compare
    from .routing import fit_experts_and_router

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg_file = out / "demo.toml"
    cfg_file.write_text(DEMO_TOML)
    cfg = load_config(cfg_file, (QUICK if quick else []) + list(overrides))
    t0 = time.time()
    times = {}
    log("[1/6] synthetic faces and data preparation")
    exp = open_experiment(cfg, out, log)
    steps = [
        ("[2/6] fit-flat", lambda: fit_flat(exp, log=log)),
        ("[3/6] fit-stage1", lambda: fit_stage1(exp, log=log)),
        ("[4/6] fit-experts", lambda: fit_experts_and_router(exp, log=log)),
        ("[5/6] compare", lambda: compare(exp, "test", log=log)),
    ]
    results = {}
    for name, step in steps:
        log(name)
        t = time.time()
        results[name] = step()
        times[name] = time.time() - t
    log("[6/6] predict one test face")
    test_face = exp.manifest[exp.manifest["split"] == "test"].iloc[0]
    hp = HierarchicalPredictor.load(out)
    pred = hp.predict([test_face["path"]])
    log(
        f"  {test_face['path']}: true {CLASSES[int(test_face['label'])]} -> {pred['label'][0]} "
        f"(V {pred['valence'][0]:+.2f}, A {pred['arousal'][0]:+.2f}, neighborhood {pred['neighborhood'][0]})"
    )
    log(f"done in {time.time() - t0:.0f}s; run folder {out}; report {out / 'reports' / 'report.md'}")
    log(f"try: ensemble predict {test_face['path']} --run {out} --no-detect")
    return {"compare": results["[5/6] compare"], "seconds": times}
