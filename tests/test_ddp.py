"""Two CPU processes under torchrun (gloo): fit-flat trains data-parallel and writes one clean artifact."""

import os
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.slow


def test_fit_flat_under_torchrun(tmp_path):
    run = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "ensemble",
        "fit-flat",
        "--out",
        str(run),
        "--set",
        "data.format=synthetic",
        "--set",
        "data.n_synthetic=240",
        "--set",
        "data.synthetic_size=32",
        "--set",
        "data.image_size=32",
        "--set",
        f"data.cache_dir={tmp_path / 'cache'}",
        "--set",
        "model.backbone=tinyvgg",
        "--set",
        "train.epochs=1",
        "--set",
        "train.batch_size=32",
        "--set",
        "train.device=cpu",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "Traceback" not in log
    weights = run / "flat" / "weights.pt"
    assert weights.is_file(), log[-4000:]
    state = torch.load(weights, map_location="cpu", weights_only=True)
    assert state and not any(k.startswith("module.") for k in state)
    assert any(k.startswith("trunk.") for k in state) and any(k.startswith("head.") for k in state)
    assert (run / "flat" / "meta.json").is_file() and (run / "flat" / "metrics.json").is_file()
    # one process wrote the artifact: no half-written or per-rank leftovers
    assert [p.name for p in run.iterdir() if ".tmp" in p.name or ".work" in p.name] == []
    assert log.count("flat epoch 1/1") == 1  # only rank 0 reports
