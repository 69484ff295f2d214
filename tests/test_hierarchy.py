"""Neighborhoods of V/A clouds with known answers, and the router's arithmetic."""

import numpy as np
import pytest
import torch
from torch import nn

from ensemble.classes import CLASSES
from ensemble.errors import UserError
from ensemble.predictors import HierarchicalPredictor
from ensemble.router import HierarchyNet, RegionPosterior, fit_temperature
from stages.neighborhoods import NotFittedError, VANeighborhoods, membership

CENTERS = np.array([[-0.6, -0.5], [0.6, -0.5], [0.0, 0.6]])


def blobs(n_per=80, std=0.05, seed=0):
    """Three well-separated Gaussian blobs: points (3n, 2) and the blob of each point."""
    rng = np.random.default_rng(seed)
    va = np.concatenate([c + rng.normal(0, std, (n_per, 2)) for c in CENTERS])
    blob = np.repeat(np.arange(3), n_per)
    return va, blob


def _same_partition(a, b):
    """Two labelings agree up to renaming the groups."""
    pairs = set(zip(np.asarray(a).tolist(), np.asarray(b).tolist()))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


# --------------------------------------------------------------------------- neighborhoods


@pytest.mark.parametrize("method", ["kmeans", "gmm", "agglomerative"])
def test_automatic_k_finds_three_blobs(method):
    va, blob = blobs()
    nbh = VANeighborhoods(method=method, k_min=2, k_max=5, min_count=1, n_classes=3).fit(va, blob)
    assert nbh.k_ == 3
    assert set(nbh.scores_) == {2, 3, 4, 5}
    assert max(nbh.scores_, key=nbh.scores_.get) == 3
    assert _same_partition(nbh.predict(va), blob)
    # each center sits on one blob's center
    order = np.argsort([np.argmin(((CENTERS - c) ** 2).sum(1)) for c in nbh.centers_])
    np.testing.assert_allclose(nbh.centers_[order], CENTERS, atol=0.03)
    # one class per blob -> one member class per neighborhood
    assert sorted(m for ms in nbh.members_ for m in ms) == [0, 1, 2]
    assert all(len(ms) == 1 for ms in nbh.members_)


def test_fixed_k_is_used():
    va, blob = blobs()
    nbh = VANeighborhoods(method="kmeans", k=2, min_count=1, n_classes=3).fit(va, blob)
    assert nbh.k_ == 2 and list(nbh.scores_) == [2]


def _split_class_data(share_a=0.6, n=100, seed=1):
    """Class 0 split share_a / (1 - share_a) between blobs 0 and 1; class 1 on blob 1; class 2 on blob 2."""
    rng = np.random.default_rng(seed)
    n_a = int(round(share_a * n))
    pts = [
        CENTERS[0] + rng.normal(0, 0.05, (n_a, 2)),
        CENTERS[1] + rng.normal(0, 0.05, (n - n_a, 2)),
        CENTERS[1] + rng.normal(0, 0.05, (n, 2)),
        CENTERS[2] + rng.normal(0, 0.05, (n, 2)),
    ]
    labels = np.concatenate([np.zeros(n, int), np.ones(n, int), np.full(n, 2)])
    return np.concatenate(pts), labels


def _region_of(nbh, point):
    return int(nbh.predict(np.array([point]))[0])


def test_split_class_belongs_to_both_neighborhoods_at_low_share():
    va, labels = _split_class_data(0.6)
    nbh = VANeighborhoods(k=3, min_share=0.3, min_count=5, n_classes=3).fit(va, labels)
    r0, r1, r2 = (_region_of(nbh, c) for c in CENTERS)
    assert 0 in nbh.members_[r0] and 0 in nbh.members_[r1]
    assert nbh.members_[r1] == [0, 1]
    assert nbh.members_[r2] == [2]
    assert nbh.counts_[r0, 0] == 60 and nbh.counts_[r1, 0] == 40


def test_split_class_belongs_to_its_larger_share_at_half():
    va, labels = _split_class_data(0.6)
    nbh = VANeighborhoods(k=3, min_share=0.5, min_count=5, n_classes=3).fit(va, labels)
    r0, r1, r2 = (_region_of(nbh, c) for c in CENTERS)
    assert nbh.members_[r0] == [0]
    assert nbh.members_[r1] == [1]
    assert nbh.members_[r2] == [2]


