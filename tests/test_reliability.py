"""Reliability: interrupted and resumed training, impossible output folders, determinism,
runs that do not belong together, tampered artifacts, version drift, malformed label files
(property-based) and broken images inside a training set.

Everything is tiny (240 synthetic faces at 32 px, tinyvgg, one CPU thread). The tests that
start ``python -m ensemble`` in a subprocess and interrupt it are marked ``slow``.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import sklearn
import torch
from conftest import run_cli
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from ensemble.config import load_config
from ensemble.data import CLASS_ALIASES, CLASSES, FERPLUS_VOTES, canonical_class, load_dataset
from ensemble.errors import UserError
from ensemble.predictors import FlatPredictor, HierarchicalPredictor

SIZE = 32

pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------- helpers


def tiny(cache: Path, *extra: str, epochs: int = 2, seed: int = 0) -> list[str]:
    """--set overrides of a CPU-sized synthetic experiment."""
    return [
        "data.format=synthetic",
        "data.n_synthetic=240",
        "data.synthetic_size=32",
        f"data.image_size={SIZE}",
        f"data.cache_dir={json.dumps(str(cache))}",
        "model.backbone=tinyvgg",
        "model.hidden=32",
        "train.device=cpu",
        "train.threads=1",
        "train.batch_size=32",
        f"train.epochs={epochs}",
        f"train.seed={seed}",
        "experts.min_count=5",
        *extra,
    ]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One synthetic-face and prepared-image cache for the whole module (keyed by seed and size)."""
    return tmp_path_factory.mktemp("cache")


_cli = run_cli  # (exit code, stdout, stderr) of ensemble ARGV, in-process


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


