"""The training loop's parts: balance plans, loss weights, metrics, augmentation, fit and resume."""

import csv
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import TINY_SYNTHETIC

from ensemble import engine, feature_cache
from ensemble.batches import augment, class_weights, epoch_plan
from ensemble.classes import CLASSES
from ensemble.config import BalanceConfig, TrainConfig, load_config
from ensemble.engine import StageData, TrainingInterrupted, fit
from ensemble.errors import UserError
from ensemble.metrics import ccc, classification_metrics, confusion, pcc, regression_metrics
from ensemble.runtime import runtime
from ensemble.tasks import CLASSIFY, VA_REGRESSION, ccc_loss
from stages.backbones import build_model, normalization, state_digest

LABELS = np.array([0] * 10 + [1] * 4 + [2] * 1)  # counts 10, 4, 1

pytestmark = pytest.mark.usefixtures("one_thread")


def _bal(**kw):
    return BalanceConfig(**kw)


# --------------------------------------------------------------------------- epoch plans


def test_plan_none_is_every_face_once():
    plan, copy = epoch_plan(LABELS, _bal(mode="none"), seed=0, epoch=0)
    assert plan.tolist() == list(range(15))
    assert not copy.any()


def test_plan_up_fills_to_the_cap():
    plan, copy = epoch_plan(LABELS, _bal(mode="up", cap=8), seed=0, epoch=0)
    assert np.bincount(LABELS[plan]).tolist() == [10, 8, 8]
    assert not copy.any()  # plain up-sampling marks no transform copies
    assert sorted(set(plan.tolist())) == list(range(15))  # every original face is kept


def test_plan_up_cap_above_largest_class():
    plan, _ = epoch_plan(LABELS, _bal(mode="up", cap=100), seed=0, epoch=0)
    assert np.bincount(LABELS[plan]).tolist() == [10, 10, 10]


def test_plan_transform_marks_exactly_the_added_faces():
    plan, copy = epoch_plan(LABELS, _bal(mode="transform", cap=8), seed=0, epoch=0)
    assert np.bincount(LABELS[plan]).tolist() == [10, 8, 8]
    assert copy.sum() == 4 + 7
    assert np.bincount(LABELS[plan[copy]], minlength=3).tolist() == [0, 4, 7]
    assert sorted(plan[~copy].tolist()) == list(range(15))  # the originals, each once


def test_plan_down_to_rarest_or_floor():
    plan, copy = epoch_plan(LABELS, _bal(mode="down"), seed=0, epoch=0)
    assert np.bincount(LABELS[plan]).tolist() == [1, 1, 1]
    assert len(set(plan.tolist())) == len(plan) and not copy.any()
    plan, _ = epoch_plan(LABELS, _bal(mode="down", floor=3), seed=0, epoch=0)
    assert np.bincount(LABELS[plan]).tolist() == [3, 3, 1]
    assert len(set(plan.tolist())) == len(plan)  # without replacement


def test_plan_is_seeded_by_epoch():
    a, _ = epoch_plan(LABELS, _bal(mode="down", floor=3), seed=0, epoch=0)
    b, _ = epoch_plan(LABELS, _bal(mode="down", floor=3), seed=0, epoch=0)
    c = [epoch_plan(LABELS, _bal(mode="down", floor=3), seed=0, epoch=e)[0].tolist() for e in range(1, 6)]
    assert a.tolist() == b.tolist()
    assert any(x != a.tolist() for x in c)


def test_plan_regression_targets_are_not_balanced():
    va = np.zeros((7, 2))
    plan, copy = epoch_plan(va, _bal(mode="up", cap=8), seed=0, epoch=0)
    assert plan.tolist() == list(range(7)) and not copy.any()


def test_plan_unknown_mode_is_refused_by_the_config():  # the one check; epoch_plan does not re-check
    with pytest.raises(UserError, match="balance.mode"):
        load_config(None, ["balance.mode=sideways"])


