"""Export of the whole hierarchy (ONNX, TorchScript) and the shared trunk."""

import numpy as np
import pytest
import torch
from conftest import TINY_SYNTHETIC

from ensemble.cli import main
from ensemble.config import load_config
from ensemble.predictors import FlatPredictor, HierarchicalPredictor


@pytest.fixture(scope="module", params=["gmm", "kmeans"])
def shared_run(request, tmp_path_factory):
    """A tiny hierarchy whose stage 1 and experts are heads on the flat model's trunk."""
    from ensemble.experiment import open_experiment
    from ensemble.routing import calibrate_router
    from stages.experts import fit_experts
    from stages.flat import fit_flat
    from stages.stage1 import fit_stage1

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp(f"export-{request.param}")
    cfg = load_config(
        None,
        [
            *TINY_SYNTHETIC,
            f"data.cache_dir={root / 'cache'}",
            "experts.min_count=5",
            f"neighborhoods.method={request.param}",
            "neighborhoods.k=3",
            "stage1.model.trunk_from=flat",
            "experts.model.trunk_from=flat",
        ],
    )
    exp = open_experiment(cfg, root / "run", log=lambda m: None, progress=False)
    fit_flat(exp, log=lambda m: None)
    fit_stage1(exp, log=lambda m: None)
    fit_experts(exp, log=lambda m: None)
    calibrate_router(exp, lambda m: None)
    torch.set_num_threads(before)
    faces = exp.manifest[exp.manifest["split"] == "test"]["path"].tolist()[:6]
    return root / "run", faces


def test_shared_trunk_runs_and_is_stored_once(shared_run):
    run, _ = shared_run
    hp = HierarchicalPredictor.load(run)
    assert len(hp.net.trunks) == 1  # stage 1 and every expert share the flat trunk
    for folder in [run / "stage1", *(p for p in (run / "experts").glob("[0-9]*"))]:
        if not (folder / "weights.pt").is_file():
            continue  # a one-class expert has no network
        keys = torch.load(folder / "weights.pt", weights_only=True).keys()
        assert keys and all(k.startswith("head.") for k in keys), folder
    flat_keys = torch.load(run / "flat" / "weights.pt", weights_only=True).keys()
    assert any(k.startswith("trunk.") for k in flat_keys)


@pytest.mark.parametrize("router", ["soft", "hard"])
def test_onnx_matches_predict_proba(shared_run, tmp_path, router):
    ort = pytest.importorskip("onnxruntime")
    run, faces = shared_run
    out = tmp_path / "h.onnx"
    main(["export", "--run", str(run), "--format", "onnx", "--out", str(out), "--router", router])
    assert out.is_file()
    hp = HierarchicalPredictor.load(run, router=router)
    x = hp.preprocess(faces)
    want = hp.predict_proba(faces, router=router)
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for batch in (x, x[:1], np.concatenate([x, x])):  # the batch dimension is dynamic
        got = sess.run(None, {"faces": batch})[0]
        assert got.shape == (len(batch), 8)
    got = sess.run(None, {"faces": x})[0]
    np.testing.assert_allclose(got, want, atol=1e-4)
    np.testing.assert_allclose(got.sum(1), 1.0, atol=1e-5)


def test_torchscript_matches_predict_proba(shared_run, tmp_path):
    run, faces = shared_run
    out = tmp_path / "h.pt"
    main(["export", "--run", str(run), "--format", "torchscript", "--out", str(out)])
    assert out.is_file()
    hp = HierarchicalPredictor.load(run)
    x = hp.preprocess(faces)
    got = torch.jit.load(str(out))(torch.from_numpy(x))  # no torch.no_grad() needed: an inference graph
    assert not got.requires_grad
    np.testing.assert_allclose(got.numpy(), hp.predict_proba(faces), atol=1e-4)


def test_export_of_a_missing_run_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "--run", str(tmp_path / "nothing"), "--out", str(tmp_path / "h.onnx")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:")


def test_flat_predictor_shares_preprocessing_with_hierarchy(shared_run):
    run, faces = shared_run
    flat, hp = FlatPredictor.load(run), HierarchicalPredictor.load(run)
    np.testing.assert_array_equal(flat.preprocess(faces), hp.preprocess(faces))