def _state(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _history(folder: Path) -> list[dict]:
    with open(folder / "history.csv", newline="") as f:
        return list(csv.DictReader(f))


def _face(tmp: Path) -> Path:
    img = tmp / "face.png"
    Image.new("RGB", (SIZE, SIZE), (120, 100, 90)).save(img)
    return img


# --------------------------------------------------------------------------- trained runs (in-process)


def _fit_flat_run(cache: Path, run: Path, seed: int, epochs: int = 2, global_seed: int | None = 1234):
    """fit-flat in this process. ``global_seed`` puts torch's global RNG where a fresh process
    has it (any fixed value will do); None leaves it wherever earlier work left it."""
    from ensemble.experiment import open_experiment
    from stages.flat import fit_flat

    cfg = load_config(None, tiny(cache, "train.precision=fp32", epochs=epochs, seed=seed))
    exp = open_experiment(cfg, run, log=lambda m: None, progress=False)
    if global_seed is not None:
        torch.manual_seed(global_seed)
    fit_flat(exp, log=lambda m: None)
    return exp


@pytest.fixture(scope="module")
def flat_runs(tmp_path_factory, cache, one_thread):
    """Flat runs: ``a`` and ``b`` with seed 0, ``c`` with seed 1, each started from the same
    global RNG state; ``d`` with seed 0 after other random work moved the global RNG."""
    root = tmp_path_factory.mktemp("flat_runs")
    runs = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        runs[name] = root / name
        _fit_flat_run(cache, runs[name], seed)
    torch.manual_seed(999)
    torch.rand(100)
    runs["d"] = root / "d"
    _fit_flat_run(cache, runs["d"], 0, global_seed=None)
    return runs


@pytest.fixture(scope="module")
def hier(tmp_path_factory, cache, one_thread):
    """A complete run (flat, stage 1, neighborhoods, experts, router), trained once."""
    from ensemble.routing import calibrate_router
    from stages.experts import fit_experts
    from stages.stage1 import fit_stage1

    run = tmp_path_factory.mktemp("hier") / "run"
    exp = _fit_flat_run(cache, run, 0, epochs=1)
    quiet = lambda m: None  # noqa: E731
    fit_stage1(exp, log=quiet)
    index = fit_experts(exp, log=quiet)
    calibrate_router(exp, quiet)
    trained = [i for i, e in enumerate(index["experts"]) if not e.get("constant")]
    assert trained, f"the fixture needs an expert with a network: {index}"
    return {"run": run, "index": index, "trained_expert": trained[0]}


@pytest.fixture
def run_copy(hier, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(hier["run"], dst)
    return dst


def _edit_json(path: Path, change) -> None:
    obj = json.loads(path.read_text())
    change(obj)
    path.write_text(json.dumps(obj, indent=2))


def _edit_index(run: Path, change) -> None:
    """Edit experts/index.json and record its new sha256, as a careless tool (or a mix of two
    runs) would: the consistency checks, not the hash, must then catch it."""
    from ensemble.artifacts import sha256_file

    _edit_json(run / "experts" / "index.json", change)
    _edit_json(
        run / "experts" / "meta.json",
        lambda m: m["files"].update({"index.json": sha256_file(run / "experts" / "index.json")}),
    )


# --------------------------------------------------------------------------- 1. interruption (subprocesses)

SUB_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


# ``python -m ensemble`` with torch's global RNG pinned first. The network's initial weights
# come from the global RNG, not from train.seed (see test_seed_alone_fixes_the_run), and a
# fresh process here starts it at a random seed; pinning isolates what resume must restore.
PINNED = [
    sys.executable,
    "-c",
    "import sys, torch; torch.manual_seed(1234); from ensemble.cli import main; main(sys.argv[1:])",
]


def _fit_cmd(run: Path, cache: Path, epochs: int, *extra: str, pinned: bool = False) -> list[str]:
    cmd = (PINNED if pinned else [sys.executable, "-m", "ensemble"]) + ["fit-flat", "--out", str(run)]
    for s in tiny(cache, epochs=epochs):
        cmd += ["--set", s]
    return cmd + list(extra)


def _interrupt(
    run: Path, cache: Path, epochs: int, sig: int, attempts: int = 3, timeout: float = 180, pinned: bool = False
):
    """Start fit-flat, send ``sig`` as soon as the first epoch's checkpoint exists.

    Retries (from scratch) when the signal landed after the last epoch, so the run really was
    stopped mid-training. Returns (returncode, stdout, stderr, epoch of the checkpoint, 0-based).
    """
    ckpt = run / ".flat.work" / "checkpoint.pt"
    for _ in range(attempts):
        shutil.rmtree(run, ignore_errors=True)
        proc = subprocess.Popen(
            _fit_cmd(run, cache, epochs, pinned=pinned),
            cwd=run.parent,
            env=SUB_ENV,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + timeout
        try:
            while not ckpt.exists() and proc.poll() is None:
                if time.monotonic() > deadline:
                    pytest.fail(f"no checkpoint at {ckpt} after {timeout}s")
                time.sleep(0.005)
            if proc.poll() is None:
                proc.send_signal(sig)
            out, err = proc.communicate(timeout=timeout)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
        assert ckpt.is_file(), f"the run ended without a checkpoint (rc {proc.returncode}):\n{out}\n{err}"
        ck_epoch = _state(ckpt)["epoch"]
        if ck_epoch < epochs - 1:
            return proc.returncode, out, err, ck_epoch
    pytest.fail(f"the signal landed after the last epoch in {attempts} attempts")


def _resume(run: Path, cache: Path, epochs: int, pinned: bool = False) -> subprocess.CompletedProcess:
    return subprocess.run(
        _fit_cmd(run, cache, epochs, "--resume", pinned=pinned),
        cwd=run.parent,
        env=SUB_ENV,
        text=True,
        capture_output=True,
        timeout=300,
    )


def _check_finished(run: Path, epochs: int) -> None:
    assert (run / "flat" / "meta.json").is_file()
    assert [int(r["epoch"]) for r in _history(run / "flat")] == list(range(1, epochs + 1))
    assert not (run / ".flat.work").exists()
    assert not [p.name for p in run.iterdir() if p.name.startswith(".flat.")]


@pytest.mark.slow
def test_sigkill_mid_run_then_resume(tmp_path, cache):
    run, epochs = tmp_path / "run", 6
    rc, out, err, ck_epoch = _interrupt(run, cache, epochs, signal.SIGKILL)
    assert rc == -signal.SIGKILL
    assert not (run / "flat").exists(), "a half-written stage must never look finished"
    with pytest.raises(UserError, match="not a trained run"):
        FlatPredictor.load(run)
    res = _resume(run, cache, epochs)
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"flat: resumed after epoch {ck_epoch + 1}" in res.stdout
    _check_finished(run, epochs)
    FlatPredictor.load(run)  # hashes verify, weights load


@pytest.mark.slow
def test_sigterm_stops_cleanly_then_resume(tmp_path, cache):
    run, epochs = tmp_path / "run", 6
    rc, out, err, ck_epoch = _interrupt(run, cache, epochs, signal.SIGTERM)
    assert rc == 130, out + err
    assert "Traceback" not in out + err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("stopped:") and "--resume" in lines[0]
    assert not (run / "flat").exists()
    assert (run / ".flat.work" / "checkpoint.pt").is_file()
    res = _resume(run, cache, epochs)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "resumed after epoch" in res.stdout
    _check_finished(run, epochs)


@pytest.mark.slow
def test_resumed_run_matches_uninterrupted_run(tmp_path, cache):
    epochs = 4
    straight = tmp_path / "straight"
    res = subprocess.run(
        _fit_cmd(straight, cache, epochs, pinned=True),
        cwd=tmp_path,
        env=SUB_ENV,
        text=True,
        capture_output=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    run = tmp_path / "resumed"
    rc, _, _, ck_epoch = _interrupt(run, cache, epochs, signal.SIGKILL, pinned=True)
    assert rc == -signal.SIGKILL and ck_epoch < epochs - 1
    res = _resume(run, cache, epochs, pinned=True)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "resumed after epoch" in res.stdout
    m_straight = json.loads((straight / "flat" / "metrics.json").read_text())
    m_resumed = json.loads((run / "flat" / "metrics.json").read_text())
    for key in ("val", "test", "best_epoch"):
        assert m_resumed[key] == m_straight[key], key
    assert _same_state(_state(run / "flat" / "weights.pt"), _state(straight / "flat" / "weights.pt"))
    losses = lambda f: [float(r["train_loss"]) for r in _history(f)]  # noqa: E731
    assert losses(run / "flat") == losses(straight / "flat")


@pytest.mark.slow
def test_two_cli_runs_of_one_config_are_identical(tmp_path, cache):
    for name in ("one", "two"):
        res = subprocess.run(
            _fit_cmd(tmp_path / name, cache, 1), cwd=tmp_path, env=SUB_ENV, text=True, capture_output=True, timeout=300
        )
        assert res.returncode == 0, res.stdout + res.stderr
    one, two = (_state(tmp_path / name / "flat" / "weights.pt") for name in ("one", "two"))
    assert _same_state(one, two)


# --------------------------------------------------------------------------- 2. impossible --out


@pytest.mark.parametrize("kind", ["parent_is_file", "name_too_long"])
def test_impossible_out_fails_before_training(tmp_path, capsys, kind):
    blocker = tmp_path / "a_file.txt"
    blocker.write_text("I am a file, not a folder\n")
    out_dir = blocker / "run" if kind == "parent_is_file" else tmp_path / ("x" * 300)
    fresh_cache = tmp_path / "cache"
    t0 = time.monotonic()
    code, out, err = _cli(
        ["fit-flat", "--out", str(out_dir)] + sum((["--set", s] for s in tiny(fresh_cache)), []), capsys
    )
    assert code == 2, out + err
    line = _one_error_line(err)
    assert str(out_dir) in line
    assert "epoch" not in out
    assert not fresh_cache.exists(), "the data set was loaded before the output folder was checked"
    assert time.monotonic() - t0 < 10
    assert blocker.read_text() == "I am a file, not a folder\n"


def test_out_is_an_existing_file(tmp_path, capsys):
    blocker = tmp_path / "run"
    blocker.write_text("x")
    code, out, err = _cli(
        ["fit-flat", "--out", str(blocker)] + sum((["--set", s] for s in tiny(tmp_path / "c")), []), capsys
    )
    assert code == 2
    assert "Traceback" not in err and str(blocker) in err
    assert not (tmp_path / "c").exists()


# --------------------------------------------------------------------------- 3. determinism


def _assert_same_run(a: Path, b: Path) -> None:
    assert json.loads((a / "metrics.json").read_text()) == json.loads((b / "metrics.json").read_text())
    assert _same_state(_state(a / "weights.pt"), _state(b / "weights.pt"))
    ma, mb = (json.loads((f / "meta.json").read_text()) for f in (a, b))
    assert ma["files"]["weights.pt"] == mb["files"]["weights.pt"]
    assert ma["trunk_sha256"] == mb["trunk_sha256"]
    strip = lambda rows: [{k: v for k, v in r.items() if k != "images_per_s"} for r in rows]  # noqa: E731
    assert strip(_history(a)) == strip(_history(b))


def test_same_seed_same_metrics_and_weights(flat_runs):
    """Two fits of one config and seed, in one process, from the same global RNG state (as two
    fresh ``ensemble fit-flat`` processes start): data order, augmentation, dropout all repeat."""
    _assert_same_run(flat_runs["a"] / "flat", flat_runs["b"] / "flat")


def test_seed_alone_fixes_the_run(flat_runs):
    """The config's seed, not the process's history, decides the run (fit-experts and the demo
    train several networks in one process)."""
    _assert_same_run(flat_runs["a"] / "flat", flat_runs["d"] / "flat")


def test_different_seed_different_weights(flat_runs):
    a, c = _state(flat_runs["a"] / "flat" / "weights.pt"), _state(flat_runs["c"] / "flat" / "weights.pt")
    assert a.keys() == c.keys()
    assert not _same_state(a, c)
    meta_a = json.loads((flat_runs["a"] / "flat" / "meta.json").read_text())
    meta_c = json.loads((flat_runs["c"] / "flat" / "meta.json").read_text())
    assert (meta_a["seed"], meta_c["seed"]) == (0, 1)
    assert meta_a["trunk_sha256"] != meta_c["trunk_sha256"]


# --------------------------------------------------------------------------- 4. runs that do not fit together


def test_predict_with_an_empty_run_folder(tmp_path, capsys):
    empty = tmp_path / "empty_run"
    empty.mkdir()
    img = _face(tmp_path)
    code, out, err = _cli(["predict", str(img), "--run", str(empty), "--no-detect"], capsys)
    assert code == 2
    line = _one_error_line(err)
    assert "stage1" in line or "meta.json" in line
    assert out == ""
    code, out, err = _cli(["predict", str(img), "--run", str(empty), "--no-detect", "--flat"], capsys)
    assert code == 2
    assert "flat" in _one_error_line(err)


def test_predict_with_a_flat_only_run(flat_runs, tmp_path, capsys):
    """A run from another experiment that only trained the flat model: the hierarchy is refused."""
    img = _face(tmp_path)
    code, out, err = _cli(["predict", str(img), "--run", str(flat_runs["a"]), "--no-detect"], capsys)
    assert code == 2
    assert "stage1" in _one_error_line(err)
    code, out, err = _cli(["predict", str(img), "--run", str(flat_runs["a"]), "--no-detect", "--flat"], capsys)
    assert code == 0 and out.startswith(str(img)), err


def test_stage1_without_experts_is_named(hier, tmp_path):
    dst = tmp_path / "partial"
    dst.mkdir()
    shutil.copytree(hier["run"] / "stage1", dst / "stage1")
    shutil.copytree(hier["run"] / "neighborhoods", dst / "neighborhoods")
    with pytest.raises(UserError, match="fit-experts"):
        HierarchicalPredictor.load(dst)


def test_untouched_copy_loads(run_copy):
    """The baseline for the edits below: an unmodified copy loads without warnings."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hp = HierarchicalPredictor.load(run_copy)
        FlatPredictor.load(run_copy)
    assert hp.nbh.k_ == json.loads((run_copy / "experts" / "index.json").read_text())["k"]


def test_index_k_differs_from_neighborhoods(run_copy):
    _edit_index(run_copy, lambda ix: ix.update(k=ix["k"] + 1))
    with pytest.raises(UserError, match="neighborhoods|one expert per neighborhood"):
        HierarchicalPredictor.load(run_copy)


def test_expert_classes_disagree_with_index(run_copy, hier):
    r = hier["trained_expert"]

    def change(ix):
        mine = ix["experts"][r]["classes"]
        others = [c for c in CLASSES if c not in mine]
        ix["experts"][r]["classes"] = others[: len(mine)]

    _edit_index(run_copy, change)
    with pytest.raises(UserError, match=f"expert {r}: classes"):
        HierarchicalPredictor.load(run_copy)


def test_expert_meta_classes_disagree_with_index(run_copy, hier):
    """Same count of classes (the weights still fit), other names: the meta.json side."""
    r = hier["trained_expert"]
    _edit_json(run_copy / "experts" / str(r) / "meta.json", lambda m: m.update(classes=list(reversed(m["classes"]))))
    with pytest.raises(UserError, match="index.json"):
        HierarchicalPredictor.load(run_copy)


def test_expert_at_another_input_size(run_copy, hier):
    r = hier["trained_expert"]
    meta_file = run_copy / "experts" / str(r) / "meta.json"
    _edit_json(meta_file, lambda m: m.update(input_size=SIZE * 2))  # meta.json itself is not hashed
    with pytest.raises(UserError, match="input_size"):
        HierarchicalPredictor.load(run_copy)


def test_expert_with_other_normalisation(run_copy, hier):
    r = hier["trained_expert"]
    _edit_json(run_copy / "experts" / str(r) / "meta.json", lambda m: m.update(mean=[0.1, 0.2, 0.3]))
    with pytest.raises(UserError, match="mean"):
        HierarchicalPredictor.load(run_copy)


def test_index_with_fewer_experts_than_neighborhoods_is_refused(run_copy):
    _edit_index(run_copy, lambda ix: ix.update(experts=ix["experts"][:-1]))
    with pytest.raises(UserError, match="expert"):
        HierarchicalPredictor.load(run_copy)


def test_truncated_index_json_is_one_error_line(run_copy, tmp_path, capsys):
    f = run_copy / "experts" / "index.json"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    code, out, err = _cli(["predict", str(_face(tmp_path)), "--run", str(run_copy), "--no-detect"], capsys)
    assert code == 2
    assert "index.json" in _one_error_line(err)


# --------------------------------------------------------------------------- 5. tampering


def test_flipped_byte_in_neighborhoods_is_refused(run_copy, tmp_path, capsys):
    f = run_copy / "neighborhoods" / "model.joblib"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01
    f.write_bytes(bytes(data))
    code, out, err = _cli(["predict", str(_face(tmp_path)), "--run", str(run_copy), "--no-detect"], capsys)
    assert code == 2
    line = _one_error_line(err)
    assert "sha256" in line and "model.joblib" in line
    assert out == ""


def test_flat_weights_from_another_run_are_refused(run_copy, flat_runs, tmp_path, capsys):
    other = flat_runs["c"] / "flat" / "weights.pt"
    assert _sha256(other) != _sha256(run_copy / "flat" / "weights.pt")
    shutil.copyfile(other, run_copy / "flat" / "weights.pt")
    code, out, err = _cli(["predict", str(_face(tmp_path)), "--run", str(run_copy), "--no-detect", "--flat"], capsys)
    assert code == 2
    line = _one_error_line(err)
    assert "sha256" in line and "weights.pt" in line


class _Payload:
    """Unpickling this calls open(marker, 'w'): it creates the marker file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickled_code_in_weights_is_never_run(run_copy, tmp_path, capsys):
    # the payload really runs under a plain unpickler (so this test can fail)
    probe = tmp_path / "probe_marker"
    pickle.loads(pickle.dumps({"x": _Payload(probe)}))["x"].close()
    assert probe.exists()

    marker = tmp_path / "pwned_marker"
    w = run_copy / "flat" / "weights.pt"
    torch.save({"trunk.0.weight": _Payload(marker), "head.bias": torch.zeros(8)}, w)
    # hide the tampering from the hash check: the loader must still refuse to run code
    _edit_json(run_copy / "flat" / "meta.json", lambda m: m["files"].update({"weights.pt": _sha256(w)}))
    with pytest.raises(UserError, match="weights.pt"):
        FlatPredictor.load(run_copy)
    assert not marker.exists()
    code, out, err = _cli(["predict", str(_face(tmp_path)), "--run", str(run_copy), "--no-detect", "--flat"], capsys)
    assert code == 2
    assert "weights.pt" in _one_error_line(err)
    assert not marker.exists()


def test_pickled_code_in_the_clustering_is_never_run(run_copy, tmp_path):
    """model.joblib is written for users' own analysis; the tool loads the neighborhoods from
    plain arrays, so even a joblib with a matching hash never gets unpickled."""
    marker = tmp_path / "pwned_by_joblib"
    f = run_copy / "neighborhoods" / "model.joblib"
    f.write_bytes(pickle.dumps(_Payload(marker)))
    _edit_json(run_copy / "neighborhoods" / "meta.json", lambda m: m["files"].update({"model.joblib": _sha256(f)}))
    hp = HierarchicalPredictor.load(run_copy)
    assert hp.predict_proba([_face(tmp_path)]).shape == (1, 8)
    assert not marker.exists()


def test_a_file_not_recorded_in_meta_is_refused(run_copy, tmp_path):
    """Dropping a file's line from meta.json does not make it trusted."""
    _edit_json(run_copy / "neighborhoods" / "meta.json", lambda m: m["files"].pop("model.joblib"))
    with pytest.raises(UserError, match="model.joblib is not recorded"):
        HierarchicalPredictor.load(run_copy)


def test_edited_index_json_is_refused_by_its_hash(run_copy):
    _edit_json(run_copy / "experts" / "index.json", lambda ix: ix["experts"][0].update(constant=True))
    with pytest.raises(UserError, match="index.json does not match the sha256"):
        HierarchicalPredictor.load(run_copy)


def test_edited_router_is_refused_and_a_missing_one_named(run_copy):
    _edit_json(run_copy / "router" / "router.json", lambda r: r.update(temperature=9.0))
    with pytest.raises(UserError, match="router.json does not match the sha256"):
        HierarchicalPredictor.load(run_copy)
    shutil.rmtree(run_copy / "router")
    with pytest.raises(UserError, match="has no router"):
        HierarchicalPredictor.load(run_copy)
    assert HierarchicalPredictor.load(run_copy, router="hard").mode == "hard"  # an explicit mode still works


def test_router_from_another_run_is_refused(run_copy, hier, tmp_path):
    """A router calibrated for other neighborhoods (here: its record rewritten consistently)."""
    from ensemble.artifacts import sha256_file

    _edit_json(run_copy / "router" / "router.json", lambda r: r.update(neighborhoods_sha256="0" * 64))
    _edit_json(
        run_copy / "router" / "meta.json",
        lambda m: m["files"].update({"router.json": sha256_file(run_copy / "router" / "router.json")}),
    )
    with pytest.raises(UserError, match="other neighborhoods"):
        HierarchicalPredictor.load(run_copy)


def test_meta_without_a_field_is_one_line(run_copy, tmp_path, capsys):
    _edit_json(run_copy / "flat" / "meta.json", lambda m: m.pop("backbone"))
    code, out, err = _cli(["predict", str(_face(tmp_path)), "--run", str(run_copy), "--no-detect", "--flat"], capsys)
    assert code == 2
    assert "damaged" in _one_error_line(err)


# --------------------------------------------------------------------------- 6. version drift


def _other_major(version: str) -> str:
    major = int(version.split(".")[0])
    return f"{major - 1 if major > 0 else major + 1}.0.0"


def test_other_torch_major_warns_and_loads(run_copy, tmp_path, capsys):
    other = _other_major(torch.__version__)
    _edit_json(run_copy / "flat" / "meta.json", lambda m: m["versions"].update(torch=other))
    with pytest.warns(UserWarning, match=rf"torch {other}") as rec:
        fp = FlatPredictor.load(run_copy)
    assert not any("scikit-learn" in str(w.message) for w in rec)
    assert fp.predict_proba([_face(tmp_path)]).shape == (1, 8)
    code, out, err = _cli(["predict", str(_face(tmp_path)), "--run", str(run_copy), "--no-detect", "--flat"], capsys)
    assert code == 0
    assert any(line.startswith("warning:") and "torch" in line for line in err.splitlines()), err


def test_other_sklearn_major_warns_and_loads(run_copy):
    other = _other_major(sklearn.__version__)
    _edit_json(run_copy / "neighborhoods" / "meta.json", lambda m: m["versions"].update({"scikit-learn": other}))
    with pytest.warns(UserWarning, match=rf"scikit-learn {other}"):
        hp = HierarchicalPredictor.load(run_copy)
    assert hp.nbh.k_ >= 1


def test_same_major_other_minor_does_not_warn(run_copy):
    major = torch.__version__.split(".")[0]
    _edit_json(run_copy / "flat" / "meta.json", lambda m: m["versions"].update(torch=f"{major}.99.0"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        FlatPredictor.load(run_copy)


# --------------------------------------------------------------------------- 7. malformed label files (property-based)


@pytest.fixture(scope="module")
def tiny_pngs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pngs")
    paths = []
    for i in range(4):
        p = folder / f"img{i}.png"
        Image.new("RGB", (8, 8), (i * 40, 80, 200 - i * 40)).save(p)
        paths.append(p)
    return paths


def _data_cfg(fmt: str, root: Path):
    return load_config(None, [f"data.format={fmt}", f"data.root={json.dumps(str(root))}", "data.val_fraction=0"]).data


def _load(fmt: str, root: Path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_dataset(_data_cfg(fmt, root))


# text that is valid UTF-8 but unusual (accents, CJK, RTL, emoji, combining marks), with no
# CSV structure (comma, quote, line breaks) and at least one visible character
JUNK = st.text(
    alphabet=st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp"), blacklist_characters=',"\r\n'),
    min_size=1,
    max_size=12,
).filter(lambda s: s.strip() != "")


def _is_class_label(s: str) -> bool:
    s = s.strip()
    return canonical_class(s) is not None or (s.isascii() and s.isdigit() and int(s) < len(CLASSES))


def _not_a_number(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return True
    return False


GOOD_LABELS = st.sampled_from(sorted(CLASS_ALIASES) + [str(i) for i in range(len(CLASSES))]).flatmap(
    lambda s: st.sampled_from([s, s.upper(), f" {s} ", s.title()])
)
# labels that look like digits in other scripts (a superscript two) are drops, not crashes
BAD_LABELS = st.one_of(st.sampled_from(["8", "-1", "99", "boredom", "", "happy sad", "NaN"]), JUNK).filter(
    lambda s: not _is_class_label(s)
)
VA = st.one_of(
    st.just(("", "")), st.tuples(st.floats(-1, 1), st.floats(-1, 1)).map(lambda t: (f"{t[0]:.3f}", f"{t[1]:.3f}"))
)
BAD_VA = st.one_of(st.sampled_from(["abc", "1.5", "-1.01", "nan", "inf", "-2"]), JUNK.filter(_not_a_number))
SPLIT_NAMES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}


CSV_BAD = ["bad_label", "bad_split", "bad_va", "missing_file", "extra_fields", "short", "junk", "blank"]


@st.composite
def csv_rows(draw, n_images: int, kinds=("good", "good", *CSV_BAD)):
    """(row text, kind) where kind is ("good", image, label, split) or ("bad", reason) or ("blank",)."""
    img = draw(st.integers(0, n_images - 1))
    kind = draw(st.sampled_from(kinds))
    label, split = draw(GOOD_LABELS), draw(st.sampled_from(sorted(SPLIT_NAMES)))
    v, a = draw(VA)
    path = f"<IMG{img}>"
    if kind == "good":
        canon = CLASSES.index(canonical_class(label) or CLASSES[int(label.strip())])
        return f"{path},{label},{v},{a},{split}", ("good", img, canon, SPLIT_NAMES[split])
    if kind == "bad_label":
        return f"{path},{draw(BAD_LABELS)},{v},{a},{split}", ("bad", kind)
    if kind == "bad_split":
        bad = draw(
            st.one_of(st.sampled_from(["holdout", "", "TRAIN2", "dev"]), JUNK).filter(
                lambda s: s.strip().lower() not in SPLIT_NAMES
            )
        )
        return f"{path},{label},{v},{a},{bad}", ("bad", kind)
    if kind == "bad_va":
        return f"{path},{label},{draw(BAD_VA)},0.1,{split}", ("bad", kind)
    if kind == "missing_file":
        return f"<DIR>/no_such_{draw(st.integers(0, 999))}.png,{label},{v},{a},{split}", ("bad", kind)
    if kind == "extra_fields":
        return f"{path},{label},{v},{a},{split},{draw(JUNK)}", ("bad", kind)
    if kind == "short":
        return draw(st.sampled_from([f"{path},{label}", f"{path}", f"{path},{label},{v}"])), ("bad", kind)
    if kind == "junk":
        return draw(JUNK), ("bad", kind)
    return "", ("blank",)


def _fill(row: str, images: list[Path], folder: str) -> str:
    """Put the real paths in for the <IMGi> and <DIR> place-holders of a generated row."""
    for i, p in enumerate(images):
        row = row.replace(f"<IMG{i}>", str(p))
    return row.replace("<DIR>", folder)


def _deduplicated(good: list[tuple], n_bad: int):
    """What the adapters keep of the good rows (image, label, split): a repeated image (same file,
    no box) once, the first row, the repeats counted as dropped; None where one image is in two
    splits, which is an error (issue 15)."""
    first, splits = {}, {}
    for g in good:
        splits.setdefault(g[0], set()).add(g[2])
        first.setdefault(g[0], g)
    if any(len(s) > 1 for s in splits.values()):
        return None
    return list(first.values()), n_bad + len(good) - len(first)


def _check_manifest(ds, expected_good: list[tuple], n_bad: int, image_names: list[str]) -> None:
    got = Counter(
        (image_names.index(Path(p).name), int(lab), sp)
        for p, lab, sp in zip(ds.manifest["path"], ds.manifest["label"], ds.manifest["split"])
    )
    assert got == Counter(expected_good)
    assert sum(ds.dropped.values()) == n_bad, dict(ds.dropped)


@settings(max_examples=25, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(first=csv_rows(4), rest=st.lists(csv_rows(4), max_size=12))
@example(
    first=("<IMG0>,happy,,,train", ("good", 0, 1, "train")),
    rest=[
        ("<IMG1>, Anger ,0.5,-0.5,valid", ("good", 1, 6, "val")),
        ("<IMG2>,😀,,,train", ("bad", "bad_label")),
        ("<IMG3>,sad,0.1,0.1,train,{extra}", ("bad", "extra_fields")),
        ("", ("blank",)),
        ("<IMG3>,7,-2,0,test", ("bad", "bad_va")),
        ("<DIR>/gone.png,happy,,,train", ("bad", "missing_file")),
    ],
)
def test_csv_adapter_keeps_good_rows_and_counts_bad_ones(tiny_pngs, first, rest):
    # the first row may be of any kind: the readers check every row on its own
    rows = [first] + rest
    with tempfile.TemporaryDirectory() as d:
        text = "path,label,valence,arousal,split\n" + "\n".join(_fill(r, tiny_pngs, d) for r, _ in rows) + "\n"
        manifest = Path(d) / "labels.csv"
        manifest.write_text(text, encoding="utf-8")
        if not any(k[0] == "good" for _, k in rows):
            with pytest.raises(UserError):  # nothing usable is an error, never an empty data set
                _load("csv", manifest)
            return
        expected = _deduplicated([k[1:] for _, k in rows if k[0] == "good"], sum(k[0] == "bad" for _, k in rows))
        if expected is None:
            with pytest.raises(UserError, match="is in two splits"):
                _load("csv", manifest)
            return
        ds = _load("csv", manifest)
    _check_manifest(ds, *expected, [p.name for p in tiny_pngs])


FER_BAD = [
    "text_vote",
    "negative",
    "zero",
    "tie",
    "unknown_top",
    "missing_file",
    "short",
    "long",
    "junk",
    "no_name",
    "blank",
]


@st.composite
def ferplus_rows(draw, n_images: int, kinds=("good", "good", *FER_BAD)):
    """A FER+ label.csv row (name, box, 10 votes) and its kind."""
    img = draw(st.integers(0, n_images - 1))
    win = draw(st.integers(0, 7))
    top = draw(st.integers(1, 10))
    votes = [draw(st.integers(0, top - 1)) for _ in range(10)]
    votes[win] = top
    kind = draw(st.sampled_from(kinds))
    name = f"img{img}.png"
    box = '"(0, 0, 48, 48)"'
    if kind == "good":
        return f"{name},{box},{','.join(map(str, votes))}", ("good", img, CLASSES.index(FERPLUS_VOTES[win]), "train")
    if kind == "text_vote":
        votes[draw(st.integers(0, 9))] = draw(JUNK.filter(_not_a_number))
    elif kind == "negative":
        votes[draw(st.integers(0, 9))] = -draw(st.integers(1, 5))
    elif kind == "zero":
        votes = [0] * 10
    elif kind == "tie":
        other = draw(st.integers(0, 9).filter(lambda i: i != win))
        votes[other] = top
    elif kind == "unknown_top":
        votes[draw(st.integers(8, 9))] = top + draw(st.integers(1, 5))
    elif kind == "missing_file":
        name = f"no_such_{draw(st.integers(0, 999))}.png"
    elif kind == "short":
        votes = votes[: draw(st.integers(0, 9))]
    elif kind == "long":
        votes = votes + [draw(st.integers(0, 9))]
    elif kind == "junk":
        return draw(JUNK), ("bad", kind)
    elif kind == "no_name":
        name = " "
    else:
        return "", ("blank",)
    return ",".join([name, box] + [str(v) for v in votes]), ("bad", kind)


@settings(max_examples=25, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(first=ferplus_rows(4), rest=st.lists(ferplus_rows(4), max_size=12))
@example(
    first=('img0.png,"(0, 0, 48, 48)",6,2,1,1,0,0,0,0,0,0', ("good", 0, 0, "train")),
    rest=[
        ('img1.png,"(0, 0, 48, 48)",0,0,0,5,3,2,0,0,0,0', ("good", 1, 2, "train")),
        ('img2.png,"(0, 0, 48, 48)",x,0,0,0,0,0,0,0,0,0', ("bad", "text_vote")),
        ('img2.png,"(0, 0, 48, 48)",4,4,0,0,0,0,0,0,2,0', ("bad", "tie")),
        ('img3.png,"(0, 0, 48, 48)",6,2,1,1,0,0,0,0,0,0,7', ("bad", "long")),
        ('img3.png,"(0, 0, 48, 48)",6,2', ("bad", "short")),
        ("", ("blank",)),
        ("ünïcödé ☃ junk", ("bad", "junk")),
    ],
)
def test_ferplus_adapter_keeps_good_rows_and_counts_bad_ones(tiny_pngs, first, rest):
    # the first row may be of any kind: the readers check every row on its own
    rows = [first] + rest
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d) / "FER2013Train"
        folder.mkdir()
        for p in tiny_pngs:
            shutil.copyfile(p, folder / p.name)
        (folder / "label.csv").write_text("\n".join(r for r, _ in rows) + "\n", encoding="utf-8")
        if not any(k[0] == "good" for _, k in rows):
            with pytest.raises(UserError):  # nothing usable is an error, never an empty data set
                _load("ferplus", Path(d))
            return
        ds = _load("ferplus", Path(d))
    expected = _deduplicated([k[1:] for _, k in rows if k[0] == "good"], sum(k[0] == "bad" for _, k in rows))
    _check_manifest(ds, *expected, [p.name for p in tiny_pngs])  # one split: never None


@settings(max_examples=25, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(csv_rows(4, kinds=CSV_BAD), max_size=6))
def test_csv_adapter_with_only_bad_rows_raises_user_error(tiny_pngs, rows):
    with tempfile.TemporaryDirectory() as d:
        manifest = Path(d) / "labels.csv"
        manifest.write_text(
            "path,label,valence,arousal,split\n" + "\n".join(_fill(r, tiny_pngs, d) for r, _ in rows) + "\n",
            encoding="utf-8",
        )
        with pytest.raises(UserError):
            _load("csv", manifest)


# Regressions: each of these once lost good rows or crashed a reader.


def test_csv_superscript_digit_label_is_a_counted_drop(tiny_pngs, tmp_path):
    m = tmp_path / "labels.csv"
    m.write_text(f"path,label\n{tiny_pngs[0]},happy\n{tiny_pngs[1]},\u00b2\n", encoding="utf-8")
    ds = _load("csv", m)
    assert len(ds.manifest) == 1 and sum(ds.dropped.values()) == 1


def test_csv_first_row_with_extra_fields_keeps_the_good_rows(tiny_pngs, tmp_path):
    m = tmp_path / "labels.csv"
    m.write_text(f"path,label\n{tiny_pngs[0]},happy,x,y\n{tiny_pngs[1]},sad\n", encoding="utf-8")
    ds = _load("csv", m)
    assert [Path(p).name for p in ds.manifest["path"]] == [tiny_pngs[1].name]
    assert sum(ds.dropped.values()) == 1


@pytest.mark.parametrize(
    "first_row, kept",
    [
        ("junk,1,2", 2),  # too short: dropped, the two good rows kept
        ("{good},7", 1),  # one column too many: dropped
    ],
)
def test_ferplus_malformed_first_row_is_dropped_and_counted(tiny_pngs, tmp_path, first_row, kept):
    folder = tmp_path / "fp" / "FER2013Train"
    folder.mkdir(parents=True)
    shutil.copyfile(tiny_pngs[0], folder / "img0.png")
    shutil.copyfile(tiny_pngs[1], folder / "img1.png")
    good = 'img0.png,"(0, 0, 48, 48)",6,2,1,1,0,0,0,0,0,0'
    other = good.replace("img0", "img1")  # another image: a repeated one would be a counted duplicate
    rows = [first_row.format(good=good), good] + ([other] if kept == 2 else [])
    (folder / "label.csv").write_text("\n".join(rows) + "\n")
    ds = _load("ferplus", tmp_path / "fp")
    assert len(ds.manifest) == kept and sum(ds.dropped.values()) == 1


# --------------------------------------------------------------------------- 8. broken images in a training set


def test_training_skips_broken_images(tmp_path, one_thread):
    from ensemble.experiment import open_experiment
    from stages.flat import fit_flat

    root = tmp_path / "faces"
    rng = np.random.default_rng(0)
    n_good = {}
    for split, per_class in (("train", 6), ("val", 2), ("test", 2)):
        for cls in ("happy", "sad", "angry"):
            for i in range(per_class):
                arr = rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)
                p = root / split / cls / f"{cls}{i}.png"
                p.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(arr).save(p)
            n_good[split] = n_good.get(split, 0) + per_class
    good_png = (root / "train" / "happy" / "happy0.png").read_bytes()
    (root / "train" / "happy" / "empty.jpg").write_bytes(b"")
    (root / "train" / "sad" / "notes.png").write_text("this is text, not a PNG\n")
    (root / "train" / "angry" / "cut.png").write_bytes(good_png[: len(good_png) // 2])
    (root / "val" / "sad" / "empty.jpg").write_bytes(b"")
    cfg = load_config(
        None,
        [
            "data.format=folder",
            f"data.root={json.dumps(str(root))}",
            f"data.image_size={SIZE}",
            f"data.cache_dir={json.dumps(str(tmp_path / 'cache'))}",
            "model.backbone=tinyvgg",
            "model.hidden=16",
            "train.epochs=1",
            "train.batch_size=8",
            "train.device=cpu",
            "train.threads=1",
            "train.precision=fp32",
        ],
    )
    run = tmp_path / "run"
    with pytest.warns(UserWarning, match=r"skipped 4 unreadable image\(s\)"):
        exp = open_experiment(cfg, run, log=lambda m: None, progress=False)
    assert len(exp.manifest) == sum(n_good.values()) + 4  # broken files are listed, then masked
    assert int((~exp.images.ok).sum()) == 4
    metrics = fit_flat(exp, log=lambda m: None)
    on_disk = json.loads((run / "flat" / "metrics.json").read_text())
    assert on_disk["skipped_unreadable"] == metrics["skipped_unreadable"] == 3  # the training split's
    assert on_disk["val"]["n"] == n_good["val"]  # the broken val image is not scored
    assert on_disk["test"]["n"] == n_good["test"]
    assert [int(r["epoch"]) for r in _history(run / "flat")] == [1]
