"""The final distribution (flat mixing weight, logit adjustment) and the paired bootstrap, by hand."""

import numpy as np
import pytest

from ensemble.combine import choose_alpha, choose_tau, final_proba, log_prior, paired_se
from ensemble.metrics import paired_bootstrap


def test_bootstrap_of_identical_predictions_is_exactly_zero():
    rng = np.random.default_rng(0)
    y, pred = rng.integers(0, 8, 300), rng.integers(0, 8, 300)
    b = paired_bootstrap(y, pred, pred, n_resamples=200)
    for name in ("accuracy", "balanced_accuracy"):
        assert (b[name]["diff"], b[name]["low"], b[name]["high"]) == (0.0, 0.0, 0.0)


def test_bootstrap_all_right_against_all_wrong_is_exactly_one():
    y = np.array([0, 1, 2, 0, 1, 2, 3])
    b = paired_bootstrap(y, (y + 1) % 4, y, n_resamples=100)
    for name in ("accuracy", "balanced_accuracy"):
        assert (b[name]["diff"], b[name]["low"], b[name]["high"]) == (1.0, 1.0, 1.0)


def test_bootstrap_of_a_known_shift():
    """1000 faces, two classes of 500; the new model is right on 100 faces more than the base
    (50 per class): the difference is 0.1 in accuracy and balanced accuracy, and the interval is
    about 0.1 ± 1.96 · sd(per-face difference) / sqrt(n) = 0.1 ± 1.96 · 0.3 / sqrt(1000)."""
    y = np.repeat([0, 1], 500)
    base = np.where(np.arange(1000) % 2 == 0, y, 1 - y)  # right on every other face
    new = base.copy()
    wrong = np.flatnonzero(base != y)
    fixed = np.concatenate([wrong[y[wrong] == 0][:50], wrong[y[wrong] == 1][:50]])
    new[fixed] = y[fixed]
    b = paired_bootstrap(y, base, new, n_resamples=2000, seed=1)
    half = 1.96 * 0.3 / np.sqrt(1000)
    for name in ("accuracy", "balanced_accuracy"):
        assert b[name]["diff"] == pytest.approx(0.1)
        assert b[name]["low"] == pytest.approx(0.1 - half, abs=0.006)
        assert b[name]["high"] == pytest.approx(0.1 + half, abs=0.006)
    assert paired_bootstrap(y, base, new, n_resamples=2000, seed=1) == b  # seeded
    assert paired_bootstrap(y, base, new, n_resamples=2000, seed=2) != b


def test_final_proba_alpha_and_tau_by_hand():
    ph = np.array([[0.5, 0.5], [0.9, 0.1]])
    pf = np.array([[0.8, 0.2], [0.5, 0.5]])
    assert final_proba(ph) is ph  # alpha = tau = 0: the hierarchy itself
    np.testing.assert_allclose(final_proba(ph, pf, 1.0), pf, rtol=1e-6)  # alpha = 1: the flat model
    half = np.sqrt(ph * pf)
    np.testing.assert_allclose(final_proba(ph, pf, 0.5), half / half.sum(1, keepdims=True), rtol=1e-6)
    lp = np.log([0.75, 0.25])
    adj = ph / np.exp(lp)
    np.testing.assert_allclose(final_proba(ph, tau=1.0, log_prior=lp), adj / adj.sum(1, keepdims=True), rtol=1e-6)
    np.testing.assert_allclose(log_prior([0, 0, 1], 3), np.log([3 / 6, 2 / 6, 1 / 6]))  # add-one smoothed


def test_alpha_one_is_chosen_when_the_hierarchy_is_worse_on_selection():
    y = np.repeat([0, 1], 10)
    pf = np.eye(2)[y] * 0.8 + 0.1  # the flat model is right
    ph = np.eye(2)[1 - y] * 0.8 + 0.1  # the hierarchy is wrong on every face
    alpha, scores, _ = choose_alpha(y, pf, ph)
    assert alpha == 1.0 and scores[1.0] == 1.0 and scores[0.0] == 0.0


def test_alpha_below_a_half_when_the_hierarchy_is_right_and_the_flat_model_is_not():
    """Flat says class 0 at 0.9 for every face; the hierarchy says the true class at 0.9. A class-1
    face is right while (1 − α)·log 9 > α·log 9, i.e. α < 0.5: the largest such α on the grid is 0.4."""
    y = np.repeat([0, 1], 10)
    pf = np.tile([0.9, 0.1], (20, 1))
    ph = np.eye(2)[y] * 0.8 + 0.1
    alpha, scores, _ = choose_alpha(y, pf, ph)
    assert alpha == 0.4 and scores[0.5] == 0.5


