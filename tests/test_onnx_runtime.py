"""The torch-free inference path: torch's state_dict files read without torch, the ``onnx`` stage
written from the torch hierarchy itself, and ONNX Runtime answering as torch does."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_cli, train_tiny_hierarchy

from ensemble.errors import UserError
from ensemble.images import uint8_to_input
from ensemble.onnx_runtime import STAGE, OnnxHierarchy, choose_backend
from ensemble.predictors import HierarchicalPredictor
from ensemble.statefile import read_state

pytest.importorskip("onnxruntime")  # a dependency of the package: present wherever it is installed
REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- torch.save files without torch
def test_a_state_dict_reads_as_torch_load_does(tmp_path):
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    state = {
        "half": torch.randn(3, 4).half(),
        "transposed": base.t(),  # strides that are not contiguous
        "slice": base[1:, 2:4],  # an offset into a storage another tensor shares
        "scalar": torch.tensor(5),
        "bools": torch.tensor([True, False]),
        "longs": torch.arange(3),
        "empty": torch.zeros(0, 3),
        "double": torch.rand(2, dtype=torch.float64),
    }
    torch.save(state, tmp_path / "w.pt")
    got = read_state(tmp_path / "w.pt")
    assert list(got) == list(state)
    for key, want in state.items():
        assert got[key].dtype == want.numpy().dtype and got[key].shape == tuple(want.shape), key
        np.testing.assert_array_equal(got[key], want.numpy())


def test_a_file_that_asks_for_anything_but_tensors_is_refused(tmp_path):
    torch.save({"w": torch.ones(2), "f": print}, tmp_path / "code.pt")  # weights_only would refuse it too
    torch.save({"w": torch.ones(2, dtype=torch.bfloat16)}, tmp_path / "bf16.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a zip file")
    torch.save(torch.ones(2), tmp_path / "bare.pt")
    for name, why in (
        ("code.pt", r"\.print is not a tensor"),
        ("bf16.pt", "BFloat16Storage"),
        ("junk.pt", "cannot read"),
        ("bare.pt", "not a dict of tensors"),
    ):
        with pytest.raises(UserError, match=why) as info:
            read_state(tmp_path / name)
        assert "\n" not in str(info.value)


def _crafted(path, entries: dict) -> Path:
    """A torch.save-style archive whose pickle is built opcode by opcode (what torch would never
    write): ``entries`` maps names to (offset, size, stride) of a tensor on a 5-float storage."""
    import pickle as P
    import zipfile

    def text(x):
        return P.SHORT_BINUNICODE + bytes([len(x)]) + x.encode()

    def glob(module, name):
        return P.GLOBAL + f"{module}\n{name}\n".encode()

    def tup(*items):
        return P.MARK + b"".join(items) + P.TUPLE

    def num(n):
        return P.INT + f"{n}\n".encode()

    storage = tup(text("storage"), glob("torch", "FloatStorage"), text("0"), text("cpu"), num(5)) + P.BINPERSID
    body = P.EMPTY_DICT + P.MARK
    for name, (offset, size, stride) in entries.items():
        args = tup(storage, num(offset), tup(*map(num, size)), tup(*map(num, stride)), P.NEWFALSE, P.NONE)
        body += text(name) + glob("torch._utils", "_rebuild_tensor_v2") + args + P.REDUCE
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", P.PROTO + b"\x02" + body + P.SETITEMS + P.STOP)
        z.writestr("archive/byteorder", b"little")
        z.writestr("archive/data/0", np.arange(5, dtype=np.float32).tobytes())
    return path


def test_a_crafted_tensor_cannot_reach_outside_its_storage(tmp_path):
    got = read_state(_crafted(tmp_path / "ok.pt", {"w": (1, (2, 2), (2, 1)), "e": (9, (0, 3), (3, 1))}))
    np.testing.assert_array_equal(got["w"], [[1, 2], [3, 4]])
    assert got["e"].shape == (0, 3)  # an empty view past its storage, as torch allows
    for name, entry, why in (
        ("negative stride", (4, (5,), (-1,)), "stride is not made of non-negative"),
        ("negative offset", (-10, (14,), (1,)), "offset is not made of non-negative"),
        ("past the end", (3, (3,), (1,)), "reaches past its storage"),
        ("huge", (0, (10**7, 10**6), (0, 0)), "a tensor of 10000000000000 elements"),
        ("rank mismatch", (0, (2, 2), (1,)), "size and stride disagree"),
    ):
        with pytest.raises(UserError, match=why):
            read_state(_crafted(tmp_path / f"{name}.pt", {"w": entry}))


# --------------------------------------------------------------------------- a trained run's onnx stage
@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny hierarchy whose answer mixes the flat model in (its own head on the shared trunk)."""
    root = tmp_path_factory.mktemp("onnx-run")
    train_tiny_hierarchy(root)
    return root / "run"