def test_every_present_class_belongs_somewhere():
    # class 3: 9 faces spread 3/3/3 over the blobs: below min_share and min_count everywhere
    va, labels = _split_class_data(0.6)
    rng = np.random.default_rng(5)
    extra = np.concatenate([c + rng.normal(0, 0.05, (3, 2)) for c in CENTERS])
    va, labels = np.concatenate([va, extra]), np.concatenate([labels, np.full(9, 3)])
    nbh = VANeighborhoods(k=3, min_share=0.5, min_count=20, n_classes=5).fit(va, labels)
    members = [c for ms in nbh.members_ for c in ms]
    assert {0, 1, 2, 3} <= set(members)
    assert members.count(3) == 1
    assert 4 not in members  # an absent class belongs nowhere


def test_membership_table_by_hand():
    counts = np.array([[60, 0, 1, 0], [40, 50, 2, 0], [0, 50, 3, 0]])
    assert membership(counts, 0.3, 1) == [[0], [0, 1, 2], [1, 2]]
    assert membership(counts, 0.5, 1) == [[0], [1], [1, 2]]
    # min_count 45: class 0 keeps only its 60; class 2 (at most 3) falls back to its largest region
    assert membership(counts, 0.3, 45) == [[0], [1], [1, 2]]


def test_not_fitted_raises():
    nbh = VANeighborhoods()
    with pytest.raises(NotFittedError):
        nbh.predict(np.zeros((1, 2)))
    with pytest.raises(NotFittedError):
        nbh.predict_proba(np.zeros((1, 2)))
    with pytest.raises(NotFittedError):
        nbh.describe(CLASSES)


def test_unknown_method_and_too_few_points():
    va, blob = blobs(n_per=10)
    with pytest.raises(UserError, match="neighborhoods.method"):
        VANeighborhoods(method="dbscan", k=3).fit(va, blob)
    with pytest.raises(UserError, match="too few distinct"):
        VANeighborhoods(k=5).fit(np.zeros((20, 2)), np.zeros(20, int))


def test_agglomerative_predicts_nearest_center():
    va, blob = blobs()
    nbh = VANeighborhoods(method="agglomerative", k=3, min_count=1, n_classes=3).fit(va, blob)
    probe = np.array([[-0.55, -0.45], [0.58, -0.52], [0.02, 0.62]])
    region = nbh.predict(probe)
    assert len(set(region.tolist())) == 3
    np.testing.assert_array_equal(region, [_region_of(nbh, c) for c in CENTERS])
    p = nbh.predict_proba(probe, temperature=0.05)
    np.testing.assert_allclose(p.sum(1), 1.0)
    np.testing.assert_array_equal(p.argmax(1), region)


def test_describe_names_classes():
    va, blob = blobs()
    nbh = VANeighborhoods(k=3, min_count=1, n_classes=8).fit(va, blob)
    d = nbh.describe(CLASSES)
    assert d["k"] == 3 and len(d["neighborhoods"]) == 3
    assert sorted(c for n in d["neighborhoods"] for c in n["classes"]) == sorted(CLASSES[:3])


# --------------------------------------------------------------------------- router


@pytest.fixture(scope="module")
def fitted():
    va, blob = blobs()
    return {m: VANeighborhoods(method=m, k=3, min_count=1, n_classes=3).fit(va, blob) for m in ("kmeans", "gmm")}


PROBES = torch.tensor([[-0.6, -0.5], [0.6, -0.5], [0.0, 0.6], [0.0, -0.5], [0.3, 0.0], [1.0, 1.0]])


@pytest.mark.parametrize("method", ["kmeans", "gmm"])
def test_region_posterior_rows_sum_to_one(fitted, method):
    post = RegionPosterior(fitted[method], temperature=0.05)
    p = post(PROBES)
    assert p.shape == (len(PROBES), 3)
    torch.testing.assert_close(p.sum(1), torch.ones(len(PROBES)))
    assert (p >= 0).all()
    # the most likely region is the one the estimator predicts
    np.testing.assert_array_equal(p.argmax(1).numpy(), fitted[method].predict(PROBES.numpy().astype(float)))


@pytest.mark.parametrize("method", ["kmeans", "gmm"])
def test_region_posterior_matches_scikit_learn(fitted, method):
    post = RegionPosterior(fitted[method], temperature=0.05)
    want = fitted[method].predict_proba(PROBES.numpy().astype(float), temperature=0.05)
    np.testing.assert_allclose(post(PROBES).numpy(), want, atol=1e-4)