# --------------------------------------------------------------------------- class weights


def test_weights_none():
    assert class_weights(np.array([10, 4, 1]), _bal(weights="none"), ["a", "b", "c"]) is None


def test_weights_inverse_by_hand():
    w = class_weights(np.array([10, 8, 8]), _bal(weights="inverse"), ["a", "b", "c"])
    # 1/10, 1/8, 1/8 scaled to mean 1: divide by 0.35/3
    np.testing.assert_allclose(w, [0.1 / (0.35 / 3), 0.125 / (0.35 / 3), 0.125 / (0.35 / 3)])
    np.testing.assert_allclose(w, [6 / 7, 15 / 14, 15 / 14])
    assert w.mean() == pytest.approx(1.0)


def test_weights_inverse_absent_class_gets_zero():
    w = class_weights(np.array([4, 0, 1]), _bal(weights="inverse"), ["a", "b", "c"])
    np.testing.assert_allclose(w, [0.4, 0.0, 1.6])  # 1/4 and 1 over their mean 0.625


def test_weights_sqrt_inverse_by_hand():
    w = class_weights(np.array([4, 1, 0, 16]), _bal(weights="sqrt_inverse"), list("abcd"))
    # 1/2, 1, -, 1/4 -> mean 7/12 over the present classes
    np.testing.assert_allclose(w, [6 / 7, 12 / 7, 0.0, 3 / 7])
    assert w[[0, 1, 3]].mean() == pytest.approx(1.0)


def test_weights_explicit():
    bc = _bal(weights="explicit", class_weights={"Happy": 2.0, "contempt": 0.5})
    w = class_weights(np.array([5, 5, 5]), bc, ["neutral", "happy", "contempt"])
    np.testing.assert_allclose(w, [1.0, 2.0, 0.5])


def test_weights_unknown_mode_is_refused_by_the_config():  # the one check; class_weights does not re-check
    with pytest.raises(UserError, match="balance.weights"):
        load_config(None, ["balance.weights=log"])


# --------------------------------------------------------------------------- metrics


def test_classification_metrics_by_hand():
    y_true = [0, 0, 0, 1, 1, 2]
    y_pred = [0, 0, 1, 1, 2, 2]
    m = classification_metrics(y_true, y_pred, ["a", "b", "c", "d"])  # class d has no faces
    assert m["n"] == 6
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["balanced_accuracy"] == pytest.approx((2 / 3 + 1 / 2 + 1) / 3)
    # F1: a = 2*1*(2/3)/(5/3) = 0.8; b = 0.5; c = 2*(1/2)*1/(3/2) = 2/3; d absent -> not averaged
    assert m["macro_f1"] == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)
    assert m["per_class_recall"] == {"a": pytest.approx(2 / 3), "b": 0.5, "c": 1.0, "d": None}
    assert m["confusion"] == [[2, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 0], [0, 0, 0, 0]]


def test_classification_metrics_prediction_of_an_absent_class():
    m = classification_metrics([0, 0, 1, 1], [0, 2, 1, 1], ["a", "b", "c"])
    assert m["balanced_accuracy"] == pytest.approx(0.75)  # recall a = 1/2, b = 1; c is not present
    # F1: a = 2*1*0.5/1.5 = 2/3, b = 1 -> c (absent, predicted once) stays out of the mean
    assert m["macro_f1"] == pytest.approx((2 / 3 + 1) / 2)


def test_confusion_rows_are_true_classes():
    np.testing.assert_array_equal(confusion([0, 1, 1], [1, 1, 0], 2), [[0, 1], [1, 1]])


