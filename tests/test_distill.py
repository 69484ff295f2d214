"""Distillation (``train.teacher``): a finished run's flat model's probabilities join the flat
model's targets; a teacher trained on another split is refused."""

import json

import numpy as np
import pytest
from conftest import TINY_SYNTHETIC, run_cli

from ensemble.classes import CLASSES
from ensemble.config import load_config
from ensemble.errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread")


def _sets(tmp_path, *extra):
    return [
        a
        for s in [*TINY_SYNTHETIC, f"data.cache_dir={json.dumps(str(tmp_path / 'cache'))}", *extra]
        for a in ("--set", s)
    ]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, one_thread):
    """A tiny finished run at 32 px: the teacher of the tests below."""
    from ensemble.experiment import open_experiment
    from stages.flat import fit_flat

    root = tmp_path_factory.mktemp("teacher")
    cfg = load_config(None, [*TINY_SYNTHETIC, f"data.cache_dir={json.dumps(str(root / 'cache'))}"])
    exp = open_experiment(cfg, root / "run", log=lambda m: None, progress=False)
    fit_flat(exp, log=lambda m: None)
    return root / "run"


def test_the_teachers_probabilities_are_mixed_into_the_targets(tmp_path, teacher, monkeypatch):
    """targets = (1 - w) * votes (one-hot labels here) + w * the teacher's probabilities, and the
    stage trains on them as distributions (train.soft_targets forced on for the mix)."""
    import stages.flat as flat
    from ensemble.experiment import open_experiment

    seen = {}

    def capture(name, task, cfg, data, *args, **kwargs):
        seen.update(soft=data.train_soft, y=data.train_y, cfg=cfg, extra=kwargs.get("fingerprint_extra"))
        return {}

    monkeypatch.setattr(flat, "train_network", capture)
    cfg = load_config(
        None,
        [
            *TINY_SYNTHETIC,
            f"data.cache_dir={json.dumps(str(tmp_path / 'cache'))}",
            f"train.teacher={json.dumps(str(teacher))}",
            "train.teacher_weight=0.25",
        ],
    )
    exp = open_experiment(cfg, tmp_path / "student", log=lambda m: None, progress=False)
    said = []
    flat.fit_flat(exp, log=said.append)
    tr, vi = exp.idx("train"), exp.idx("val")
    probs, extra = flat.teacher_probabilities(exp, exp.cfg.for_stage("flat"), tr, vi, log=lambda m: None)
    onehot = np.eye(len(CLASSES), dtype=np.float32)[seen["y"]]
    assert probs.shape == (len(tr), len(CLASSES)) and np.allclose(probs.sum(1), 1, atol=1e-5)
    assert np.allclose(seen["soft"], 0.75 * onehot + 0.25 * probs, atol=1e-6)
    assert not np.allclose(probs, onehot, atol=0.05)  # the teacher is no copy of the labels
    assert seen["cfg"].train.soft_targets is True and exp.cfg.train.soft_targets is False  # the run's config untouched
    assert seen["extra"]["teacher_weight"] == 0.25 and seen["extra"]["teacher"]["trunk_sha256"]
    assert any("distilling" in m and str(teacher) in m for m in said)


def test_fit_flat_distils_at_the_teachers_own_input_size(tmp_path, teacher, capsys):
    """A 40-px student of the 32-px teacher trains; the teacher reads its faces at 32 px; the
    finished stage's fingerprint names the teacher."""
    run = tmp_path / "student"
    argv = [
        "fit-flat",
        "--out",
        str(run),
        *_sets(tmp_path, "data.image_size=40", f"train.teacher={json.dumps(str(teacher))}"),
    ]
    code, out, err = run_cli(argv, capsys)
    assert code == 0, err
    assert "32 px" in out + err and "distilling" in out + err
    meta = json.loads((run / "flat" / "meta.json").read_text())
    theirs = json.loads((teacher / "flat" / "meta.json").read_text())
    assert meta["input_size"] == 40 and meta["fingerprint"]["teacher"]["trunk_sha256"] == theirs["trunk_sha256"]


def test_a_teacher_from_another_split_or_no_run_is_refused_in_one_line(tmp_path, teacher, capsys):
    other = _sets(tmp_path, "data.n_synthetic=320", f"train.teacher={json.dumps(str(teacher))}")
    code, out, err = run_cli(["fit-flat", "--out", str(tmp_path / "a"), *other], capsys)
    assert code != 0 and "another split" in err and len(err.strip().splitlines()) == 1
    none = _sets(tmp_path, f"train.teacher={json.dumps(str(tmp_path / 'nothing'))}")
    code, out, err = run_cli(["fit-flat", "--out", str(tmp_path / "b"), *none], capsys)
    assert code != 0 and "no trained flat model" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "a" / "flat").exists() and not (tmp_path / "b" / "flat").exists()


def test_bundled_names_the_bundled_default(tmp_path, teacher, monkeypatch):
    import ensemble.paths as paths
    from stages.flat import teacher_run

    monkeypatch.setattr(paths, "default_run", lambda: teacher)
    assert teacher_run("bundled") == teacher
    monkeypatch.setattr(paths, "default_run", lambda: None)
    with pytest.raises(UserError, match="no bundled model"):
        teacher_run("bundled")
