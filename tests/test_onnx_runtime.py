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
from ensemble.onnx_runtime import STAGE, OnnxHierarchy, choose_backend, resolve_precision
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
    auto, on_torch = ensemble.load(run, precision="fp32"), ensemble.load(run, backend="torch")
    assert auto.backend == "onnx" and on_torch.backend == "torch" and "backend='onnx'" in repr(auto)
    assert on_torch.net.precision == "fp32"  # precision auto: torch has no int8 path
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


# --------------------------------------------------------------------------- the int8 graph
def test_the_int8_graph_reads_the_run_weights_and_answers_near_fp32(run, capsys):
    import onnx

    code, out, err = run_cli(["export", "--run", str(run), "--format", "onnx-run"], capsys)
    assert code == 0, err
    assert "hierarchy-int8.onnx" in out
    meta = json.loads((run / STAGE / "meta.json").read_text())
    assert meta["int8"]["calibration"]["split"] == "train" and meta["int8"]["calibration"]["faces"] > 0
    graph = onnx.load(run / STAGE / "hierarchy-int8.onnx", load_external_data=False)
    big = [i.name for i in graph.graph.initializer if np.prod(i.dims) > 4096 and i.data_location != 1]
    assert not big, big  # every weight is read from the run's files, none stored again
    convs = [n for n in graph.graph.node if n.op_type == "Conv"]
    made_by = {o: n for n in graph.graph.node for o in n.output}
    first, *rest = convs
    assert first.input[0] == "faces" and made_by[first.input[1]].op_type == "Mul"  # reads the image, in float
    assert rest and all(made_by[c.input[1]].op_type == "DequantizeLinear" for c in rest)
    assert all(made_by[c.input[0]].op_type == "DequantizeLinear" for c in rest)  # uint8 activations in
    oh, o8 = OnnxHierarchy.load(run), OnnxHierarchy.load(run, precision="int8")
    assert o8.precision == "int8" and oh.precision == "fp32"
    x = uint8_to_input(_faces(32, size=oh.size), oh.mean, oh.std)
    (p, va, w), (p8, va8, w8) = oh.infer(x), o8.infer(x)
    assert p8.shape == p.shape and va8.shape == va.shape and w8.shape == w.shape
    np.testing.assert_allclose(p8.sum(1), 1, atol=1e-5)
    assert np.abs(p8 - p).max() < 0.1 and np.abs(va8 - va).max() < 0.1  # 8-bit steps, not another model
    assert not np.array_equal(p8, p)  # and really the integer path