def test_gmm_posterior_in_numpy_is_scikit_learns(fitted, tmp_path):
    """Predicting needs no scikit-learn: the mixture's arrays give what GaussianMixture gives,
    fitted or loaded back from model.npz."""
    nbh = fitted["gmm"]
    va = np.random.default_rng(0).uniform(-1, 1, (200, 2))
    np.testing.assert_allclose(nbh.predict_proba(va), nbh.estimator_.predict_proba(va), atol=1e-10)
    np.testing.assert_array_equal(nbh.predict(va), nbh.estimator_.predict(va))
    nbh.save_arrays(tmp_path / "model.npz")
    back = VANeighborhoods.load_arrays(tmp_path / "model.npz")
    assert back.estimator_ is None
    np.testing.assert_allclose(back.predict_proba(va), nbh.estimator_.predict_proba(va), atol=1e-10)
    np.testing.assert_array_equal(back.predict(va), nbh.predict(va))


def test_neighborhoods_keep_scikit_learns_estimator_protocol():
    from sklearn.base import clone

    nbh = VANeighborhoods(method="gmm", k=3, min_share=0.2)
    copy = clone(nbh)
    assert copy is not nbh and copy.get_params() == nbh.get_params()
    assert copy.set_params(k=4).k == 4
    assert repr(nbh) == "VANeighborhoods(method='gmm', k=3, min_share=0.2)"
    with pytest.raises(ValueError, match="invalid parameter"):
        nbh.set_params(nope=1)


def test_distance_posterior_by_hand(fitted):
    nbh = fitted["kmeans"]
    post = RegionPosterior(nbh, temperature=0.5)
    x = torch.tensor([[0.1, 0.2]])
    d2 = ((x.numpy()[0] - nbh.centers_) ** 2).sum(1)
    want = np.exp(-d2 / 0.5) / np.exp(-d2 / 0.5).sum()
    np.testing.assert_allclose(post(x).numpy()[0], want, rtol=1e-5)


def _tiny_hierarchy(nbh, expert_classes=([0, 1, 2], [3, 4], [5]), mode="soft"):
    """A HierarchyNet on 3x4x4 inputs: one shared trunk, a V/A head, expert heads (the last one constant)."""
    torch.manual_seed(0)
    trunk = nn.Flatten()
    s1 = nn.Sequential(nn.Linear(48, 2), nn.Tanh())
    heads = [nn.Linear(48, len(c)) if len(c) > 1 else None for c in expert_classes]
    keys = ["t"] * len(expert_classes)
    post = RegionPosterior(nbh, temperature=0.05)
    return HierarchyNet({"t": trunk}, s1, "t", heads, keys, [list(c) for c in expert_classes], post, mode)


def test_expert_probabilities_stay_inside_their_classes(fitted):
    net = _tiny_hierarchy(fitted["kmeans"])
    x = torch.randn(5, 3, 4, 4)
    va, ep = net.parts(x)
    assert va.shape == (5, 2) and ep.shape == (3, 5, 8)
    assert (va.abs() <= 1).all()
    torch.testing.assert_close(ep.sum(2), torch.ones(3, 5))
    outside = [[3, 4, 5, 6, 7], [0, 1, 2, 5, 6, 7], [0, 1, 2, 3, 4, 6, 7]]
    for e, cls in enumerate(outside):
        assert (ep[e][:, cls] == 0).all()
    assert (ep[0][:, :3] > 0).all()
    torch.testing.assert_close(ep[2], torch.eye(8)[5].expand(5, 8))  # a one-class expert is certain


