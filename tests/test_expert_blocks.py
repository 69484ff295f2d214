"""Experts with blocks of their own (``experts.model.trainable = "blockN"``): each starts exactly
at the flat model restricted to its classes, trains its copy of the last block(s) and its head
from features cached at the boundary, is kept only if it beats that, and at inference reads the
shared trunk (run once per face) at the boundary."""

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import REPO, train_tiny_hierarchy

from ensemble.artifacts import load_weights, sha256_file, write_json
from ensemble.classes import CLASSES
from ensemble.config import load_config
from ensemble.errors import UserError

pytestmark = [pytest.mark.usefixtures("one_thread")]

#: 600 faces so that an expert can beat a one-epoch flat model inside its neighborhood
BLOCK_RUN = [
    "data.n_synthetic=600",
    "train.optimizer=adamw",
    "train.lr=0.003",
    "flat.train.epochs=1",
    "experts.train.epochs=4",
    "experts.model.trainable=block4",
]


@pytest.fixture(scope="module")
def block_run(tmp_path_factory, one_thread):
    root = tmp_path_factory.mktemp("blocks")
    logs = []
    exp, result = train_tiny_hierarchy(root, BLOCK_RUN, log=logs.append)
    return {"exp": exp, "run": root / "run", "index": result["experts"], "logs": logs}


def _experts(run):
    from stages.neural import load_network

    index = json.loads((run / "experts" / "index.json").read_text())
    return [(e, *load_network(run / "experts" / str(e["region"]), run)) for e in index["experts"] if not e["constant"]]


def _restricted(run, exp, classes):
    from stages.experts import restricted_flat_head

    return restricted_flat_head(run, exp.cfg.for_stage("experts"), [CLASSES.index(c) for c in classes])


@pytest.mark.slow
def test_a_block_expert_starts_exactly_at_the_restricted_flat_model(block_run):
    from stages.neural import build_stage_net, load_network

    run, exp = block_run["run"], block_run["exp"]
    cfg = exp.cfg.for_stage("experts")
    assert cfg.model.trainable == "block4"
    flat, _ = load_network(run / "flat", run)
    x = torch.randn(6, 3, 32, 32)
    for e, *_ in _experts(run):
        cls = [CLASSES.index(c) for c in e["classes"]]
        net, _ = build_stage_net(cfg, len(cls), run)
        net.head.load_state_dict(_restricted(run, exp, e["classes"]))
        assert net.n_frozen_blocks == 3  # blocks 1-3 borrowed (cached), block 4 and the head its own
        assert [any(p.requires_grad for p in b.parameters()) for b in net.trunk] == [False, False, False, True]
        with torch.no_grad():
            p_flat = torch.softmax(flat.eval()(x), 1)[:, cls]
            p_expert = torch.softmax(net.eval()(x), 1)
        torch.testing.assert_close(p_expert, p_flat / p_flat.sum(1, keepdim=True))


@pytest.mark.slow
def test_kept_block_experts_own_trained_blocks_and_fallbacks_are_heads(block_run):
    run, exp, index = block_run["run"], block_run["exp"], block_run["index"]
    flat_w = load_weights(run / "flat")
    kinds = set()
    for e, net, meta in _experts(run):
        fig = index["experts"][e["region"]]["true_neighborhood_val"]
        weights = load_weights(run / "experts" / str(e["region"]))
        assert meta["kept"] == fig["kept"] and meta["keep_rule"]
        if fig["kept"] == "expert":
            assert fig["expert"] > fig["restricted_flat"]
            assert meta["trainable"] == "block4" and index["experts"][e["region"]]["trainable"] == "block4"
            own = sorted({k.split(".")[1] for k in weights if k.startswith("trunk.")})
            assert own == ["3"]  # block 4 only; blocks 1-3 stay in the flat model's weights.pt
            assert any(not torch.equal(weights[k], flat_w[k]) for k in weights if k.startswith("trunk.3."))
            n_own = sum(p.numel() for p in [*net.trunk[3].parameters(), *net.head.parameters()])
            assert meta["n_own_params"] == n_own
        else:  # the restricted flat model: a head on the flat trunk, no copies of its blocks
            assert meta["trainable"] == "head" and meta["trained_trainable"] == "block4"
            assert not any(k.startswith("trunk.") for k in weights)
            restricted = _restricted(run, exp, e["classes"])
            assert all(torch.equal(weights[f"head.{k}"], v) for k, v in restricted.items())
        kinds.add(fig["kept"])
    assert "expert" in kinds, "no block expert was kept: the run does not exercise own blocks"
    said = [m for m in block_run["logs"] if "starts exactly at the flat model restricted to its classes" in m]
    assert len(said) == len(_experts(run))
    total = sum(m["n_own_params"] for _, _, m in _experts(run))
    assert any(m.startswith(f"experts: {total:,} parameters of their own") for m in block_run["logs"])