def test_folding_a_batch_norm_into_its_convolution_keeps_the_output():
    """Conv (with and without bias) -> BatchNormalization (default and other epsilon) against
    the folded Conv, both on ONNX Runtime with its own optimisations off."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from ensemble.quantize import fold_batch_norms

    rng = np.random.default_rng(0)
    for bias, eps in ((True, None), (False, 1e-3)):
        values = {
            "w": rng.normal(size=(4, 3, 3, 3)).astype(np.float32),
            "gamma": rng.uniform(0.5, 2, 4).astype(np.float32),
            "beta": rng.normal(size=4).astype(np.float32),
            "mean": rng.normal(size=4).astype(np.float32),
            "var": rng.uniform(0.1, 2, 4).astype(np.float32),
        }
        if bias:
            values["b"] = rng.normal(size=4).astype(np.float32)
        conv = helper.make_node("Conv", ["x", "w", *(["b"] if bias else [])], ["c"], pads=[1, 1, 1, 1], name="conv")
        bn = helper.make_node(
            "BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["y"], **({"epsilon": eps} if eps else {})
        )
        graph = helper.make_graph(
            [conv, bn],
            "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 5, 5])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 5, 5])],
            [numpy_helper.from_array(v, k) for k, v in values.items()],
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        folded = onnx.ModelProto()
        folded.CopyFrom(model)
        assert list(fold_batch_norms(folded, values).values()) == [("w", "conv::bn_scale")]
        assert [n.op_type for n in folded.graph.node] == ["Mul", "Conv"]
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        x = rng.normal(size=(1, 3, 5, 5)).astype(np.float32)
        want, got = (
            ort.InferenceSession(m.SerializeToString(), options).run(None, {"x": x})[0] for m in (model, folded)
        )
        np.testing.assert_allclose(got, want, atol=1e-4)


def test_the_int8_graph_becomes_integer_convolutions_when_loaded(run, tmp_path, capsys, monkeypatch):
    import onnx
    import onnxruntime as ort

    run_cli(["export", "--run", str(run), "--format", "onnx-run"], capsys)
    saved = tmp_path / "optimized.onnx"

    class Options(ort.SessionOptions):
        def __init__(self):
            super().__init__()
            self.optimized_model_filepath = str(saved)

    monkeypatch.setattr(ort, "SessionOptions", Options)
    OnnxHierarchy.load(run, precision="int8")
    ops = [n.op_type for n in onnx.load(saved, load_external_data=False).graph.node]
    graph = onnx.load(run / STAGE / "hierarchy.onnx", load_external_data=False)
    n_convs = sum(n.op_type == "Conv" for n in graph.graph.node)
    assert ops.count("QLinearConv") == n_convs - 1  # every convolution but the first, which reads the image


def test_a_damaged_int8_entry_is_one_line_and_compare_goes_on_without_it(run, tmp_path, capsys):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    run_cli(["export", "--run", str(copy), "--format", "onnx-run"], capsys)
    meta_file = copy / STAGE / "meta.json"
    meta = json.loads(meta_file.read_text())
    for entry in ("not a dict", {"external": {"../../x/weights.pt": ["w"]}}):
        meta_file.write_text(json.dumps({**meta, "int8": entry}))
        with pytest.raises(UserError, match="not an ONNX stage's description"):
            OnnxHierarchy.load(copy, precision="int8")
    code, out, err = run_cli(["compare", "--run", str(copy), "--split", "val", "--out", str(tmp_path / "r")], capsys)
    assert code == 0 and "the int8 graph is not scored" in out, err
    assert "int8" not in json.loads((tmp_path / "r" / "metrics.json").read_text())["models"]


def test_int8_is_asked_for_and_refused_in_one_line(run, tmp_path, capsys):
    import ensemble

    run_cli(["export", "--run", str(run), "--format", "onnx-run"], capsys)
    kw = dict(flat=False, router=None, device="cpu", precision="int8")
    assert choose_backend("auto", run, **kw) == "onnx" == choose_backend("onnx", run, **kw)
    assert choose_backend("auto", run, **{**kw, "device": "auto"}) == "onnx"  # int8 is a CPU path
    for change, why in (
        ({"backend": "torch"}, "int8 runs on ONNX Runtime only"),
        ({"flat": True}, "precision int8: the ONNX stage holds the hierarchy"),
        ({"device": "cuda"}, "precision int8: ONNX Runtime runs here on the CPU only"),
    ):
        backend = change.pop("backend", "auto")
        with pytest.raises(UserError, match=why):
            choose_backend(backend, run, **{**kw, **change})
    code, out, err = run_cli(
        ["predict", str(_png(tmp_path)), "--run", str(run), "--no-detect", "--precision", "int8"], capsys
    )
    assert code == 0 and "face.png" in out, err
    assert ensemble.load(run, precision="int8").predict(_faces(1)[0], detector="none")[0]["emotion"]
    # precision auto (the default) is int8 wherever int8 can run as asked, fp32 everywhere else
    assert "precision='int8'" in repr(ensemble.load(run))
    auto = dict(flat=False, router=None, device="cpu")
    assert resolve_precision("auto", "auto", run, **auto) == "int8" == resolve_precision("auto", "onnx", run, **auto)
    for backend, change in (
        ("torch", {}),
        ("auto", {"flat": True}),
        ("auto", {"device": "cuda"}),
        ("auto", {"device": "auto"}),
    ):
        assert resolve_precision("auto", backend, run, **{**auto, **change}) == "fp32", (backend, change)
    assert resolve_precision("bf16", "auto", run, **auto) == "bf16"
    assert ensemble.load(run, flat=True).net.precision == "fp32"
    # a run whose training faces cannot be read here gets the fp32 graph only, and says why
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    shutil.rmtree(copy / STAGE)
    (copy / "config.json").unlink()
    code, out, err = run_cli(["export", "--run", str(copy), "--format", "onnx-run"], capsys)
    assert code == 0 and "no int8 graph" in out and "records no config.json" in out, err
    assert ensemble.load(copy).backend == "onnx" and ensemble.load(copy).net.precision == "fp32"  # auto: fp32 here
    code, out, err = run_cli(["predict", str(_png(tmp_path)), "--run", str(copy), "--no-detect"], capsys)
    assert code == 0 and "face.png" in out and not err, err
    with pytest.raises(UserError, match="precision int8: .* has no int8 graph .*--format onnx-run"):
        ensemble.load(copy, precision="int8")
    code, _, err = run_cli(
        ["predict", str(_png(tmp_path)), "--run", str(copy), "--no-detect", "--precision", "int8"], capsys
    )
    assert code == 2 and "has no int8 graph" in err and "Traceback" not in err


def test_compare_scores_the_int8_graph_beside_fp32(run, tmp_path, capsys):
    run_cli(["export", "--run", str(run), "--format", "onnx-run"], capsys)
    code, out, err = run_cli(["compare", "--run", str(run), "--split", "val", "--out", str(tmp_path / "r")], capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert "int8" in report["models"] and report["vs_flat"]["int8"]["baseline"] == "mixed+la"
    assert 0 <= report["vs_flat"]["int8"]["agreement"] <= 1
    assert "\nint8 " in out and "| int8 |" in (tmp_path / "r" / "report.md").read_text()


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
    assert "flat/weights.pt" in meta["external"] and "flat/weights.pt" in meta["int8"]["external"]
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
        "print(m.backend, m.net.precision, faces[0]['emotion'], len(faces))\n"
        "print(sorted(x for x in ('torch', 'torchvision', 'pandas', 'sklearn') if x in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120, check=False
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-2:] == ["onnx int8 happy 1", "[]"], out.stdout


def test_the_bundled_model_answers_in_int8_by_default_and_finds_the_astronaut_happy(tmp_path):
    from skimage import data

    import ensemble

    model = ensemble.load()  # precision auto: int8 on the CPU
    assert model.backend == "onnx" and model.net.precision == "int8"
    faces = model.predict(data.astronaut())
    assert [f["emotion"] for f in faces] == ["happy"]


def test_the_bundled_onnx_stage_matches_its_torch_hierarchy():
    from ensemble import bundle

    run = bundle.default_run()
    oh, hp = OnnxHierarchy.load(run), HierarchicalPredictor.load(run)
    x = uint8_to_input(_faces(16, hp.size, seed=1), hp.mean, hp.std)
    (p, va, w), (q, vb, wb) = oh.infer(x), hp.infer(x)
    np.testing.assert_allclose(p, q, atol=1e-5)
    np.testing.assert_allclose(va, vb, atol=1e-5)
    np.testing.assert_array_equal(w.argmax(1), wb.argmax(1))