def _faces(n=7, size=32, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_the_onnx_stage_answers_as_the_torch_hierarchy(run, capsys):
    code, out, err = run_cli(["export", "--run", str(run), "--format", "onnx-run"], capsys)
    assert code == 0, err
    assert (run / STAGE / "meta.json").is_file() and "weights read from flat/weights.pt" in out
    meta = json.loads((run / STAGE / "meta.json").read_text())
    for rel in meta["external"]:  # a refit of any stage it reads (a borrowed trunk too) makes it stale
        assert rel.replace("weights.pt", "meta.json") in meta["sources"], rel
    assert {"stage1/meta.json", "neighborhoods/meta.json", "router/meta.json"} <= set(meta["sources"])
    graph = (run / STAGE / "hierarchy.onnx").stat().st_size
    weights = sum(f.stat().st_size for f in run.rglob("weights.pt"))
    assert graph < weights / 4, (graph, weights)  # the weights are read from the run, not copied
    hp = HierarchicalPredictor.load(run)
    oh = OnnxHierarchy.load(run)
    assert oh.mode == hp.mode == meta["mode"] and oh.expert_classes == hp.expert_classes
    x = uint8_to_input(_faces(size=hp.size), hp.mean, hp.std)
    for got, want in zip(oh.infer(x), hp.infer(x)):
        np.testing.assert_allclose(got, want, atol=1e-5)
    for got, want in zip(oh.infer(x[:0]), hp.infer(x[:0])):  # no faces: empty arrays of the right width
        assert got.shape == want.shape
    many = np.concatenate([x] * 10)  # more than one batch of 64
    np.testing.assert_allclose(oh.infer(many)[0], hp.infer(many)[0], atol=1e-5)


def test_the_api_chooses_onnx_where_it_can_and_says_why_not(run, capsys):
    import ensemble

    run_cli(["export", "--run", str(run), "--format", "onnx-run"], capsys)
    face = _faces(1)[0]
    auto, on_torch = ensemble.load(run), ensemble.load(run, backend="torch")
    assert auto.backend == "onnx" and on_torch.backend == "torch" and "backend='onnx'" in repr(auto)
    a, b = auto.predict(face, detector="none")[0], on_torch.predict(face, detector="none")[0]
    assert a["emotion"] == b["emotion"] and a["neighborhood"] == b["neighborhood"]
    assert abs(a["valence"] - b["valence"]) < 1e-4
    kw = dict(flat=False, router=None, device="cpu", precision="fp32")
    assert choose_backend("auto", run, **{**kw, "flat": True}) == "torch"
    assert choose_backend("auto", run, **{**kw, "precision": "bf16"}) == "torch"
    other = "soft" if auto.net.mode == "hard" else "hard"
    assert choose_backend("auto", run, **{**kw, "router": other}) == "torch"
    for change, why in (
        ({"flat": True}, "the flat model runs on torch"),
        ({"device": "cuda"}, "on the CPU only"),
        ({"router": other}, f"not {other!r}"),
    ):
        with pytest.raises(UserError, match=why):
            choose_backend("onnx", run, **{**kw, **change})
    with pytest.raises(UserError, match="backend must be one of auto, torch, onnx"):
        choose_backend("tensorrt", run, **kw)
    from ensemble.cli import predict_cmd
    from ensemble.onnx_runtime import BACKENDS

    option = next(p for p in predict_cmd.params if p.name == "backend")
    assert sorted(option.type.choices) == sorted(BACKENDS) and option.default == "auto"


def test_a_stale_or_missing_onnx_stage_is_refused_in_one_line(run, tmp_path, capsys):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    shutil.rmtree(copy / STAGE, ignore_errors=True)
    code, _, err = run_cli(
        ["predict", str(_png(tmp_path)), "--run", str(copy), "--no-detect", "--backend", "onnx"], capsys
    )
    assert code == 2 and "has no onnx/ stage" in err and "--format onnx-run" in err
    code, _, err = run_cli(["export", "--run", str(copy), "--format", "onnx-run", "--out", "x.onnx"], capsys)
    assert code == 2 and "no --out" in err
    code, _, err = run_cli(["export", "--run", str(copy), "--format", "onnx"], capsys)
    assert code == 2 and "needs --out" in err
    run_cli(["export", "--run", str(copy), "--format", "onnx-run"], capsys)
    code, _, err = run_cli(["export", "--format", "onnx-run"], capsys)
    assert code == 2 and "named by --run" in err  # never into the installed bundle by default
    router = copy / "router" / "meta.json"  # a refit router: the graph holds the old one's constants
    router.write_text(router.read_text().replace("{", '{"refit": 1, ', 1))
    with pytest.raises(UserError, match=r"router/meta.json changed; rewrite it") as info:
        OnnxHierarchy.load(copy)
    assert "\n" not in str(info.value)
    import ensemble

    with pytest.warns(UserWarning, match="router/meta.json changed.*running on torch"):
        assert ensemble.load(copy).backend == "torch"  # auto: the run still answers, as it did before the stage
    with pytest.raises(UserError, match="backend onnx: .*router/meta.json changed"):
        ensemble.load(copy, backend="onnx")


def test_a_stage_that_names_files_outside_its_run_is_refused(run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    if not (copy / STAGE).is_dir():
        from ensemble.export import write_onnx_stage

        write_onnx_stage(copy, log=lambda m: None)
    meta_file = copy / STAGE / "meta.json"
    meta = json.loads(meta_file.read_text())
    meta["external"] = {"../../elsewhere/weights.pt": ["w"], **meta["external"]}
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(UserError, match="not an ONNX stage's description"):
        OnnxHierarchy.load(copy)


def _png(tmp_path):
    from PIL import Image

    path = tmp_path / "face.png"
    Image.fromarray(_faces(1)[0]).save(path)
    return path


def test_bundling_without_the_onnx_package_still_bundles_and_says_so(run, tmp_path, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnx" else real(name, *a))
    out = tmp_path / "bundled"
    code, so, err = run_cli(["bundle", "--run", str(run), "--out", str(out)], capsys)
    assert code == 0, err
    assert "no onnx stage in the bundle" in so and "pip install onnx" in so
    assert not (out / STAGE).exists() and not list(out.glob(".onnx*"))
    import ensemble

    assert ensemble.load(out).backend == "torch"


def test_bundling_writes_the_onnx_stage(run, tmp_path, capsys):
    out = tmp_path / "bundled"
    code, _, err = run_cli(["bundle", "--run", str(run), "--out", str(out), "--command", "ensemble fit-flat"], capsys)
    assert code == 0, err
    meta = json.loads((out / STAGE / "meta.json").read_text())
    assert "flat/weights.pt" in meta["external"]
    x = uint8_to_input(_faces(), *[tuple(v) for v in (meta_of(out)["mean"], meta_of(out)["std"])])
    np.testing.assert_allclose(
        OnnxHierarchy.load(out).infer(x)[0], HierarchicalPredictor.load(out).infer(x)[0], atol=1e-5
    )


def meta_of(run):
    return json.loads((run / "stage1" / "meta.json").read_text())


# --------------------------------------------------------------------------- the bundled model
def test_the_bundled_model_answers_a_photo_without_importing_torch(tmp_path):
    """torch's import alone holds ~480 MB with its CUDA build: the default answer never pays it."""
    from PIL import Image
    from skimage import data

    Image.fromarray(data.astronaut()).save(tmp_path / "a.jpg")
    code = (
        "import sys\n"
        "import ensemble\n"
        "m = ensemble.load()\n"
        f"faces = m.predict({str(tmp_path / 'a.jpg')!r})\n"
        "print(m.backend, faces[0]['emotion'], len(faces))\n"
        "print(sorted(x for x in ('torch', 'torchvision', 'pandas', 'sklearn') if x in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120, check=False
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-2:] == ["onnx happy 1", "[]"], out.stdout


def test_the_bundled_onnx_stage_matches_its_torch_hierarchy():
    from ensemble import bundle

    run = bundle.default_run()
    oh, hp = OnnxHierarchy.load(run), HierarchicalPredictor.load(run)
    x = uint8_to_input(_faces(16, hp.size, seed=1), hp.mean, hp.std)
    (p, va, w), (q, vb, wb) = oh.infer(x), hp.infer(x)
    np.testing.assert_allclose(p, q, atol=1e-5)
    np.testing.assert_allclose(va, vb, atol=1e-5)
    np.testing.assert_array_equal(w.argmax(1), wb.argmax(1))