@pytest.mark.slow
@pytest.mark.parametrize("which", ["blocks", "bundled head-only"])
def test_the_hierarchy_runs_the_trunk_once_and_each_expert_as_its_own_full_path(block_run, which):
    """The predictor's expert probabilities equal each expert's whole network (its trunk: the flat
    trunk with its own blocks) run separately; the shared trunk's first block runs once per batch.
    Also on the bundled run, whose experts are heads (trained before experts had blocks)."""
    from ensemble.predictors import HierarchicalPredictor

    run = block_run["run"] if which == "blocks" else REPO / "ensemble" / "models" / "ferplus"
    hp = HierarchicalPredictor.load(run)
    heads = [
        json.loads((run / "experts" / str(r) / "meta.json").read_text()).get("trainable", "head") == "head"
        for r in range(len(hp.net.expert_from))
    ]
    assert [b is None for b in hp.net.expert_from] == heads  # a head reads the trunk's output
    if which == "blocks":
        assert not all(heads)
    calls = []
    for trunk in hp.net.trunks.values():
        trunk[0].register_forward_hook(lambda *a: calls.append(1))
    x = np.random.default_rng(0).standard_normal((5, 3, hp.size, hp.size)).astype(np.float32)
    _, ep = hp.parts_from_input(x)
    assert len(calls) == len(hp.net.trunks) == 1
    experts = _experts(run)
    assert len(experts) >= 2
    for e, net, _ in experts:
        cls = [CLASSES.index(c) for c in e["classes"]]
        with torch.no_grad():
            p = torch.softmax(net.eval()(torch.from_numpy(x)), 1).numpy()
        want = np.zeros((5, len(CLASSES)), np.float32)
        want[:, cls] = p
        np.testing.assert_allclose(ep[e["region"]], want, atol=1e-5)


@pytest.mark.slow
def test_a_worse_block_expert_falls_back_to_the_restricted_flat_model(block_run, tmp_path, monkeypatch):
    """A kept block expert whose head is made to say its first class: the rule publishes the
    restricted flat model (flat blocks, restricted head) and the predictor loads it as a head.
    Every class of the tiny run is judged (keep_min_faces = 1), so balanced accuracy decides."""
    from ensemble.engine import evaluate
    from ensemble.predictors import HierarchicalPredictor
    from ensemble.tasks import CLASSIFY
    from stages.experts import _keep_or_restricted_flat
    from stages.neural import load_network

    run, exp = tmp_path / "run", block_run["exp"]
    monkeypatch.setattr(exp.cfg.experts, "keep_min_faces", 1)
    shutil.copytree(block_run["run"], run)
    e, net, meta = next(x for x in _experts(run) if x[2]["kept"] == "expert")
    r, cls = e["region"], [CLASSES.index(c) for c in e["classes"]]
    folder = run / "experts" / str(r)
    state = load_weights(folder)
    *_, w, b = [k for k in state if k.startswith("head.")]
    state[w] = torch.zeros_like(state[w])
    state[b] = torch.tensor([10.0] + [0.0] * (len(cls) - 1))
    torch.save(state, folder / "weights.pt")
    emeta = json.loads((folder / "meta.json").read_text())
    emeta["files"]["weights.pt"] = sha256_file(folder / "weights.pt")
    write_json(folder / "meta.json", emeta)
    local = {c: i for i, c in enumerate(cls)}
    vi = exp.idx("val")
    idx = vi[np.isin(exp.manifest["label"].to_numpy()[vi], cls)]
    y = np.array([local[int(c)] for c in exp.manifest["label"].to_numpy()[idx]])
    restricted = _restricted(run, exp, e["classes"])
    fig = _keep_or_restricted_flat(exp, folder, r, e["classes"], restricted, idx, y, {"val": (idx, y)}, print)
    flat, _ = load_network(run / "flat", run)
    net.trunk.load_state_dict(flat.trunk.state_dict())
    net.head.load_state_dict(restricted)
    want = evaluate(net, CLASSIFY, exp.images, idx, y, e["classes"], meta["mean"], meta["std"], exp.rt)
    assert fig["restricted_flat_balanced_accuracy"] == pytest.approx(want["balanced_accuracy"])
    assert fig["expert_balanced_accuracy"] == pytest.approx(1 / len(np.unique(y)))
    assert fig["expert"] < fig["restricted_flat"]
    assert fig["kept"] == "restricted flat"
    published = json.loads((folder / "meta.json").read_text())
    assert (published["trainable"], published["trained_trainable"]) == ("head", "block4")
    assert not any(k.startswith("trunk.") for k in load_weights(folder))
    hp = HierarchicalPredictor.load(run)
    assert hp.net.expert_from[r] is None