def test_tau_is_the_smallest_adjustment_that_helps():
    """Prior (0.9, 0.1); class-1 faces get (0.6, 0.4): they flip to class 1 once
    tau·log 9 > log 1.5, tau > 0.185; class-0 faces (0.97, 0.03) stay until tau > log(97/3)/log 9 = 1.58."""
    y = np.repeat([0, 1], 10)
    p = np.where(y[:, None] == 0, [0.97, 0.03], [0.6, 0.4])
    lp = np.log([0.9, 0.1])
    tau, scores, _ = choose_tau(y, p, lp)
    assert tau == 0.25 and scores[0.0] == 0.5 and scores[1.5] == 1.0 and scores[2.0] == 0.5
    assert choose_tau(y, np.eye(2)[y] * 0.8 + 0.1, lp)[0] == 0.0  # nothing to fix: no adjustment


def test_a_gain_within_one_paired_standard_error_buys_no_change():
    """τ = 0.25 makes three class-1 faces right and two class-0 faces wrong (of 100 each): +0.5 points
    of balanced accuracy, within one paired standard error (1.1). ``one_se`` keeps τ = 0, ``best`` takes it."""
    y = np.repeat([0, 1], 100)
    p = np.where(y[:, None] == 0, [0.99, 0.01], [0.3, 0.7])
    p[100:130] = [0.6, 0.4]  # class 1, wrong at any τ on the grid
    p[130:133] = [0.52, 0.48]  # class 1, right once τ·log 3 > log(52/48), i.e. τ = 0.25
    p[:2] = [0.55, 0.45]  # class 0, wrong once τ·log 3 > log(55/45), i.e. τ = 0.25
    lp = np.log([0.75, 0.25])
    tau, scores, se = choose_tau(y, p, lp, grid=(0.0, 0.25), rule="one_se")
    assert scores[0.25] - scores[0.0] == pytest.approx(0.005) and se[0.0] == pytest.approx(0.0111, abs=1e-4)
    assert tau == 0.0
    assert choose_tau(y, p, lp, grid=(0.0, 0.25), rule="best")[0] == 0.25
    # and α: a hierarchy with the same noise-level gain is not taken over the flat model
    ph = p.copy()
    ph[130:133] = [0.4, 0.6]
    ph[:2] = [0.4, 0.6]
    assert choose_alpha(y, p, ph, grid=(0.0, 1.0))[0] == 1.0
    assert choose_alpha(y, p, ph, grid=(0.0, 1.0), rule="best")[0] == 0.0


def test_paired_se_is_the_per_class_standard_error_of_the_difference():
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    a = np.array([0, 0, 0, 1, 1, 1, 1, 0])  # right on 3 + 3
    b = np.array([0, 0, 1, 1, 1, 1, 0, 0])  # right on 2 + 2
    d0, d1 = np.array([0, 0, 1, 0]), np.array([0, 0, 1, 0])
    want = np.sqrt(d0.var(ddof=1) / 4 + d1.var(ddof=1) / 4) / 2
    assert paired_se(y, a, b) == pytest.approx(want)
    assert paired_se(y, a, a) == 0.0


def test_one_se_never_takes_a_value_worse_than_a_simpler_one_it_passed_over():
    """200 faces of class 0, 3 of class 1. α = 1 (0.88) is out of reach of the best, α = 0 (0.90),
    by more than its SE; α = 0.5 scores below α = 1 (0.83) but disagrees with the best on a rare
    face, so its own SE is wide enough to reach: it must not be taken; the best is."""
    from ensemble.combine import _select

    y = np.repeat([0, 1], [200, 3])
    pred = {a: y.copy() for a in (1.0, 0.5, 0.0)}
    pred[0.0][:40] = 1  # class 0: 160 of 200, class 1: 3 of 3 -> 0.90
    pred[1.0][:48] = 1  # class 0: 152 of 200 -> 0.88
    pred[0.5][200] = 0  # class 0: 200 of 200, class 1: 2 of 3 -> 0.83
    probas = {a: np.eye(2)[p] * 0.8 + 0.1 for a, p in pred.items()}
    v, scores, se = _select(y, probas, [1.0, 0.5, 0.0], "one_se")
    assert scores[0.5] < scores[1.0] < scores[0.0] - se[1.0]  # α = 1 rejected
    assert scores[0.5] >= scores[0.0] - se[0.5]  # α = 0.5 within its own (wide) SE of the best
    assert v == 0.0


def test_paired_se_counts_a_one_face_class():
    y = np.array([0, 0, 0, 0, 1])
    a = np.array([0, 0, 0, 0, 1])
    b = np.array([0, 0, 0, 0, 0])  # differs only on the one class-1 face
    assert paired_se(y, a, b) == pytest.approx(np.sqrt(0 / 4 + 1 / 1) / 2)
