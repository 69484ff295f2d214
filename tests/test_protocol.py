"""The honest protocol: choices are made on the selection split ``val`` held out of the training
data; FER2013Valid (``valid``) and FER2013Test (``test``) are test splits nothing is tuned on."""

import json
from pathlib import Path

import pytest
from conftest import write_image

from ensemble.classes import CLASS_INDEX
from ensemble.config import load_config
from ensemble.data import load_dataset

pytestmark = pytest.mark.usefixtures("one_thread")

# vote order in label.csv: neutral, happiness, surprise, sadness, anger, disgust, fear, contempt, unknown, NF
NEUTRAL, HAPPY = "8,2,0,0,0,0,0,0,0,0", "1,9,0,0,0,0,0,0,0,0"


def build_ferplus(root: Path, n_train=10) -> Path:
    """FER2013Train: n_train neutral + n_train happy; FER2013Valid and FER2013Test: 2 each."""
    folders = {"FER2013Train": n_train, "FER2013Valid": 1, "FER2013Test": 1}
    for folder, n in folders.items():
        lines = []
        for i in range(2 * n):
            name = f"fer{folder[7:11]}{i:05d}.png"
            write_image(root / folder / name, size=(48, 48), mode="L", seed=i)
            lines.append(f'{name},"(0, 0, 48, 48)",{NEUTRAL if i % 2 else HAPPY}')
        (root / folder / "label.csv").write_text("\n".join(lines) + "\n")
    return root


def _ferplus_cfg(root, *extra):
    return load_config(None, ["data.format=ferplus", f"data.root={json.dumps(str(root))}", *extra])


def test_ferplus_selection_split_is_held_out_of_train_and_valid_is_a_test_split(tmp_path):
    root = build_ferplus(tmp_path / "ferplus")
    df = load_dataset(_ferplus_cfg(root, "data.val_fraction=0.2").data, seed=0).manifest
    folder = df["path"].map(lambda p: Path(p).parent.name)
    assert (folder[df["split"] == "valid"] == "FER2013Valid").all() and (df["split"] == "valid").sum() == 2
    assert (folder[df["split"] == "test"] == "FER2013Test").all() and (df["split"] == "test").sum() == 2
    val = df[df["split"] == "val"]
    assert (folder[val.index] == "FER2013Train").all()  # the selection split comes out of train
    # stratified: 20% of each class's 10 training faces
    assert val["label"].value_counts().to_dict() == {CLASS_INDEX["neutral"]: 2, CLASS_INDEX["happy"]: 2}
    assert (df["split"] == "train").sum() == 16
    # seeded: the same seed holds out the same faces, another seed other faces
    again = load_dataset(_ferplus_cfg(root, "data.val_fraction=0.2").data, seed=0).manifest
    other = load_dataset(_ferplus_cfg(root, "data.val_fraction=0.2").data, seed=5).manifest
    assert set(again.loc[again["split"] == "val", "path"]) == set(val["path"])
    assert set(other.loc[other["split"] == "val", "path"]) != set(val["path"])


def test_the_ferplus_config_follows_the_protocol():
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "ferplus-cpu.toml")
    assert cfg.data.format == "ferplus" and cfg.data.val_fraction > 0
    assert cfg.router.alpha == -1 and cfg.router.logit_adjust == "auto"  # chosen on the selection split
