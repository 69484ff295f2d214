"""Issue 15: the AffectNet path on fixture trees of both layouts (official CSVs with and without
validation.csv's header; the train_set/val_set npy repackaging) and the data-side edges."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import write_image
from PIL import Image

from ensemble.classes import CLASS_INDEX
from ensemble.cli import main
from ensemble.config import DataConfig, load_config
from ensemble.data import (
    CLASSES,
    DROP_EXPRESSION_8_10,
    DROP_LABEL,
    DROP_VA,
    load_dataset,
    open_image,
)
from ensemble.errors import UserError
from ensemble.summary import render_summary, summarize

pytestmark = pytest.mark.filterwarnings("ignore:dropped")
HEADER = "subDirectory_filePath,face_x,face_y,face_width,face_height,facial_landmarks,expression,valence,arousal"


def _line(rel, expr, val, aro, box=(2, 2, 12, 12)):
    return f'{rel},{box[0]},{box[1]},{box[2]},{box[3]},"1.0;2.0",{expr},{val},{aro}'


def build_official(root: Path, val_header: bool = True) -> Path:
    """training.csv (with header) and validation.csv (with or without one): per class 3 training
    and 1 validation face, plus one row of each drop reason in each file."""
    images = root / "Manually_Annotated_Images"
    train, valid = [HEADER], ([HEADER] if val_header else [])
    for c in range(8):
        for i in range(3):
            write_image(images / str(c) / f"t{i}.jpg", seed=10 * c + i)
            train.append(_line(f"{c}/t{i}.jpg", c, 0.1 * (c - 4), 0.05 * c))
        write_image(images / str(c) / "v.jpg", seed=100 + c)
        valid.append(_line(f"{c}/v.jpg", c, -0.2, 0.3))
    for rows in (train, valid):
        rows += [_line("x/eight.jpg", 8, 0, 0), _line("x/eleven.jpg", 11, 0, 0), _line("x/nova.jpg", 1, -2, 0.1)]
    (root / "training.csv").write_text("\n".join(train) + "\n")
    (root / "validation.csv").write_text("\n".join(valid) + "\n")
    return root


def build_folder_layout(root: Path) -> Path:
    """train_set/val_set with images/ and annotations/<id>_exp|_val|_aro.npy (strings, as shipped)."""

    def put(split, stem, exp, val, aro, seed):
        write_image(root / split / "images" / f"{stem}.jpg", seed=seed)
        for suffix, v in (("exp", exp), ("val", val), ("aro", aro)):
            (root / split / "annotations").mkdir(parents=True, exist_ok=True)
            np.save(root / split / "annotations" / f"{stem}_{suffix}.npy", np.array(str(v)))

    for c in range(8):
        for i in range(3):
            put("train_set", f"{c}{i}", c, 0.1 * (c - 4), 0.05 * c, 10 * c + i)
        put("val_set", f"v{c}", c, -0.2, 0.3, 100 + c)
    for split in ("train_set", "val_set"):
        put(split, "eight", 8, 0, 0, 1)
        put(split, "eleven", 11, 0, 0, 2)
        put(split, "nova", 1, -2, 0.1, 3)
    return root


EXPECTED_DROPS = {DROP_EXPRESSION_8_10: 2, DROP_LABEL: 2, DROP_VA: 2}


@pytest.mark.parametrize("layout", ["official", "official-headerless", "folder"])
def test_both_layouts_read_the_same_faces_and_name_drops_alike(layout, tmp_path):
    if layout == "folder":
        root, fmt = build_folder_layout(tmp_path / "afn"), "affectnet-folder"
    else:
        root, fmt = build_official(tmp_path / "an", val_header=(layout == "official")), "affectnet"
    ds = load_dataset(DataConfig(format=fmt, root=str(root), val_fraction=0.3))
    df = ds.manifest
    assert dict(ds.dropped) == EXPECTED_DROPS  # one name per cause, whatever the layout (item 5)
    assert {s: dict(c) for s, c in ds.dropped_by_split.items()} == {
        "train": {DROP_EXPRESSION_8_10: 1, DROP_LABEL: 1, DROP_VA: 1},
        "test": {DROP_EXPRESSION_8_10: 1, DROP_LABEL: 1, DROP_VA: 1},
    }
    per_split = df.groupby("split").size().to_dict()
    assert per_split == {"train": 16, "val": 8, "test": 8}  # round(3 * 0.3) = 1 held out per class
    assert sorted(df.loc[df["split"] == "test", "label"]) == list(range(8))
    test = df[df["split"] == "test"]
    assert np.allclose(test["valence"], -0.2) and np.allclose(test["arousal"], 0.3)
    assert (df["va_source"] == "measured").all()
    if layout == "official-headerless":
        assert ds.notes and "validation.csv has no header line" in ds.notes[0]
    else:
        assert ds.notes == []


def test_headerless_validation_csv_is_said_in_data_summary(tmp_path, capsys):
    root = build_official(tmp_path / "an", val_header=False)
    cfg = load_config(None, ["data.format=affectnet", f"data.root={str(root)!r}"])
    result = summarize(cfg)
    text = render_summary(result)
    assert "note: validation.csv has no header line" in text and result["splits"]["test"]["n"] == 8
    main(["data", "summary", "--format", "affectnet", "--root", str(root), "--json"])
    out = json.loads(capsys.readouterr().out)
    assert any("no header line" in n for n in out["notes"])


def test_a_headerless_file_of_another_column_count_is_still_refused(tmp_path):
    root = tmp_path / "an"
    write_image(root / "Manually_Annotated_Images" / "1" / "a.jpg")
    (root / "validation.csv").write_text("1/a.jpg,0,0,16,16,1,0.5,0.5\n")  # 8 columns: not the documented 9
    with pytest.raises(UserError, match="missing AffectNet column"):
        load_dataset(DataConfig(format="affectnet", root=str(root)))


def test_a_header_of_words_is_not_taken_for_data(tmp_path):
    root = build_official(tmp_path / "an")
    text = (root / "training.csv").read_text().replace("valence,arousal", "val,arousal", 1)
    (root / "training.csv").write_text(text)
    with pytest.raises(UserError, match="missing AffectNet column.*valence"):
        load_dataset(DataConfig(format="affectnet", root=str(root)))


# --------------------------------------------------------------------------- item 6: validation per class


def _folder_counts(root: Path, counts: dict) -> Path:
    for c, n in counts.items():
        for i in range(n):
            write_image(root / c / f"{c}{i}.png", seed=i)
    return root


def test_every_class_with_two_faces_gets_a_validation_face(tmp_path):
    root = _folder_counts(tmp_path / "f", {"happy": 200, "contempt": 10, "fear": 2})
    df = load_dataset(DataConfig(format="folder", root=str(root), val_fraction=0.05)).manifest
    val = df[df["split"] == "val"]["label"].value_counts().to_dict()
    # round(200 * 0.05) = 10; round(10 * 0.05) = 0 -> 1; round(2 * 0.05) = 0 -> 1 (one stays in train)
    assert val == {CLASSES.index("happy"): 10, CLASSES.index("contempt"): 1, CLASSES.index("fear"): 1}
    assert (df[df["split"] == "train"]["label"] == CLASSES.index("fear")).sum() == 1


def test_a_class_without_validation_faces_is_warned_about(tmp_path):
    root = _folder_counts(tmp_path / "f", {"happy": 20, "contempt": 1})
    with pytest.warns(UserWarning, match=r"no validation face of contempt \(1 training face\)"):
        load_dataset(DataConfig(format="folder", root=str(root), val_fraction=0.1))


# --------------------------------------------------------------------------- item 8: manifests and files


def test_csv_duplicates_are_dropped_and_named(tmp_path):
    for n in ("a", "b"):
        write_image(tmp_path / f"{n}.png")
    (tmp_path / "m.csv").write_text(
        "path,label,split\na.png,happy,train\na.png,happy,train\n./a.png,happy,train\nb.png,sad,test\n"
    )
    ds = load_dataset(DataConfig(format="csv", root=str(tmp_path / "m.csv"), val_fraction=0))
    assert len(ds.manifest) == 2 and dict(ds.dropped) == {"duplicate row (same image and box)": 2}


def test_csv_duplicate_with_another_label_is_named_apart(tmp_path):
    write_image(tmp_path / "a.png")
    (tmp_path / "m.csv").write_text("path,label\na.png,happy\na.png,sad\na.png,happy\n")
    ds = load_dataset(DataConfig(format="csv", root=str(tmp_path / "m.csv"), val_fraction=0))
    assert ds.manifest["label"].tolist() == [CLASS_INDEX["happy"]]
    assert dict(ds.dropped) == {
        "duplicate row (same image and box)": 1,
        "duplicate row with another label (same image and box; the first row's label is kept)": 1,
    }


def test_csv_path_in_two_splits_is_an_error(tmp_path):
    write_image(tmp_path / "a.png")
    (tmp_path / "m.csv").write_text("path,label,split\na.png,happy,train\na.png,happy,test\n")
    with pytest.raises(UserError, match=r"a\.png is in two splits \(test and train\)"):
        load_dataset(DataConfig(format="csv", root=str(tmp_path / "m.csv")))


def test_csv_headers_that_collide_when_case_is_ignored_are_refused(tmp_path):
    write_image(tmp_path / "a.png")
    (tmp_path / "m.csv").write_text("path,label,Path\na.png,happy,b.png\n")
    with pytest.raises(UserError, match="repeat in the header when case is ignored.*Path, path"):
        load_dataset(DataConfig(format="csv", root=str(tmp_path / "m.csv")))


def test_folder_names_a_fifo_and_a_link_to_a_device_without_opening_them(tmp_path):
    root = _folder_counts(tmp_path / "f", {"happy": 2})
    os.mkfifo(root / "happy" / "pipe.png")
    (root / "happy" / "zero.png").symlink_to("/dev/zero")  # stat()ed only; opening it would read forever
    (root / "happy" / "gone.png").symlink_to(root / "nothing.png")
    ds = load_dataset(DataConfig(format="folder", root=str(root), val_fraction=0))
    assert len(ds.manifest) == 2
    assert dict(ds.dropped) == {"not a regular file (FIFO, device, broken link)": 3}


def test_csv_row_naming_a_fifo_is_not_called_missing(tmp_path):
    write_image(tmp_path / "a.png")
    os.mkfifo(tmp_path / "p.png")
    (tmp_path / "m.csv").write_text("path,label\na.png,happy\np.png,sad\nq.png,sad\n")
    ds = load_dataset(DataConfig(format="csv", root=str(tmp_path / "m.csv"), val_fraction=0))
    assert dict(ds.dropped) == {"not a regular file (FIFO, device, broken link)": 1, "image file missing": 1}


@pytest.mark.parametrize("scale", [1.0, 255.0])
def test_a_float_tiff_is_scaled_not_truncated_to_black(scale, tmp_path):
    arr = np.linspace(0, 1, 16 * 16, dtype=np.float32).reshape(16, 16) * scale
    Image.fromarray(arr, "F").save(tmp_path / "f.tif")
    got = np.asarray(open_image(tmp_path / "f.tif"))[..., 0].astype(int)
    assert got.min() == 0 and got.max() == 255 and abs(got.mean() - 127.5) < 2


@pytest.mark.parametrize("values", [[-1.0, 0.5], [0.0, 300.0], [0.0, float("nan")]])
def test_a_float_image_of_unknown_range_is_refused_by_name(values, tmp_path):
    from ensemble.data import ImageError

    arr = np.full((8, 8), values[0], np.float32)
    arr[0, 0] = values[1]
    Image.fromarray(arr, "F").save(tmp_path / "f.tif")
    with pytest.raises(ImageError, match="float image"):
        open_image(tmp_path / "f.tif")


# --------------------------------------------------------------------------- item 1: the report's experiments

REPO = Path(__file__).resolve().parents[1]
RECIPES = {  # config -> (optimizer, balance.mode, balance.weights, the report's figure)
    "affectnet-adam-baseline": ("adam", "none", "none", "48%"),
    "affectnet-upsample-20k": ("adam", "transform", "none", "50%"),
    "affectnet-sgd-weighted": ("sgd", "none", "inverse", "55%"),
}


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_the_report_experiments_are_configs_that_say_what_they_reproduce(name):
    optimizer, mode, weights, figure = RECIPES[name]
    cfg = load_config(REPO / "configs" / f"{name}.toml")
    assert (cfg.model.backbone, cfg.model.pretrained, cfg.model.trainable, cfg.model.head) == (
        "vgg16",
        "imagenet",
        "block3",
        "classic",
    )
    assert (cfg.train.optimizer, cfg.balance.mode, cfg.balance.weights) == (optimizer, mode, weights)
    assert cfg.data.format == "affectnet" and cfg.data.image_size == 224
    if mode == "transform":
        assert cfg.balance.cap == 20000
    if optimizer == "sgd":
        assert cfg.train.momentum > 0 and cfg.train.weight_decay > 0
    readme = (REPO / "README.md").read_text()
    row = next(line for line in readme.splitlines() if f"`configs/{name}.toml`" in line and line.startswith("|"))
    assert figure in row


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_the_report_configs_run_as_they_are_on_a_fixture(name, tmp_path, capsys, one_thread):
    """Each config trains the flat model on the fixture tree (header-less validation.csv), with only
    what a CPU test must change: a tiny backbone without downloads, small faces, one epoch."""
    root = build_official(tmp_path / "an", val_header=False)
    run = tmp_path / "run"
    main(
        [
            "fit-flat",
            "--config",
            str(REPO / "configs" / f"{name}.toml"),
            "--out",
            str(run),
            "--set",
            f"data.root={str(root)!r}",
            "--set",
            f"data.cache_dir={str(tmp_path / 'c')!r}",
            "--set",
            "data.num_workers=0",
            "--set",
            "model.backbone=tinyvgg",
            "--set",
            "model.pretrained=none",
            "--set",
            "data.image_size=32",
            "--set",
            "train.epochs=1",
            "--set",
            "train.batch_size=16",
            "--set",
            "train.device=cpu",
            "--set",
            "train.precision=fp32",
        ]
    )
    out = capsys.readouterr().out
    meta = json.loads((run / "flat" / "meta.json").read_text())
    config = json.loads((run / "flat" / "config.json").read_text())
    optimizer, mode, weights, _ = RECIPES[name]
    assert (config["train"]["optimizer"], config["balance"]["mode"], config["balance"]["weights"]) == (
        optimizer,
        mode,
        weights,
    )
    assert meta["trainable"] == "block3" and meta["head"] == "classic"
    assert meta["crop"] == {"box_source": "annotation", "margin": 0.0}
    assert "flat: model.trainable = 'block3'" in out and "flat test:" in out