def test_ccc_and_pcc_by_hand():
    assert ccc([1, 2, 3], [1, 2, 3]) == pytest.approx(1.0)
    # shifted by one: cov = var = 2/3, (mean gap)^2 = 1 -> 2*(2/3) / (4/3 + 1) = 4/7
    assert ccc([1, 2, 3], [2, 3, 4]) == pytest.approx(4 / 7)
    assert pcc([1, 2, 3], [2, 3, 4]) == pytest.approx(1.0)
    assert ccc([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert pcc([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(ccc([1], [1]))
    assert math.isnan(pcc([1, 1, 1], [1, 2, 3]))


def test_regression_metrics_by_hand():
    t = np.array([[0.5, -0.5], [-0.5, 0.5], [1.0, 1.0]])
    p = np.array([[0.5, 0.5], [-0.5, 0.5], [0.0, 1.0]])
    m = regression_metrics(t, p)
    assert m["n"] == 3
    assert m["rmse_valence"] == pytest.approx(math.sqrt(1 / 3))
    assert m["rmse_arousal"] == pytest.approx(math.sqrt(1 / 3))
    assert m["sagr_valence"] == pytest.approx(2 / 3)  # sign(1) != sign(0)
    assert m["sagr_arousal"] == pytest.approx(2 / 3)  # sign(-0.5) != sign(0.5)
    # valence: mean t 1/3, mean p 0, var t 7/18, var p 1/6, cov 1/6 -> 2(1/6) / (7/18 + 1/6 + 1/9) = 1/2
    assert m["ccc_valence"] == pytest.approx(0.5)
    assert m["pcc_valence"] == pytest.approx((1 / 6) / math.sqrt(7 / 18 * 1 / 6))
    # arousal: t (-.5,.5,1), p (.5,.5,1): mean t 1/3, mean p 2/3, var t 7/18, var p 1/18, cov 1/9
    assert m["ccc_arousal"] == pytest.approx(2 * (1 / 9) / (7 / 18 + 1 / 18 + 1 / 9))  # = 0.4
    assert m["pcc_arousal"] == pytest.approx((1 / 9) / math.sqrt(7 / 18 * 1 / 18))


def test_ccc_loss_matches_metric():
    t = torch.tensor([[0.5, -0.5], [-0.5, 0.5], [1.0, 1.0]])
    p = torch.tensor([[0.5, 0.5], [-0.5, 0.5], [0.0, 1.0]])
    m = regression_metrics(t.numpy(), p.numpy())
    want = 1 - (m["ccc_valence"] + m["ccc_arousal"]) / 2
    assert ccc_loss(p, t).item() == pytest.approx(want, abs=1e-6)
    assert ccc_loss(t, t).item() == pytest.approx(0.0, abs=1e-6)


# --------------------------------------------------------------------------- augmentation


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_augment_off_without_copies_is_identity():
    x = torch.rand(4, 3, 16, 16, generator=_gen(1))
    out = augment(x, torch.zeros(4, dtype=torch.bool), TrainConfig(augment=False), BalanceConfig(), _gen())
    assert out.shape == x.shape
    torch.testing.assert_close(out, x, atol=1e-5, rtol=0)


def test_augment_keeps_shape_and_changes_images():
    x = torch.rand(6, 3, 20, 20, generator=_gen(1))
    out = augment(
        x, torch.zeros(6, dtype=torch.bool), TrainConfig(augment=True, crop_scale=0.2), BalanceConfig(), _gen()
    )
    assert out.shape == x.shape and out.dtype == x.dtype
    assert not torch.allclose(out, x, atol=1e-3)
    assert out.min() >= 0 and out.max() <= 1  # reflection padding stays within the input's range


def test_augment_rotates_only_transform_copies():
    x = torch.rand(4, 3, 16, 16, generator=_gen(2))
    copy = torch.tensor([False, True, False, True])
    out = augment(x, copy, TrainConfig(augment=False), BalanceConfig(rotation=45.0, flip=False), _gen())
    torch.testing.assert_close(out[~copy], x[~copy], atol=1e-5, rtol=0)
    assert not torch.allclose(out[copy], x[copy], atol=1e-3)


def test_augment_is_seeded():
    x = torch.rand(4, 3, 16, 16, generator=_gen(3))
    copy = torch.tensor([False, True, False, True])
    a = augment(x, copy, TrainConfig(), BalanceConfig(), _gen(5))
    b = augment(x, copy, TrainConfig(), BalanceConfig(), _gen(5))
    torch.testing.assert_close(a, b)


def test_photo_augment_off_by_default_and_each_one_changes_faces():
    from ensemble.batches import photo_augment

    x = torch.rand(16, 3, 24, 24, generator=_gen(4))
    assert torch.equal(photo_augment(x, TrainConfig(), _gen()), x)
    for kw in ({"brightness": 0.3}, {"contrast": 0.5}, {"grayscale": 1.0}, {"blur": 2.0}, {"jpeg": 10}):
        out = photo_augment(x, TrainConfig(**kw), _gen())
        assert out.shape == x.shape and out.dtype == x.dtype, kw
        assert out.min() >= 0 and out.max() <= 1, kw
        assert not torch.allclose(out, x, atol=1e-2), kw
    gray = photo_augment(x, TrainConfig(grayscale=1.0), _gen())
    assert torch.equal(gray[:, 0], gray[:, 1]) and torch.equal(gray[:, 1], gray[:, 2])


def test_photo_blur_keeps_mass_and_spreads_a_point():
    from ensemble.batches import _blur

    x = torch.zeros(2, 3, 15, 15)
    x[:, :, 7, 7] = 1
    out = _blur(x, torch.tensor([0.0, 1.5]))
    torch.testing.assert_close(out[0], x[0])  # sigma 0: untouched
    assert out[1, 0, 7, 7] < 0.2 and out[1, 0, 7, 8] > 0.05
    torch.testing.assert_close(out[1].sum((1, 2)), torch.ones(3), atol=1e-4, rtol=0)


def test_photo_jpeg_degrades_only_the_chosen_faces():
    from ensemble.batches import _jpeg

    x = torch.rand(3, 3, 32, 32, generator=_gen(6))  # noise: the hardest content for JPEG
    out = _jpeg(x, torch.tensor([0, 10, 90]))
    assert torch.equal(out[0], x[0])
    err = [(out[i] - x[i]).abs().mean().item() for i in (1, 2)]
    assert err[0] > err[1] > 0  # quality 10 loses more than quality 90


def test_photo_augment_is_applied_in_training_augment():
    x = torch.rand(8, 3, 16, 16, generator=_gen(7))
    none = torch.zeros(8, dtype=torch.bool)
    out = augment(x, none, TrainConfig(augment=False, grayscale=1.0), BalanceConfig(), _gen())
    assert torch.allclose(out[:, 0], out[:, 1], atol=1e-6)


def test_photo_augment_config_is_checked():
    from ensemble.config import load_config

    for key, bad in (("jpeg", 3), ("jpeg", 99), ("blur", -1), ("grayscale", 1.5), ("brightness", 2)):
        with pytest.raises(UserError, match=f"train.{key}"):
            load_config(None, [f"train.{key}={bad}"])


# --------------------------------------------------------------------------- fit on synthetic faces

BASE = TINY_SYNTHETIC


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    """The synthetic faces, prepared once for this module: (cfg factory, experiment)."""
    from ensemble.experiment import open_experiment

    root = tmp_path_factory.mktemp("engine")
    cache = f"data.cache_dir={root / 'cache'}"

    def make_cfg(*extra):
        return load_config(None, BASE + [cache, *extra])

    assert make_cfg().data.cache_dir == str(root / "cache")
    exp = open_experiment(make_cfg(), root / "run", log=lambda m: None, progress=False)
    return make_cfg, exp


def _flat_data(exp):
    y = exp.manifest["label"].to_numpy()
    tr, va = exp.idx("train"), exp.idx("val")
    return StageData(exp.images, tr, y[tr], va, y[va], list(CLASSES))


def _net(cfg, seed=0):
    torch.manual_seed(seed)
    return build_model(cfg.model, len(CLASSES))


def _fit(cfg, exp, work, net=None, **kw):
    net = net if net is not None else _net(cfg)
    mean, std = normalization(cfg.model.backbone)
    work.mkdir(parents=True, exist_ok=True)
    logs = []
    res = fit(net, CLASSIFY, _flat_data(exp), cfg, mean, std, runtime(cfg.train), work, log=logs.append, **kw)
    return net, res, logs


def _read_history(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_one_epoch_fit_writes_checkpoint_and_history(synth, tmp_path):
    make_cfg, exp = synth
    cfg = make_cfg("balance.mode=transform", "balance.cap=40", "balance.weights=sqrt_inverse")
    net, res, logs = _fit(cfg, exp, tmp_path)
    assert (tmp_path / "checkpoint.pt").is_file()
    ck = torch.load(tmp_path / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert ck["epoch"] == 0 and ck["best_epoch"] == 1
    assert set(ck["model"]) == set(net.state_dict())
    rows = _read_history(tmp_path / "history.csv")
    assert len(rows) == 1
    row = rows[0]
    assert row["epoch"] == "1"
    assert math.isfinite(float(row["train_loss"]))
    assert 0 <= float(row["val_balanced_accuracy"]) <= 1
    # the effective class counts of the balanced epoch: every class topped up to min(cap, largest)
    counts = dict(item.split(":") for item in row["class_counts"].split())
    train_y = exp.manifest["label"].to_numpy()[exp.idx("train")]
    raw = np.bincount(train_y, minlength=8)
    assert [int(counts[c]) for c in CLASSES] == [max(k, 40) if k else 0 for k in raw]
    assert res.best_epoch == 1 and len(res.history) == 1
    assert res.n_skipped == 0
    assert any("epoch 1/1" in m for m in logs)


def test_fit_changes_the_weights(synth, tmp_path):
    make_cfg, exp = synth
    cfg = make_cfg()
    before = state_digest(_net(cfg))
    net, _, _ = _fit(cfg, exp, tmp_path)
    assert state_digest(net) != before


def _compare_histories(h1, h2):
    assert len(h1) == len(h2)
    for a, b in zip(h1, h2):
        for key in set(a) | set(b):
            if key == "images_per_s":
                continue
            va, vb = a[key], b[key]
            if isinstance(va, float) and math.isnan(va):
                assert math.isnan(vb), key
            else:
                assert va == vb, key


def test_resume_after_interrupt_equals_straight_run(synth, tmp_path, monkeypatch):
    make_cfg, exp = synth
    cfg = make_cfg("train.epochs=2", "balance.mode=up", "balance.cap=40", "model.dropout=0.3")
    straight, res_a, _ = _fit(cfg, exp, tmp_path / "a")
    last_a = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)["model"]

    real_save = engine.save_checkpoint
    saves = []

    def save_then_ctrl_c(obj, path):  # Ctrl-C right after the first epoch's checkpoint
        real_save(obj, path)
        saves.append(obj["epoch"])
        raise KeyboardInterrupt

    monkeypatch.setattr(engine, "save_checkpoint", save_then_ctrl_c)
    with pytest.raises(TrainingInterrupted, match="--resume"):
        _fit(cfg, exp, tmp_path / "b")
    assert saves == [0]
    monkeypatch.setattr(engine, "save_checkpoint", real_save)

    fresh = _net(cfg, seed=99)  # its own init is overwritten by the checkpoint
    resumed, res_b, logs = _fit(cfg, exp, tmp_path / "b", net=fresh, resume=True)
    assert any("resumed after epoch 1" in m for m in logs)
    last_b = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)["model"]
    assert last_a.keys() == last_b.keys()
    for k in last_a:
        assert torch.equal(last_a[k], last_b[k]), k
    sa, sb = straight.state_dict(), resumed.state_dict()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    assert res_a.best_epoch == res_b.best_epoch
    _compare_histories(res_a.history, res_b.history)
    assert len(_read_history(tmp_path / "b" / "history.csv")) == 2


def test_resume_without_checkpoint_starts_fresh(synth, tmp_path):
    make_cfg, exp = synth
    _, res, logs = _fit(make_cfg(), exp, tmp_path, resume=True)
    assert any("no checkpoint" in m for m in logs)
    assert len(res.history) == 1


def test_nan_loss_is_a_user_error(synth, tmp_path):
    make_cfg, exp = synth
    cfg = make_cfg()
    net = _net(cfg)
    with torch.no_grad():
        net.head[-1].bias.fill_(float("nan"))
    with pytest.raises(UserError, match="loss became nan"):
        _fit(cfg, exp, tmp_path, net=net)


def test_huge_learning_rate_is_a_user_error(synth, tmp_path):
    make_cfg, exp = synth
    cfg = make_cfg("train.lr=1e30", "train.optimizer=sgd", "train.momentum=0.0", "train.schedule=none")
    with pytest.raises(UserError, match="lower train.lr"):
        _fit(cfg, exp, tmp_path)


def test_head_only_training_uses_the_feature_cache(synth, tmp_path, monkeypatch):
    make_cfg, exp = synth
    cfg = make_cfg("model.trainable=head", "balance.mode=transform", "balance.cap=40", "train.epochs=2")

    def no_images(*a, **k):
        raise AssertionError("head-only training must read the feature cache, not decode images")

    monkeypatch.setattr(engine, "image_batches", no_images)
    net = _net(cfg)
    trunk_before, head_before = state_digest(net.trunk), state_digest(net.head)
    net, res, logs = _fit(cfg, exp, tmp_path, net=net)
    assert any("feature cache" in m and "frozen trunk" in m for m in logs), logs
    assert state_digest(net.trunk) == trunk_before  # frozen trunk, batch-norm statistics included
    assert state_digest(net.head) != head_before
    assert len(res.history) == 2
    assert all(math.isfinite(r["train_loss"]) for r in res.history)
    assert 0 <= res.best_metric <= 1


def test_transform_views_are_cached_only_for_faces_that_can_be_copies(synth, tmp_path):
    """The rotated views of transform balancing are computed for the training faces of classes
    below the up-sampling target (what epoch_plan can copy), not for every face; the plain
    views stay whole, and asking a partial view for another face raises instead of reading zeros."""
    from ensemble.feature_cache import RowView, copy_rows

    make_cfg, exp = synth
    cfg = make_cfg("model.trainable=head", "balance.mode=transform", "balance.cap=40", "train.epochs=1")
    net, res, logs = _fit(cfg, exp, tmp_path, net=_net(cfg, seed=5))  # its own trunk: a fresh cache
    data = _flat_data(exp)
    eligible = copy_rows(data.train_idx, data.train_y, cfg.balance)
    assert 0 < len(eligible) < len(data.train_idx)
    transform = [m for m in logs if "feature cache 'transform" in m]
    plain = [m for m in logs if "feature cache 'plain'" in m]
    assert transform and all(f"for {len(eligible)} faces" in m for m in transform), logs
    assert plain and f"for {len(exp.images)} faces" in plain[0]
    assert len(res.history) == 1 and math.isfinite(res.history[0]["train_loss"])
    # copies from most of the data set: the whole views, which every stage on the trunk shares
    cfg = make_cfg("model.trainable=head", "balance.mode=transform", "balance.cap=1000", "train.epochs=1")
    assert len(copy_rows(data.train_idx, data.train_y, cfg.balance)) > len(exp.images) // 2
    _, _, logs = _fit(cfg, exp, tmp_path / "most", net=_net(cfg, seed=6))
    transform = [m for m in logs if "feature cache 'transform" in m]
    assert transform and all(f"for {len(exp.images)} faces" in m for m in transform), logs
    view = RowView(np.arange(6.0)[:, None], np.array([2, 5, 7, 8, 9, 11]), 12)
    assert view[np.array([11, 2])].ravel().tolist() == [5.0, 0.0]
    with pytest.raises(RuntimeError, match="face 3 is not in this view"):
        view[np.array([2, 3])]


@pytest.mark.parametrize("cap", [1, 5, 40, 1000])
def test_copy_rows_hold_every_face_epoch_plan_copies(cap):
    """Whatever the class counts and the cap, every transform copy epoch_plan draws (any epoch)
    is a face whose rotated views the partial cache holds."""
    from types import SimpleNamespace

    from ensemble.batches import epoch_plan
    from ensemble.feature_cache import copy_rows

    rng = np.random.default_rng(cap)
    labels = rng.choice(8, size=300, p=[0.4, 0.25, 0.1, 0.1, 0.06, 0.04, 0.03, 0.02])
    train_idx = rng.permutation(1000)[:300]
    bc = SimpleNamespace(mode="transform", cap=cap, floor=0)
    held = set(copy_rows(train_idx, labels, bc).tolist())
    for epoch in range(3):
        plan, copy = epoch_plan(labels, bc, 0, epoch)
        assert set(train_idx[plan[copy]].tolist()) <= held


def test_a_head_trains_the_same_whether_its_feature_cache_was_built_now_or_before(synth, tmp_path):
    """Building the cache draws from torch's generator (its loader's seed): the training after it
    (dropout) must not depend on whether this run built the cache or found it."""
    make_cfg, exp = synth
    cfg = make_cfg("model.trainable=head", "model.dropout=0.5", "balance.mode=transform", "balance.cap=40")
    built, _, logs = _fit(cfg, exp, tmp_path / "a", net=_net(cfg, seed=7))
    assert any("feature cache 'plain'" in m for m in logs)  # built by this run
    found, _, logs = _fit(cfg, exp, tmp_path / "b", net=_net(cfg, seed=7))
    assert not any("feature cache" in m for m in logs)  # found on disk
    assert state_digest(built.head) == state_digest(found.head)


def test_feature_cache_off_trains_through_images(synth, tmp_path):
    make_cfg, exp = synth
    cfg = make_cfg("model.trainable=head", "train.feature_cache=false")
    _, res, logs = _fit(cfg, exp, tmp_path)
    assert not any("feature cache" in m for m in logs)
    assert len(res.history) == 1


def test_regression_fit_with_ccc_loss(synth, tmp_path):
    make_cfg, exp = synth
    cfg = make_cfg('train.loss="mse+ccc"')
    va = exp.manifest[["valence", "arousal"]].to_numpy(np.float32)
    tr, vi = exp.idx("train"), exp.idx("val")
    torch.manual_seed(0)
    net = build_model(cfg.model, 2)
    mean, std = normalization("tinyvgg")
    res = fit(
        net,
        VA_REGRESSION,
        StageData(exp.images, tr, va[tr], vi, va[vi]),
        cfg,
        mean,
        std,
        runtime(cfg.train),
        tmp_path,
        log=lambda m: None,
    )
    row = res.history[0]
    assert {"val_rmse_valence", "val_ccc_arousal", "val_sagr_valence"} <= set(row)
    assert res.best_metric == pytest.approx((row["val_ccc_valence"] + row["val_ccc_arousal"]) / 2)


def test_runtime_cpu_and_precision():
    rt = runtime(SimpleNamespace(device="cpu", precision="fp32", channels_last=False, threads=0))
    assert rt.device.type == "cpu" and rt.amp_dtype is None and rt.is_main
    rt = runtime(SimpleNamespace(device="cpu", precision="fp16", channels_last=False, threads=0))
    assert rt.amp_dtype is torch.bfloat16  # no fp16 autocast on CPU
    with pytest.raises(UserError, match="train.precision"):  # the one check, when the config is read
        load_config(None, ["train.precision=fp8"])


def test_without_validation_faces_the_last_epoch_is_kept(synth, tmp_path):
    make_cfg, exp = synth
    cfg = make_cfg("train.epochs=2", "train.patience=1")
    y = exp.manifest["label"].to_numpy()
    tr = exp.idx("train")
    data = StageData(exp.images, tr, y[tr], np.array([], dtype=int), np.array([], dtype=int), list(CLASSES))
    net = _net(cfg)
    mean, std = normalization(cfg.model.backbone)
    logs = []
    res = fit(net, CLASSIFY, data, cfg, mean, std, runtime(cfg.train), tmp_path, log=logs.append)
    assert res.best_epoch == 2 and len(res.history) == 2  # not epoch 1's weights, and no early stop
    assert any("no validation faces" in m and "last epoch" in m for m in logs), logs


def test_resume_with_other_settings_is_refused_naming_them(synth, tmp_path):
    make_cfg, exp = synth
    _fit(make_cfg("train.epochs=1"), exp, tmp_path)
    with pytest.raises(UserError, match=r"other settings: train\.lr \(0\.001 -> 0\.01\)"):
        _fit(make_cfg("train.epochs=2", "train.lr=0.01"), exp, tmp_path, resume=True)
    with pytest.raises(UserError, match=r"model\.hidden"):
        _fit(make_cfg("train.epochs=2", "model.hidden=16"), exp, tmp_path, resume=True)
    # more epochs (and another device or time limit) is what resuming is for
    _, res, logs = _fit(make_cfg("train.epochs=2"), exp, tmp_path, resume=True)
    assert len(res.history) == 2 and any("resumed after epoch 1" in m for m in logs)


def test_transform_copies_draw_from_several_cached_views():
    tc, bc = TrainConfig(transform_views=3), BalanceConfig(mode="transform", rotation=45.0)
    views = feature_cache.feature_views(50, tc, bc)
    names = [v[0] for v in views]
    assert names[:2] == ["plain", "flip"] and len(names) == 5 and len(set(names)) == 5
    angles = np.stack([v[2] for v in views[2:]])
    assert np.abs(angles).max() <= 45 and not np.allclose(angles[0], angles[1])
    # every view of row i holds the value of its view's number: copies must land in 2..4, several of them
    store = [np.full((50, 1, 1, 1), v, dtype=np.float16) for v in range(5)]
    feats = {"views": store, "train_rows": np.arange(50), "n_plain": 2, "transform_views": np.array([2, 3, 4])}
    plan, copy = np.arange(50).repeat(4), np.tile([False, True, True, True], 50)
    seen_copy, seen_orig = set(), set()
    for x, pos in feature_cache.feature_batches(feats, plan, copy, 64, 0, 0, "cpu"):
        v = x.flatten().numpy().astype(int)
        seen_copy |= set(v[copy[pos]])
        seen_orig |= set(v[~copy[pos]])
    assert seen_copy == {2, 3, 4} and seen_orig == {0, 1}


def test_an_interruption_during_a_checkpoint_write_lands_after_it(tmp_path):
    """SIGTERM (or Ctrl-C) while torch.save writes a checkpoint used to break its zip writer, whose
    own RuntimeError then replaced the clean stop: the signal now waits for the write."""
    import os
    import signal

    from ensemble.checkpoints import save_checkpoint
    from ensemble.runtime import StopOnSigterm

    class Interrupting:  # the signal arrives while the state is being pickled
        def __reduce_ex__(self, protocol):
            os.kill(os.getpid(), signal.SIGTERM)
            return (int, (5,))

    path = tmp_path / "checkpoint.pt"
    with pytest.raises(KeyboardInterrupt), StopOnSigterm():
        save_checkpoint({"w": torch.zeros(1000), "x": Interrupting()}, path)
    saved = torch.load(path, weights_only=False)  # the test's own file (it holds an int by reduce)
    assert saved["w"].shape == (1000,) and saved["x"] == 5