def test_trainable_of_a_stage_on_a_borrowed_trunk(tmp_path):
    # [model] trainable describes the trunk's owner: a borrowing stage trains its head unless told
    cfg = load_config(None, ["model.trainable=all", "experts.model.trunk_from=flat", "stage1.model.trunk_from=flat"])
    assert cfg.for_stage("flat").model.trainable == "all"
    assert cfg.for_stage("experts").model.trainable == "head"
    assert cfg.for_stage("stage1").model.trainable == "head"
    cfg = load_config(None, ["experts.model.trunk_from=flat", "experts.model.trainable=block5"])
    assert cfg.for_stage("experts").model.trainable == "block5"
    # --set model.trainable (for the flat model) keeps the experts' own value from the file
    f = tmp_path / "c.toml"
    f.write_text('[experts.model]\ntrunk_from = "flat"\ntrainable = "block4"\n')
    cfg = load_config(f, ["model.trainable=block3"])
    assert (cfg.model.trainable, cfg.for_stage("experts").model.trainable) == ("block3", "block4")


@pytest.mark.parametrize(
    "sets, match",
    [
        (["experts.model.trainable=blockx"], "experts.model.trainable"),
        (["experts.model.trainable=block0"], "experts.model.trainable"),
        (["stage1.model.trunk_from=flat", "stage1.model.trainable=block4"], "stage1.model.trainable"),
    ],
)
def test_bad_trainable_values_are_one_line_errors(sets, match):
    with pytest.raises(UserError, match=match) as err:
        load_config(None, sets)
    assert "\n" not in str(err.value)


@pytest.mark.slow
def test_a_block_the_flat_trunk_lacks_is_refused_before_training(block_run, tmp_path):
    import dataclasses

    from stages.experts import fit_experts

    exp = block_run["exp"]
    experts = dataclasses.replace(exp.cfg.experts, model={**exp.cfg.experts.model, "trainable": "block9"})
    logs = []
    with pytest.raises(UserError, match=r"experts.model.trainable = 'block9'.*block1..block4") as err:
        fit_experts(dataclasses.replace(exp, cfg=dataclasses.replace(exp.cfg, experts=experts)), log=logs.append)
    assert "\n" not in str(err.value)
    assert not any("epoch" in m for m in logs)
    # and on a fresh run, before the flat model it needs is trained
    fresh = dataclasses.replace(exp, cfg=dataclasses.replace(exp.cfg, experts=experts), run=tmp_path / "fresh")
    with pytest.raises(UserError, match=r"experts.model.trainable = 'block9'.*\(tinyvgg\) has blocks block1..block4"):
        fit_experts(fresh, log=logs.append)
    assert not any("epoch" in m for m in logs) and not (tmp_path / "fresh" / "flat").exists()


@pytest.mark.slow
def test_the_exported_hierarchy_carries_the_experts_own_blocks(block_run, tmp_path):
    from ensemble.export import export
    from ensemble.predictors import HierarchicalPredictor

    ort = pytest.importorskip("onnxruntime")
    run = block_run["run"]
    hp = HierarchicalPredictor.load(run)
    x = np.random.default_rng(1).standard_normal((4, 3, hp.size, hp.size)).astype(np.float32)
    want = hp.route(*hp.parts_from_input(x))[0]
    sess = ort.InferenceSession(str(export(run, "onnx", tmp_path / "h.onnx")), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(sess.run(None, {"faces": x})[0], want, atol=1e-4)


@pytest.mark.slow
def test_compare_reports_extra_parameters_and_each_expert_inside_its_true_neighborhood(block_run, tmp_path):
    from ensemble.reports import compare

    run, exp = block_run["run"], block_run["exp"]
    logs = []
    result = compare(exp, "test", out=tmp_path / "reports", log=logs.append, n_resamples=50)
    pp = result["params"]
    metas = {
        e["region"]: json.loads((run / "experts" / str(e["region"]) / "meta.json").read_text())
        for e in result["experts"]
    }
    # what the hierarchy adds: stage 1's head and each expert's own blocks and head, as their metas record
    s1 = json.loads((run / "stage1" / "meta.json").read_text())
    assert pp["experts"] == [metas[r]["n_own_params"] for r in sorted(metas)]
    assert pp["extra_over_flat"] == pp["stage1_head"] + sum(pp["experts"]) and pp["other_trunks"] == 0
    assert pp["stage1_head"] == s1["n_own_params"]
    assert any(m["trainable"] == "block4" for m in metas.values())
    for e in result["experts"]:
        assert e["kept"] == metas[e["region"]]["kept"] and e["n"] > 0
        assert e["selection"] == block_run["index"]["experts"][e["region"]]["true_neighborhood_val"]
        assert 0 <= e["expert"] <= 1 and 0 <= e["restricted_flat"] <= 1
        if e["kept"] == "restricted flat":  # the expert is the restricted flat model: same figure
            assert e["expert"] == pytest.approx(e["restricted_flat"])
    text = "\n".join(logs)
    assert "the hierarchy adds" in text and "experts inside their true neighborhood" in text
    assert "Experts and parameters" in (tmp_path / "reports" / "report.md").read_text()