def test_mix_rows_sum_to_one_and_respect_experts(fitted):
    net = _tiny_hierarchy(fitted["kmeans"])
    x = torch.randn(7, 3, 4, 4)
    va, ep = net.parts(x)
    soft = net.weights(va, "soft")
    torch.testing.assert_close(soft.sum(1), torch.ones(7))
    hard = net.weights(va, "hard")
    assert ((hard == 0) | (hard == 1)).all()
    torch.testing.assert_close(hard.sum(1), torch.ones(7))
    np.testing.assert_array_equal(hard.argmax(1).numpy(), soft.argmax(1).numpy())
    for w in (soft, hard):
        p = HierarchyNet.mix(w, ep)
        torch.testing.assert_close(p.sum(1), torch.ones(7))
    # by hand: mix = sum_k w_k * p_k, renormalised
    w = torch.tensor([[0.5, 0.25, 0.25]])
    e = torch.zeros(3, 1, 8)
    e[0, 0, :3] = torch.tensor([0.2, 0.3, 0.5])
    e[1, 0, 3:5] = torch.tensor([0.6, 0.4])
    e[2, 0, 5] = 1.0
    torch.testing.assert_close(HierarchyNet.mix(w, e)[0], torch.tensor([0.1, 0.15, 0.25, 0.15, 0.1, 0.25, 0.0, 0.0]))
    # hard routing: the classes of the other experts get exactly zero
    p = HierarchyNet.mix(torch.tensor([[0.0, 1.0, 0.0]]), e)[0]
    torch.testing.assert_close(p, torch.tensor([0, 0, 0, 0.6, 0.4, 0, 0, 0]))


def test_forward_uses_the_net_mode(fitted):
    x = torch.randn(4, 3, 4, 4)
    for mode in ("soft", "hard"):
        net = _tiny_hierarchy(fitted["kmeans"], mode=mode)
        proba, va, w = net(x)
        torch.testing.assert_close(proba, HierarchyNet.mix(net.weights(va, mode), net.parts(x)[1]))
        torch.testing.assert_close(proba.sum(1), torch.ones(4))


