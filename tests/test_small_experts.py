"""Issue 15 item 4: a neighborhood with no class of its own (small data, ties) or no faces at all
is completed or merged, said in the log, never fatal."""

import json

import numpy as np
import pytest
from conftest import write_image

from ensemble.config import load_config
from stages.neighborhoods import complete_membership, membership

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore:dropped")]
NAMES = ["neutral", "happy", "sad", "surprise"]


def test_a_neighborhood_whose_classes_belong_elsewhere_takes_its_most_frequent_class():
    # class 3 has 19 faces in region 0 and 18 in region 1; min_count 20 -> a member of neither,
    # so membership() gives it to region 0 (its largest count) and region 1 is left empty
    counts = np.array([[0, 162, 0, 19], [0, 0, 0, 18]])
    members = membership(counts, 0.15, 20)
    assert members == [[1, 3], []]
    done, merged, notes = complete_membership(members, counts, np.array([[0.8, 0.5], [-0.8, -0.5]]), NAMES)
    assert done == [[1, 3], [3]] and merged == {}
    assert len(notes) == 1 and "neighborhood 1: no class of its own" in notes[0] and "surprise" in notes[0]


def test_a_neighborhood_without_faces_is_merged_with_the_nearest():
    counts = np.array([[0, 50, 0, 0], [0, 0, 40, 0], [0, 0, 0, 0]])
    centers = np.array([[0.8, 0.5], [-0.7, -0.3], [-0.6, -0.2]])
    done, merged, notes = complete_membership(membership(counts, 0.15, 20), counts, centers, NAMES)
    assert merged == {2: 1} and done == [[1], [2], [2]]
    assert "neighborhood 2: no training faces; merged with the nearest neighborhood 1" in notes[0]


def test_fit_experts_on_small_data_with_a_tied_class_is_not_fatal(tmp_path):
    """The issue's scenario: about 200 training faces, experts.min_count = 20, a class split
    19 / 18 between two regions; before, 'error: expert 1: no training faces in its neighborhood'."""
    from ensemble.experiment import open_experiment
    from stages.experts import fit_experts

    rng = np.random.default_rng(0)
    rows = ["path,label,valence,arousal,split"]

    def add(label, n, center, split, tag):
        for i in range(n):
            name = f"{tag}{i}.png"
            write_image(tmp_path / "img" / name, size=(16, 16), seed=len(rows))
            v, a = np.clip(np.array(center) + rng.normal(0, 0.03, 2), -1, 1)
            rows.append(f"img/{name},{label},{v:.3f},{a:.3f},{split}")

    add("happy", 162, (0.8, 0.5), "train", "h")
    add("surprise", 19, (0.8, 0.5), "train", "sa")
    add("surprise", 18, (-0.8, -0.5), "train", "sb")
    add("happy", 4, (0.8, 0.5), "val", "vh")
    add("surprise", 4, (-0.8, -0.5), "val", "vs")
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    cfg = load_config(
        None,
        [
            "data.format=csv",
            f"data.root={str(tmp_path / 'm.csv')!r}",
            f"data.cache_dir={str(tmp_path / 'cache')!r}",
            "data.image_size=16",
            "model.backbone=tinyvgg",
            "model.hidden=8",
            "train.epochs=1",
            "train.batch_size=32",
            "train.device=cpu",
            "train.precision=fp32",
            "neighborhoods.k=2",
            "neighborhoods.method=kmeans",
            "experts.min_count=20",
            "experts.train_on=true_va",
        ],
    )
    logs = []
    exp = open_experiment(cfg, tmp_path / "run", log=logs.append, progress=False)
    index = fit_experts(exp, log=logs.append)
    assert any("no class of its own" in line and "surprise" in line for line in logs), logs
    classes = sorted(sorted(e["classes"]) for e in index["experts"])
    assert classes == [["happy", "surprise"], ["surprise"]]
    saved = json.loads((tmp_path / "run" / "experts" / "index.json").read_text())
    assert saved["k"] == 2 and all(e["classes"] for e in saved["experts"])
