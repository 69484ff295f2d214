"""Experts that start from the flat model: the head restricted to their classes, kept only if
training beats it inside their true neighborhood on the selection split."""

import json

import numpy as np
import pytest
import torch

from ensemble.artifacts import load_weights, sha256_file, write_json
from ensemble.config import load_config

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]


@pytest.fixture(scope="module")
def run_from_flat(tmp_path_factory, one_thread):
    from ensemble.experiment import open_experiment
    from ensemble.routing import fit_experts_and_router
    from stages.flat import fit_flat
    from stages.stage1 import fit_stage1

    root = tmp_path_factory.mktemp("from_flat")
    cfg = load_config(
        None,
        [
            "data.format=synthetic",
            "data.n_synthetic=600",
            "data.synthetic_size=32",
            "data.image_size=32",
            f"data.cache_dir={json.dumps(str(root / 'cache'))}",
            "model.backbone=tinyvgg",
            "model.hidden=32",
            "train.epochs=3",
            "train.batch_size=32",
            "train.device=cpu",
            "train.precision=fp32",
            "train.optimizer=adamw",
            "train.lr=0.003",
            "experts.min_count=5",
            'experts.model.trunk_from="flat"',
            'stage1.model.trunk_from="flat"',
        ],
    )
    logs = []
    exp = open_experiment(cfg, root / "run", log=logs.append, progress=False)
    fit_flat(exp, log=logs.append)
    fit_stage1(exp, log=logs.append)
    index = fit_experts_and_router(exp, log=logs.append)["experts"]
    return {"exp": exp, "run": root / "run", "index": index, "logs": logs}


def _networks(run):
    from stages.neural import load_network

    index = json.loads((run / "experts" / "index.json").read_text())
    return [(e, *load_network(run / "experts" / str(e["region"]), run)) for e in index["experts"] if not e["constant"]]


def test_the_restricted_head_is_the_flat_model_restricted_to_the_classes(run_from_flat):
    from ensemble.classes import CLASSES
    from stages.experts import restricted_flat_head
    from stages.neural import load_network

    run, exp = run_from_flat["run"], run_from_flat["exp"]
    flat, _ = load_network(run / "flat", run)
    x = torch.randn(5, 3, 32, 32)
    for e, net, meta in _networks(run):
        cls = [CLASSES.index(c) for c in e["classes"]]
        net.head.load_state_dict(restricted_flat_head(run, exp.cfg.for_stage("experts"), cls))
        with torch.no_grad():
            p_flat = torch.softmax(flat.eval()(x), 1)[:, cls]
            p_restricted = torch.softmax(net.eval()(x), 1)
        torch.testing.assert_close(p_restricted, p_flat / p_flat.sum(1, keepdim=True))
        assert meta["init"] == "flat"


def test_an_expert_is_kept_only_if_it_beats_the_restricted_flat_model(run_from_flat):
    from ensemble.classes import CLASSES
    from stages.experts import restricted_flat_head

    run, exp, index = run_from_flat["run"], run_from_flat["exp"], run_from_flat["index"]
    networks = _networks(run)
    assert networks, "no expert network to check"
    for e, _, meta in networks:
        fig = json.loads((run / "experts" / str(e["region"]) / "metrics.json").read_text())["true_neighborhood_val"]
        assert fig == index["experts"][e["region"]]["true_neighborhood_val"] and meta["kept"] == fig["kept"]
        assert fig["n"] > 0
        cls = [CLASSES.index(c) for c in e["classes"]]
        restricted = restricted_flat_head(run, exp.cfg.for_stage("experts"), cls)
        weights = load_weights(run / "experts" / str(e["region"]))
        same = all(torch.equal(weights[f"head.{k}"], v) for k, v in restricted.items())
        if fig["expert"] > fig["restricted_flat"]:
            assert fig["kept"] == "expert" and not same
        else:  # ties go to the flat model: nothing gained by training
            assert fig["kept"] == "restricted flat" and same
        said = [m for m in run_from_flat["logs"] if m.startswith(f"expert {e['region']}: in its true neighborhood")]
        assert len(said) == 1 and ("replaces it" in said[0]) == (fig["kept"] == "restricted flat")


def test_a_worse_expert_is_replaced_by_the_restricted_flat_model(run_from_flat, tmp_path):
    """An expert that always says its first class (balanced accuracy 1 / classes present) against
    the restricted flat model: the better on the selection faces is published, ties to flat."""
    import shutil

    from ensemble.classes import CLASSES
    from ensemble.engine import evaluate
    from ensemble.metrics import classification_metrics
    from ensemble.tasks import CLASSIFY
    from stages.experts import _keep_or_restricted_flat, keep_score, restricted_flat_head

    run, exp = tmp_path / "run", run_from_flat["exp"]
    shutil.copytree(run_from_flat["run"], run)
    e, net, meta = _networks(run)[0]
    r, cls = e["region"], [CLASSES.index(c) for c in e["classes"]]
    folder = run / "experts" / str(r)
    local = {c: i for i, c in enumerate(cls)}
    vi = exp.idx("val")
    idx = vi[np.isin(exp.manifest["label"].to_numpy()[vi], cls)]
    y = np.array([local[int(c)] for c in exp.manifest["label"].to_numpy()[idx]])
    # the "trained" expert: the output layer reads nothing, the bias names the first class
    head = dict(net.head.state_dict())
    *_, w, b = head
    head[w] = torch.zeros_like(head[w])
    head[b] = torch.tensor([10.0] + [0.0] * (len(cls) - 1))
    state = {f"head.{k}": v for k, v in head.items()}
    torch.save(state, folder / "weights.pt")  # recorded in its meta.json as if trained so
    emeta = json.loads((folder / "meta.json").read_text())
    emeta["files"]["weights.pt"] = sha256_file(folder / "weights.pt")
    write_json(folder / "meta.json", emeta)
    restricted = restricted_flat_head(run, exp.cfg.for_stage("experts"), cls)
    logs = []
    fig = _keep_or_restricted_flat(exp, folder, r, e["classes"], restricted, idx, y, {"val": (idx, y)}, logs.append)
    assert fig["expert_balanced_accuracy"] == pytest.approx(1 / len(np.unique(y)))
    says_first = classification_metrics(y, np.zeros_like(y), e["classes"])  # what the constant expert scores
    assert fig["expert"] == pytest.approx(keep_score(says_first, e["classes"], exp.cfg.experts.keep_min_faces)[0])
    net.head.load_state_dict(restricted)
    want = evaluate(net, CLASSIFY, exp.images, idx, y, e["classes"], meta["mean"], meta["std"], exp.rt)
    assert fig["restricted_flat_balanced_accuracy"] == pytest.approx(want["balanced_accuracy"])
    score, rule = keep_score(want, e["classes"], exp.cfg.experts.keep_min_faces)
    assert (fig["restricted_flat"], fig["rule"]) == (pytest.approx(score), rule)
    weights = load_weights(folder)
    if fig["restricted_flat"] >= fig["expert"]:
        assert fig["kept"] == "restricted flat"
        assert all(torch.equal(weights[f"head.{k}"], v) for k, v in restricted.items())
        saved = json.loads((folder / "metrics.json").read_text())
        assert saved["val"]["balanced_accuracy"] == pytest.approx(want["balanced_accuracy"])
    else:
        assert fig["kept"] == "expert" and torch.equal(weights[f"head.{b}"], head[b])