def _predictor(nbh):
    net = _tiny_hierarchy(nbh)
    meta = {"input_size": 4, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
    return HierarchicalPredictor(net, nbh, meta, {"mode": "soft"})


def test_route_oracle_uses_the_true_region(fitted):
    nbh = fitted["kmeans"]
    hp = _predictor(nbh)
    assert hp.expert_classes == [["neutral", "happy", "sad"], ["surprise", "fear"], ["disgust"]]
    rng = np.random.default_rng(0)
    va_pred = rng.uniform(-1, 1, (6, 2)).astype(np.float32)
    true_va = CENTERS[[0, 1, 2, 2, 1, 0]] + rng.normal(0, 0.02, (6, 2))
    ep = np.zeros((3, 6, 8), np.float32)
    ep[0, :, 0] = ep[1, :, 3] = ep[2, :, 5] = 1.0
    proba, w = hp.route(va_pred, ep, "oracle", true_va)
    region = nbh.predict(true_va)
    np.testing.assert_array_equal(w, np.eye(3)[region])
    np.testing.assert_array_equal(proba.argmax(1), np.array([0, 3, 5])[region])
    # hard routes by the predicted V/A instead
    _, wh = hp.route(va_pred, ep, "hard")
    np.testing.assert_array_equal(wh.argmax(1), nbh.predict(va_pred.astype(float)))


def test_route_errors(fitted):
    hp = _predictor(fitted["kmeans"])
    va, ep = np.zeros((1, 2), np.float32), np.full((3, 1, 8), 1 / 8, np.float32)
    with pytest.raises(UserError, match="true valence/arousal"):
        hp.route(va, ep, "oracle")
    with pytest.raises(UserError, match="router must be one of"):
        hp.route(va, ep, "vote")


def test_fit_temperature_lowers_the_nll(fitted):
    nbh = fitted["kmeans"]
    rng = np.random.default_rng(3)
    true_va = CENTERS[rng.integers(0, 3, 300)] + rng.normal(0, 0.05, (300, 2))
    va_pred = true_va + rng.normal(0, 0.3, true_va.shape)  # a noisy stage 1
    region = nbh.predict(true_va)
    post = RegionPosterior(nbh, temperature=10.0)

    def nll(t):
        post.temperature = t
        with torch.no_grad():
            return torch.nn.functional.cross_entropy(
                post.logits(torch.tensor(va_pred, dtype=torch.float32)), torch.tensor(region, dtype=torch.long)
            ).item()

    bad = {t: nll(t) for t in (10.0, 1e-3)}
    post.temperature = 10.0
    t = fit_temperature(post, va_pred, region)
    assert post.temperature == t
    assert 1e-3 <= t <= 10
    best = nll(t)
    assert best < bad[10.0] and best < bad[1e-3]
    # no grid temperature does better
    assert all(best <= nll(float(s)) + 1e-9 for s in np.logspace(-3, 1, 41))


def test_fit_temperature_leaves_gmm_alone(fitted):
    post = RegionPosterior(fitted["gmm"], temperature=0.7)
    assert fit_temperature(post, np.zeros((3, 2)), np.zeros(3, int)) == 0.7
    assert post.kind == "gmm"


def test_va_plus_flat_routing_by_hand(fitted):
    """HD-CNN's rule: P(n | V/A) · Σ_{c ∈ n} p_flat(c), renormalised; V/A alone without it."""
    flat_head = nn.Linear(48, 8)
    expert_classes = ([0, 1, 2], [2, 3, 4], [5])  # sad (2) in two neighborhoods
    net = _tiny_hierarchy(fitted["kmeans"], expert_classes)
    net = HierarchyNet(
        {"t": nn.Flatten()},
        net.stage1_head,
        "t",
        [net.expert_heads[0], net.expert_heads[1], None],
        ["t"] * 3,
        [list(c) for c in expert_classes],
        net.posterior,
        "soft",
        flat_head=flat_head,
        flat_trunk="t",
        inputs="va+flat",
    )
    x = torch.randn(4, 3, 4, 4)
    va, probs = net.parts(x)
    ep, pf = net.split(probs)
    assert ep.shape == (3, 4, 8) and pf.shape == (4, 8)  # the flat model rides along as the last row
    post = net.posterior(va)
    r = torch.stack([pf[:, [0, 1, 2]].sum(1), pf[:, [2, 3, 4]].sum(1), pf[:, 5]], dim=1)
    want = post * r / (post * r).sum(1, keepdim=True)
    torch.testing.assert_close(net.weights(va, "soft", pf), want)
    torch.testing.assert_close(net.weights(va, "hard", pf).argmax(1), want.argmax(1))
    proba, _, w = net(x)
    torch.testing.assert_close(w, want)
    torch.testing.assert_close(proba, HierarchyNet.mix(want, ep))  # alpha = 0: the hierarchy's own mixture
    net.inputs = "va"
    torch.testing.assert_close(net.weights(va, "soft", pf), post)


def test_routed_membership_by_hand():
    """Region 0 holds neutral and happy, region 1 sad. The router sends 30% of the sad selection
    faces to region 0 and 10% of the happy ones to region 1: at share 0.25 sad joins region 0,
    happy does not join region 1; at 0.1 both."""
    from stages.neighborhoods import routed_membership

    members = [[0, 1], [2]]
    routed = np.zeros((2, 8), int)
    routed[:, 0] = [10, 0]  # neutral: all to region 0
    routed[:, 1] = [9, 1]  # happy: 10% to region 1
    routed[:, 2] = [3, 7]  # sad: 30% to region 0
    got, added = routed_membership(members, routed, 0.25)
    assert got == [[0, 1, 2], [2]] and added == [(0, 2, 0.3)]
    got, added = routed_membership(members, routed, 0.1)
    assert got == [[0, 1, 2], [1, 2]] and sorted(added) == [(0, 2, 0.3), (1, 1, 0.1)]
    assert members == [[0, 1], [2]]  # not changed in place


def test_the_keep_rule_does_not_hinge_on_a_class_with_one_face():
    """Seed 1 of the FER+ run kept a surprise/fear expert at 90.9 vs 46.3 balanced accuracy on 324
    surprise faces and 1 fear face: that one face decided. Classes with too few selection faces do
    not enter the comparison; with fewer than two left, plain accuracy decides."""
    from ensemble.metrics import classification_metrics
    from stages.experts import keep_score

    names = ["surprise", "fear"]
    y = np.array([0] * 30 + [1])
    expert = classification_metrics(y, np.array([0] * 28 + [1, 1, 1]), names)  # the fear face right
    flat = classification_metrics(y, np.array([0] * 30 + [0]), names)  # every surprise face right
    assert expert["balanced_accuracy"] > flat["balanced_accuracy"]  # the old rule: one face wins it
    (se, rule), (sf, _) = keep_score(expert, names, 10), keep_score(flat, names, 10)
    assert rule.startswith("accuracy") and sf > se
    y3 = np.array([0] * 30 + [1] * 12 + [2])
    m = classification_metrics(y3, np.array([0] * 30 + [0] * 6 + [1] * 6 + [2]), ["a", "b", "c"])
    score, rule = keep_score(m, ["a", "b", "c"], 10)
    assert score == pytest.approx((1 + 0.5) / 2) and rule == "balanced accuracy over a, b"
