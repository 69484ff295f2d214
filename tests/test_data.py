"""Data adapters, the manifest, and image decoding on small fixture trees built here."""

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import SHARED_FERPLUS, png_with_declared_size, write_broken_files, write_image
from PIL import Image

from ensemble.config import DataConfig, load_config
from ensemble.data import (
    CLASSES,
    VOTE_COLUMNS,
    ImageError,
    face_array,
    load_dataset,
    open_image,
    prototype_table,
    row_box,
)
from ensemble.errors import UserError
from ensemble.synthetic import synthetic_dataset

# drops are announced as warnings; the tests assert the counts instead
pytestmark = pytest.mark.filterwarnings("ignore:dropped")

C = {c: i for i, c in enumerate(CLASSES)}


def dcfg(fmt, root, **kw) -> DataConfig:
    return DataConfig(format=fmt, root=str(root), **kw)


def counts(df, split=None) -> dict:
    sub = df if split is None else df[df["split"] == split]
    return {CLASSES[k]: int(v) for k, v in sub["label"].value_counts().items()}


# --------------------------------------------------------------------------- AffectNet (official CSVs)

AFFECTNET_HEADER = (
    "subDirectory_filePath,face_x,face_y,face_width,face_height,facial_landmarks,expression,valence,arousal"
)
RED_BOX = (10, 5, 20, 16)  # x, y, w, h of the coloured face region in 1/h0.jpg
BOX_RGB = (200, 30, 60)


def _affectnet_line(rel, expr, val, aro, box=(0, 0, 16, 16)):
    x, y, w, h = box
    return f'{rel},{x},{y},{w},{h},"1.0;2.0;3.0;4.0",{expr},{val},{aro}'


def build_affectnet(root: Path, columns: str = AFFECTNET_HEADER) -> Path:
    images = root / "Manually_Annotated_Images"
    train = []
    # 8 happy; the first has a distinct red face box on a blue image
    arr = np.zeros((30, 40, 3), np.uint8)
    arr[:] = (0, 0, 255)
    x, y, w, h = RED_BOX
    arr[y : y + h, x : x + w] = BOX_RGB
    (images / "1").mkdir(parents=True)
    Image.fromarray(arr).save(images / "1" / "h0.jpg", quality=95, subsampling=0)
    train.append(_affectnet_line("1/h0.jpg", 1, 0.5, 0.25, RED_BOX))
    for i in range(1, 8):
        write_image(images / "1" / f"h{i}.jpg", seed=i)
        train.append(_affectnet_line(f"1/h{i}.jpg", 1, 0.6, 0.3))
    # 4 neutral; the last one has no usable box (width 0)
    for i in range(4):
        write_image(images / "2" / f"n{i}.jpg", seed=100 + i)
        train.append(_affectnet_line(f"2/n{i}.jpg", 0, 0.0, -0.1, (0, 0, 0, 16) if i == 3 else (0, 0, 16, 16)))
    # dropped rows (their images need not exist)
    train.append(_affectnet_line("9/none.jpg", 8, 0.1, 0.1))
    train.append(_affectnet_line("9/uncertain.jpg", 9, 0.1, 0.1))
    train.append(_affectnet_line("9/noface.jpg", 10, -2, -2))
    train.append(_affectnet_line("9/noval.jpg", 1, -2, 0.3))
    train.append(_affectnet_line("9/noaro.jpg", 1, 0.3, -2))
    train.append(_affectnet_line("9/garbage.jpg", "abc", 0.3, 0.3))
    train.append(_affectnet_line("9/eleven.jpg", 11, 0.3, 0.3))
    (root / "training.csv").write_text(columns + "\n" + "\n".join(train) + "\n")
    valid = []
    write_image(images / "3" / "s0.jpg", seed=200)
    valid.append(_affectnet_line("3/s0.jpg", 2, -0.6, -0.3))
    write_image(images / "3" / "a0.jpg", seed=201)
    valid.append(_affectnet_line("3/a0.jpg", 6, -0.5, 0.6))
    valid.append(_affectnet_line("3/x.jpg", 9, 0.0, 0.0))
    (root / "validation.csv").write_text(columns + "\n" + "\n".join(valid) + "\n")
    return root


def test_affectnet_official(tmp_path):
    root = build_affectnet(tmp_path / "affectnet")
    ds = load_dataset(dcfg("affectnet", root, val_fraction=0.25))
    df = ds.manifest
    assert len(df) == 14
    assert counts(df, "test") == {"sad": 1, "anger": 1}
    # stratified hold-out: round(8 * 0.25) = 2 happy, round(4 * 0.25) = 1 neutral
    assert counts(df, "val") == {"happy": 2, "neutral": 1}
    assert counts(df, "train") == {"happy": 6, "neutral": 3}
    assert dict(ds.dropped) == {
        "expression 8-10 (none, uncertain, no face)": 4,  # 8, 9, 10 in training, 9 in validation
        "valence/arousal missing (-2) or out of range": 2,
        "malformed AffectNet row": 1,
        "label outside the classes": 1,
    }
    assert (df["va_source"] == "measured").all()
    assert df[VOTE_COLUMNS].isna().all().all()
    h0 = df[df["path"].str.endswith("h0.jpg")].iloc[0]
    assert Path(h0["path"]) == root / "Manually_Annotated_Images" / "1" / "h0.jpg"
    assert (h0["x"], h0["y"], h0["w"], h0["h"]) == RED_BOX
    assert (h0["valence"], h0["arousal"]) == (0.5, 0.25)
    s0 = df[df["path"].str.endswith("s0.jpg")].iloc[0]
    assert s0["split"] == "test" and (s0["valence"], s0["arousal"]) == (-0.6, -0.3)
    n3 = df[df["path"].str.endswith("n3.jpg")].iloc[0]
    assert row_box(n3) is None and np.isnan(n3["w"])  # a zero-width box means the whole image

    # face_array crops the box: the crop is the box's colour, the whole image is mostly blue
    crop = face_array(h0["path"], row_box(h0), 8)
    assert crop.shape == (8, 8, 3) and crop.dtype == np.uint8
    assert np.abs(crop.reshape(-1, 3).mean(0) - BOX_RGB).max() < 10
    whole = face_array(h0["path"], None, 8).reshape(-1, 3).mean(0)
    assert whole[2] > 100 and whole[0] < 120


def test_affectnet_val_split_is_seeded(tmp_path):
    root = build_affectnet(tmp_path / "affectnet")
    a = load_dataset(dcfg("affectnet", root, val_fraction=0.25), seed=1).manifest
    b = load_dataset(dcfg("affectnet", root, val_fraction=0.25), seed=1).manifest
    assert a["split"].tolist() == b["split"].tolist()


def test_affectnet_missing_column_is_named(tmp_path):
    header = AFFECTNET_HEADER.replace(",arousal", ",aro")
    root = build_affectnet(tmp_path / "affectnet", columns=header)
    with pytest.raises(UserError, match="arousal"):
        load_dataset(dcfg("affectnet", root))


def test_affectnet_landmarks_column_optional(tmp_path):
    root = tmp_path / "an"
    write_image(root / "Manually_Annotated_Images" / "1" / "a.jpg")
    (root / "training.csv").write_text(
        "subDirectory_filePath,face_x,face_y,face_width,face_height,expression,valence,arousal\n"
        "1/a.jpg,0,0,16,16,7,-0.4,0.2\n"
    )
    df = load_dataset(dcfg("affectnet", root, val_fraction=0)).manifest
    assert df["label"].tolist() == [C["contempt"]] and df["split"].tolist() == ["train"]


def test_affectnet_no_csv(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="training.csv"):
        load_dataset(dcfg("affectnet", tmp_path / "empty"))


# --------------------------------------------------------------------------- AffectNet (folder layout)


def _ann(folder: Path, stem: str, exp=None, val=None, aro=None, as_str=False):
    folder.mkdir(parents=True, exist_ok=True)
    for suffix, v in (("exp", exp), ("val", val), ("aro", aro)):
        if v is not None:
            np.save(folder / f"{stem}_{suffix}.npy", np.array(str(v) if as_str else v))


def test_affectnet_folder(tmp_path):
    root = tmp_path / "afn"
    tr = root / "train_set"
    for i in range(4):
        write_image(tr / "images" / f"{i}.jpg", seed=i)
        _ann(tr / "annotations", str(i), 1, 0.5, 0.1, as_str=(i % 2 == 0))  # AffectNet stores strings
    write_image(tr / "images" / "4.jpg", seed=4)
    _ann(tr / "annotations", "4", 3, 0.2, 0.9)
    write_image(tr / "images" / "5.jpg", seed=5)
    _ann(tr / "annotations", "5", 1, 0.5)  # no _aro.npy
    write_image(tr / "images" / "6.jpg", seed=6)
    _ann(tr / "annotations", "6", 9, 0.0, 0.0)  # uncertain
    write_image(root / "val_set" / "images" / "10.jpg", seed=10)
    _ann(root / "val_set" / "annotations", "10", 2, -0.7, -0.2)

    ds = load_dataset(dcfg("affectnet-folder", root, val_fraction=0))
    df = ds.manifest
    assert counts(df, "train") == {"happy": 4, "surprise": 1}
    assert counts(df, "test") == {"sad": 1}  # the official validation set is our test set
    # expression 9 is dropped under the same name as in the CSV layout (issue 15 item 5)
    assert dict(ds.dropped) == {"missing or unreadable annotation": 1, "expression 8-10 (none, uncertain, no face)": 1}
    sad = df[df["split"] == "test"].iloc[0]
    assert (sad["valence"], sad["arousal"]) == (-0.7, -0.2)
    assert (df["va_source"] == "measured").all()
    assert df["x"].isna().all()


def test_affectnet_folder_wrong_layout(tmp_path):
    (tmp_path / "nothing" / "stuff").mkdir(parents=True)
    with pytest.raises(UserError, match="images"):
        load_dataset(dcfg("affectnet-folder", tmp_path / "nothing"))


# --------------------------------------------------------------------------- FER+

# vote order in label.csv: neutral, happiness, surprise, sadness, anger, disgust, fear, contempt, unknown, NF
FER_TRAIN = {
    "fer0000000.png": "6,2,1,1,0,0,0,0,0,0",  # neutral; votes .6 .2 .1 .1
    "fer0000001.png": "0,0,0,5,3,2,0,0,0,0",  # sad
    "fer0000002.png": "4,4,0,0,0,0,0,0,2,0",  # tie
    "fer0000003.png": "2,0,0,0,0,0,0,0,6,2",  # unknown on top
    "fer0000004.png": "0,0,0,0,0,0,0,0,0,10",  # not a face
    "fer0000005.png": "x,0,0,0,0,0,0,0,0,0",  # text
    "fer0000006.png": "5,-1,0,0,0,0,0,0,0,0",  # negative
    "fer0000007.png": "0,0,0,0,0,0,0,0,0,0",  # no votes
    "fer0000008.png": "0,0,0,0,0,0,3,7,1,0",  # contempt; unknown not part of the distribution
}
FER_VALID = {"fer0000009.png": "0,1,9,0,0,0,0,0,0,0"}  # surprise


def build_ferplus(root: Path) -> Path:
    for folder, rows in (("FER2013Train", FER_TRAIN), ("FER2013Valid", FER_VALID)):
        lines = []
        for name, votes in rows.items():
            write_image(root / folder / name, size=(48, 48), mode="L", seed=len(lines))
            lines.append(f'{name},"(0, 0, 48, 48)",{votes}')
        (root / folder / "label.csv").write_text("\n".join(lines) + "\n")
    return root


def test_ferplus(tmp_path):
    root = build_ferplus(tmp_path / "ferplus")
    ds = load_dataset(dcfg("ferplus", root))
    df = ds.manifest
    # FER2013Valid is a test split; one face per class is too few to hold a selection split out
    # of; no FER2013Test: simply absent
    assert set(df["split"]) == {"train", "valid"}
    assert counts(df, "train") == {"neutral": 1, "sad": 1, "contempt": 1}
    assert counts(df, "valid") == {"surprise": 1}
    assert dict(ds.dropped) == {"tied top vote": 1, "top vote unknown or not a face": 2, "bad vote counts": 3}
    assert np.allclose(df[VOTE_COLUMNS].sum(axis=1), 1.0)

    by = df.set_index(df["path"].map(lambda p: Path(p).name))
    r0 = by.loc["fer0000000.png"]
    assert Path(r0["path"]) == root / "FER2013Train" / "fer0000000.png"
    assert r0["label"] == C["neutral"]
    expect = dict.fromkeys(VOTE_COLUMNS, 0.0) | {
        "vote_neutral": 0.6,
        "vote_happy": 0.2,
        "vote_surprise": 0.1,
        "vote_sad": 0.1,
    }
    assert r0[VOTE_COLUMNS].astype(float).to_dict() == pytest.approx(expect)
    # derived V/A = votes @ prototypes: .2*(.8,.35) + .1*(.25,.8) + .1*(-.7,-.35)
    assert (r0["valence"], r0["arousal"]) == pytest.approx((0.115, 0.115))
    assert r0["va_source"] == "derived"
    votes = df[VOTE_COLUMNS].to_numpy(float)
    assert np.allclose(df[["valence", "arousal"]].to_numpy(float), votes @ prototype_table())

    r1 = by.loc["fer0000001.png"]
    assert r1["label"] == C["sad"]
    assert (r1["vote_sad"], r1["vote_anger"], r1["vote_disgust"]) == pytest.approx((0.5, 0.3, 0.2))
    r8 = by.loc["fer0000008.png"]
    assert r8["label"] == C["contempt"]
    assert (r8["vote_contempt"], r8["vote_fear"]) == pytest.approx((0.7, 0.3))


def test_ferplus_malformed_rows_counted(tmp_path):
    root = tmp_path / "fp"
    for i in range(3):
        write_image(root / "FER2013Test" / f"f{i}.png", size=(48, 48), mode="L", seed=i)
    (root / "FER2013Test" / "label.csv").write_text(
        'f0.png,"(0, 0, 48, 48)",6,2,1,1,0,0,0,0,0,0\n'
        'f1.png,"(0, 0, 48, 48)",6,2,1,1,0,0,0,0,0,0,7\n'  # one field too many
        'f2.png,"(0, 0, 48, 48)",1,1,1,1,1,1,1,8,0,0\n'
    )
    ds = load_dataset(dcfg("ferplus", root))
    assert ds.manifest["split"].tolist() == ["test", "test"]
    assert counts(ds.manifest) == {"neutral": 1, "contempt": 1}
    assert dict(ds.dropped) == {"malformed label row": 1}  # never lost silently


def test_ferplus_prototype_override(tmp_path):
    root = build_ferplus(tmp_path / "ferplus")
    df = load_dataset(dcfg("ferplus", root, prototypes={"happiness": [1.0, 0.0]})).manifest
    r0 = df[df["path"].str.endswith("fer0000000.png")].iloc[0]
    # .2*(1, 0) + .1*(.25, .8) + .1*(-.7, -.35)
    assert (r0["valence"], r0["arousal"]) == pytest.approx((0.155, 0.045))


def test_prototype_table_errors():
    with pytest.raises(UserError, match="boredom"):
        prototype_table({"boredom": [0, 0]})
    with pytest.raises(UserError, match="happy"):
        prototype_table({"happy": [0.5]})
    assert prototype_table().shape == (8, 2)
    assert tuple(prototype_table({"joy": (0.1, 0.2)})[C["happy"]]) == (0.1, 0.2)


def test_ferplus_no_split(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="FER2013Train"):
        load_dataset(dcfg("ferplus", tmp_path / "empty"))


@pytest.mark.skipif(
    not (SHARED_FERPLUS / "FER2013Valid" / "label.csv").is_file(),
    reason=f"the FER+ data set is not at {SHARED_FERPLUS}",
)
def test_real_ferplus_valid_counts(tmp_path):
    root = tmp_path / "ferplus"
    root.mkdir()
    os.symlink(SHARED_FERPLUS / "FER2013Valid", root / "FER2013Valid")  # skip the large train folder
    cfg = load_config(None, ["data.format=ferplus", f"data.root={json.dumps(str(root))}"])
    ds = load_dataset(cfg.data)
    df = ds.manifest[ds.manifest["split"] == "valid"]
    assert len(df) == len(ds.manifest)
    assert counts(df) == {
        "neutral": 1241,
        "happy": 877,
        "surprise": 441,
        "sad": 396,
        "anger": 314,
        "fear": 70,
        "disgust": 31,
        "contempt": 26,
    }
    assert sum(ds.dropped.values()) == 183


# --------------------------------------------------------------------------- folder


def test_folder_flat_layout(folder_tree):
    ds = load_dataset(dcfg("folder", folder_tree, val_fraction=0))
    df = ds.manifest
    assert counts(df, "train") == {"happy": 3, "anger": 2, "surprise": 1}
    assert set(df["split"]) == {"train"}
    assert dict(ds.dropped) == {"not an image file name": 1, "label outside the classes": 1}
    # V/A derived from the one-hot label
    happy = df[df["label"] == C["happy"]]
    assert np.allclose(happy[["valence", "arousal"]].to_numpy(float), [0.8, 0.35])


def test_folder_reads_tiff_faces(tmp_path):
    """Lab sets such as JAFFE ship .tiff faces: they are read, not skipped as non-images."""
    write_image(tmp_path / "r" / "happy" / "a.tiff", size=(32, 32), mode="L", fmt="TIFF", seed=1)
    write_image(tmp_path / "r" / "sad" / "b.tif", size=(32, 32), fmt="TIFF", seed=2)
    ds = load_dataset(dcfg("folder", tmp_path / "r", val_fraction=0))
    assert counts(ds.manifest, "train") == {"happy": 1, "sad": 1} and not ds.dropped


def test_a_missing_relative_root_says_where_it_was_looked_for(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(
        UserError, match=r"data root not found: nowhere \(a relative data.root is read from the current folder, "
    ):
        load_dataset(dcfg("folder", "nowhere"))


def test_folder_holds_out_val(tmp_path):
    for i in range(10):
        write_image(tmp_path / "r" / "happy" / f"{i}.png", seed=i)
    df = load_dataset(dcfg("folder", tmp_path / "r", val_fraction=0.2)).manifest
    assert (df["split"] == "val").sum() == 2 and (df["split"] == "train").sum() == 8


def test_folder_split_layout(tmp_path):
    root = tmp_path / "split"
    write_image(root / "train" / "happy" / "a.png")
    write_image(root / "train" / "happy" / "b.png", seed=1)
    write_image(root / "train" / "Sadness" / "c.jpg", seed=2)
    write_image(root / "validation" / "neutral" / "d.png", seed=3)
    write_image(root / "test" / "scared" / "e.png", seed=4)
    write_image(root / "test" / "contempt" / "sub" / "f.webp", seed=5)  # nested files count
    write_image(root / "other" / "happy" / "g.png", seed=6)  # not a split folder: not read, counted
    ds = load_dataset(dcfg("folder", root))
    df = ds.manifest
    assert counts(df, "train") == {"happy": 2, "sad": 1}
    assert counts(df, "val") == {"neutral": 1}
    assert counts(df, "test") == {"fear": 1, "contempt": 1}
    assert not df["path"].str.contains("other").any()
    assert dict(ds.dropped) == {"folder beside train/val/test folders, not read (1 file(s) in it)": 1}


def test_folder_empty(tmp_path):
    (tmp_path / "e" / "happy").mkdir(parents=True)
    with pytest.raises(UserError, match="no images"):
        load_dataset(dcfg("folder", tmp_path / "e"))


# --------------------------------------------------------------------------- csv


def test_csv_manifest(tmp_path):
    root = tmp_path / "set"
    for n in "abcdefghi":
        write_image(root / "imgs" / f"{n}.png", seed=ord(n))
    absolute = write_image(tmp_path / "elsewhere" / "z.png")
    (root / "labels.csv").write_text(
        "path,label,valence,arousal,split\n"
        "imgs/a.png,happy,0.5,0.2,train\n"
        "imgs/b.png,3,,,test\n"  # index 3 = surprise; V/A derived
        "imgs/c.png,Angry,-0.5,0.6,valid\n"
        "imgs/d.png,boredom,0,0,train\n"
        "imgs/e.png,sad,nan,0.1,train\n"
        "imgs/f.png,sad,abc,0.1,train\n"
        "imgs/g.png,sad,1.5,0,train\n"
        "imgs/h.png,fear,0,0,holdout\n"
        f"{absolute},neutral,0.1,-0.1,train\n"
        "imgs/i.png,sad,,0.3,train\n"  # half a pair: not silently replaced by derived values
    )
    ds = load_dataset(dcfg("csv", root / "labels.csv"))
    df = ds.manifest
    assert dict(ds.dropped) == {
        "label outside the classes": 1,
        "valence/arousal not a number in [-1, 1]": 3,
        "unknown split": 1,
        "only one of valence/arousal given": 1,
    }
    assert counts(df, "train") == {"happy": 1, "neutral": 1}
    assert counts(df, "val") == {"anger": 1}
    assert counts(df, "test") == {"surprise": 1}
    by = df.set_index(df["path"].map(lambda p: Path(p).name))
    assert Path(by.loc["a.png", "path"]) == root / "imgs" / "a.png"  # relative to the manifest
    assert Path(by.loc["z.png", "path"]) == absolute
    assert (by.loc["a.png", "valence"], by.loc["a.png", "arousal"]) == (0.5, 0.2)
    assert by.loc["a.png", "va_source"] == "measured"
    assert (by.loc["b.png", "valence"], by.loc["b.png", "arousal"]) == pytest.approx((0.25, 0.8))
    assert by.loc["b.png", "va_source"] == "derived"


def test_csv_row_with_extra_fields_counted(tmp_path):
    write_image(tmp_path / "a.png")
    write_image(tmp_path / "b.png", seed=1)
    p = tmp_path / "m.csv"
    p.write_text("path,label\na.png,happy\nb.png,sad,surplus\n")
    ds = load_dataset(dcfg("csv", p, val_fraction=0))
    assert counts(ds.manifest) == {"happy": 1}
    assert sum(ds.dropped.values()) == 1


def test_csv_needs_path_and_label(tmp_path):
    p = tmp_path / "m.csv"
    p.write_text("file,valence\na.png,0.1\n")
    with pytest.raises(UserError, match="label"):
        load_dataset(dcfg("csv", p))


# --------------------------------------------------------------------------- bad input


def test_missing_image_file_counted(tmp_path):
    write_image(tmp_path / "ok.png")
    p = tmp_path / "m.csv"
    p.write_text("path,label\nok.png,happy\nmissing.png,sad\n")
    ds = load_dataset(dcfg("csv", p, val_fraction=0))
    assert ds.manifest["path"].map(lambda s: Path(s).name).tolist() == ["ok.png"]
    assert dict(ds.dropped) == {"image file missing": 1}
    # without the check the row stays
    assert len(load_dataset(dcfg("csv", p, val_fraction=0), check_files=False).manifest) == 2


def test_drops_warn(tmp_path):
    write_image(tmp_path / "ok.png")
    p = tmp_path / "m.csv"
    p.write_text("path,label\nok.png,happy\nmissing.png,sad\n")
    with pytest.warns(UserWarning, match=r"dropped 1 row\(s\): image file missing"):
        load_dataset(dcfg("csv", p))


def test_strict_turns_drop_into_error(tmp_path, folder_tree):
    with pytest.raises(UserError, match="data.strict"):
        load_dataset(dcfg("folder", folder_tree, strict=True))
    write_image(tmp_path / "ok.png")
    p = tmp_path / "m.csv"
    p.write_text("path,label\nok.png,happy\nmissing.png,sad\n")
    with pytest.raises(UserError, match="image file missing"):
        load_dataset(dcfg("csv", p, strict=True))


def test_unknown_format(tmp_path):
    with pytest.raises(UserError, match="imagenet"):
        load_dataset(dcfg("imagenet", tmp_path))


def test_missing_root(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_dataset(dcfg("folder", tmp_path / "nope"))
    with pytest.raises(UserError, match="data.root"):
        load_dataset(dcfg("folder", ""))


def test_nothing_usable(tmp_path):
    p = tmp_path / "m.csv"
    p.write_text("path,label\nmissing.png,sad\n")
    with pytest.raises(UserError, match="no usable rows"):
        load_dataset(dcfg("csv", p))


def test_max_samples_stratified(tmp_path):
    root = tmp_path / "r"
    for i in range(30):
        write_image(root / "happy" / f"{i}.png", size=(4, 4), seed=i)
    for i in range(10):
        write_image(root / "sad" / f"{i}.png", size=(4, 4), seed=100 + i)
    df = load_dataset(dcfg("folder", root, val_fraction=0, max_samples=8)).manifest
    assert counts(df) == {"happy": 6, "sad": 2}


# --------------------------------------------------------------------------- images


def _check_good(arr, size=16):
    assert isinstance(arr, np.ndarray)
    assert arr.dtype == np.uint8 and arr.shape == (size, size, 3)


def test_image_rgba_composited_on_black(tmp_path):
    a = np.zeros((16, 16, 4), np.uint8)
    a[:, :8] = (255, 0, 0, 0)  # transparent red
    a[:, 8:] = (0, 255, 0, 255)  # opaque green
    p = tmp_path / "rgba.png"
    Image.fromarray(a, "RGBA").save(p)
    out = face_array(p, None, 16)
    _check_good(out)
    assert (out[:, :8] == 0).all()
    assert (out[:, 8:] == (0, 255, 0)).all()


def test_image_16bit_grayscale(tmp_path):
    b = np.tile(np.array([[0, 65535], [65535, 0]], np.uint16), (8, 8))
    p = tmp_path / "g16.png"
    im = Image.fromarray(b)
    assert im.mode == "I;16"
    im.save(p)
    out = face_array(p, None, 16)
    _check_good(out)
    assert (out[..., 0] == (b // 257)).all()  # 65535 -> 255, not clipped garbage
    assert (out[..., 0] == out[..., 2]).all()


def test_image_cmyk_jpeg(tmp_path):
    p = write_image(tmp_path / "cmyk.jpg", color=(0, 255, 255, 0), mode="CMYK")
    assert Image.open(p).mode == "CMYK"
    out = face_array(p, None, 16)
    _check_good(out)
    assert np.abs(out.reshape(-1, 3).mean(0) - (255, 0, 0)).max() < 8  # magenta + yellow = red


def test_image_palette(tmp_path):
    im = Image.new("P", (16, 16), 0)
    im.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    im.paste(1, (0, 8, 16, 16))
    p = tmp_path / "pal.png"
    im.save(p)
    out = face_array(p, None, 16)
    _check_good(out)
    assert (out[:8] == (10, 20, 30)).all() and (out[8:] == (200, 100, 50)).all()
    # a transparent palette entry goes to black
    p2 = tmp_path / "pal_t.png"
    im.save(p2, transparency=1)
    out2 = face_array(p2, None, 16)
    assert (out2[:8] == (10, 20, 30)).all() and (out2[8:] == 0).all()


def test_image_grayscale_and_resize(tmp_path):
    p = write_image(tmp_path / "l.png", size=(40, 24), color=77, mode="L")
    out = face_array(p, None, 16)
    _check_good(out)
    assert (out == 77).all()


def test_image_exif_orientation(tmp_path):
    a = np.zeros((10, 20, 3), np.uint8)  # 20 wide, 10 high: left red, right blue
    a[:, :10] = (255, 0, 0)
    a[:, 10:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    p = tmp_path / "rot.jpg"
    Image.fromarray(a).save(p, exif=exif.tobytes(), quality=95, subsampling=0)
    im = open_image(p)
    assert im.size == (10, 20)  # transposed: 10 wide, 20 high
    out = face_array(p, None, 8)
    _check_good(out, 8)
    top, bottom = out[:3].reshape(-1, 3).mean(0), out[-3:].reshape(-1, 3).mean(0)
    assert top[0] > 200 and top[2] < 50  # the stored left (red) is now on top
    assert bottom[2] > 200 and bottom[0] < 50


def test_image_non_ascii_name_with_spaces(tmp_path):
    p = write_image(tmp_path / "visages tristes" / "Zoë à l'été 笑.jpg", size=(20, 20), color=(0, 200, 0))
    out = face_array(p, None, 16)
    _check_good(out)
    assert np.abs(out.reshape(-1, 3).mean(0) - (0, 200, 0)).max() < 8
    assert open_image(str(p)).size == (20, 20)


def test_image_from_pil_source():
    im = Image.new("LA", (4, 4), (255, 255))
    out = face_array(im, None, 4)
    assert (out == 255).all()


def test_face_box_outside_image_is_clipped(tmp_path):
    a = np.zeros((20, 20, 3), np.uint8)
    a[10:, 10:] = (0, 255, 0)
    p = tmp_path / "q.png"
    Image.fromarray(a).save(p)
    out = face_array(p, (10, 10, 50, 50), 4)  # box runs past the edges: clipped to the green quarter
    assert (out == (0, 255, 0)).all()


@pytest.mark.parametrize("kind", ["empty", "text", "truncated"])
def test_image_broken_files(tmp_path, kind):
    p = write_broken_files(tmp_path)[kind]
    with pytest.raises(ImageError, match="cannot decode"):
        open_image(p)
    with pytest.raises(ImageError):
        face_array(p, None, 16)


def test_image_too_small(tmp_path):
    p = write_image(tmp_path / "one.png", size=(1, 1), color=(1, 2, 3))
    with pytest.raises(ImageError, match="too small"):
        face_array(p, None, 16)


def test_image_missing(tmp_path):
    with pytest.raises(ImageError, match="not found"):
        open_image(tmp_path / "nope.png")


@pytest.mark.parametrize("side", [30000, 9000])  # past the hard limit; past the warning limit
def test_image_decompression_bomb(tmp_path, side):
    p = png_with_declared_size(tmp_path / "bomb.png", side, side)
    assert p.stat().st_size < 1000
    t = time.perf_counter()
    with pytest.raises(ImageError, match="too large"):
        face_array(p, None, 16)
    assert time.perf_counter() - t < 1.0


# --------------------------------------------------------------------------- synthetic


def test_synthetic_deterministic(tmp_path):
    a = synthetic_dataset(tmp_path / "a", n=96, size=16, seed=3)
    b = synthetic_dataset(tmp_path / "b", n=96, size=16, seed=3)
    c = synthetic_dataset(tmp_path / "c", n=96, size=16, seed=4)
    fa, fb, fc = (Path(rows[0]["path"]).parent for rows in (a, b, c))
    assert (fa / "index.json").read_text() == (fb / "index.json").read_text()
    assert (fa / "index.json").read_text() != (fc / "index.json").read_text()
    names = sorted(p.name for p in fa.glob("*.png"))
    assert len(names) == len(a) and names == sorted(p.name for p in fb.glob("*.png"))
    for n in names:
        assert (fa / n).read_bytes() == (fb / n).read_bytes()
    shared = set(names) & {p.name for p in fc.glob("*.png")}
    assert any((fa / n).read_bytes() != (fc / n).read_bytes() for n in shared) or not shared
    # a second call reuses the drawn set
    mtime = (fa / "index.json").stat().st_mtime_ns
    assert [r["path"] for r in synthetic_dataset(tmp_path / "a", n=96, size=16, seed=3)] == [r["path"] for r in a]
    assert (fa / "index.json").stat().st_mtime_ns == mtime
    with Image.open(fa / names[0]) as im:
        assert im.size == (16, 16) and im.mode == "RGB"


def test_synthetic_balance_and_va(synthetic_cfg):
    ds = load_dataset(synthetic_cfg.data, seed=0)
    df = ds.manifest
    # n = 240: 3 test faces per class, the rest shared like AffectNet (see synthetic.CLASS_SHARES)
    assert counts(df, "test") == dict.fromkeys(CLASSES, 3)
    train = counts(df, "train")
    assert train == {
        "neutral": 44,
        "happy": 63,
        "sad": 18,
        "surprise": 16,
        "fear": 12,
        "disgust": 10,
        "anger": 20,
        "contempt": 7,
    }
    assert train["happy"] > 5 * train["contempt"]
    assert counts(df, "val")["happy"] == 9
    assert len(df) == 240 and sum(ds.dropped.values()) == 0
    va = df[["valence", "arousal"]].to_numpy(float)
    assert np.isfinite(va).all() and (np.abs(va) <= 1).all()
    assert (df["va_source"] == "measured").all()
    # classes sit near their prototypes: happy has higher mean valence than sad
    assert df.loc[df.label == C["happy"], "valence"].mean() > 0.5
    assert df.loc[df.label == C["sad"], "valence"].mean() < -0.4
    arr = face_array(df["path"].iloc[0], None, synthetic_cfg.data.image_size)
    _check_good(arr, 32)


def test_affectnet_expression_inf_or_huge_is_a_counted_drop(tmp_path):
    root = build_affectnet(tmp_path / "affectnet")
    with open(root / "training.csv", "a") as f:
        f.write(_affectnet_line("9/inf.jpg", "inf", 0.1, 0.1) + "\n")
        f.write(_affectnet_line("9/huge.jpg", "1e400", 0.1, 0.1) + "\n")
    ds = load_dataset(dcfg("affectnet", root, val_fraction=0.25))
    assert ds.dropped["malformed AffectNet row"] == 3 and len(ds.manifest) == 14
    assert ds.dropped_by_split["train"]["malformed AffectNet row"] == 3


def test_prepared_shard_follows_an_image_edited_in_place(tmp_path):
    """The shard is keyed by each file's size and mtime too: a repaired or replaced image is
    prepared afresh, never served stale from the cache."""
    import os

    from ensemble.prepare import load_images

    root = tmp_path / "faces"
    for i in range(3):
        write_image(root / "happy" / f"h{i}.png", seed=i)
    broken = root / "happy" / "h1.png"
    broken.write_bytes(broken.read_bytes()[:40])
    ds = load_dataset(dcfg("folder", root, val_fraction=0))
    with pytest.warns(UserWarning, match="unreadable"):
        before = load_images(ds.manifest, 16, tmp_path / "cache")
    assert before.ok.sum() == 2
    write_image(broken, seed=1)  # repaired in place, same path
    st = broken.stat()
    os.utime(broken, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    after = load_images(ds.manifest, 16, tmp_path / "cache")
    assert after.ok.all() and after.digest != before.digest


def test_cache_modes_differ_and_auto_picks_memory_only_when_it_fits(tmp_path, monkeypatch):
    from ensemble import prepare

    root = tmp_path / "faces"
    for i in range(3):
        write_image(root / "happy" / f"h{i}.png", seed=i)
    ds = load_dataset(dcfg("folder", root, val_fraction=0))
    cache = tmp_path / "cache"
    disk = prepare.load_images(ds.manifest, 16, cache, "disk")
    memory = prepare.load_images(ds.manifest, 16, cache, "memory")
    none = prepare.load_images(ds.manifest, 16, cache, "none")
    assert (disk.mode, memory.mode, none.mode) == ("disk", "memory", "none")
    assert isinstance(disk.array, np.memmap) and not isinstance(memory.array, np.memmap) and none.array is None
    for i in range(3):
        assert np.array_equal(disk.get(i), memory.get(i)) and np.array_equal(memory.get(i), none.get(i))
    assert disk.cache_dir == memory.cache_dir == none.cache_dir == cache  # a constructor argument
    shard = (cache / "prepared" / disk.digest / "images.npy").stat().st_size
    monkeypatch.setattr(prepare, "available_memory", lambda: 100 * shard)
    assert prepare.load_images(ds.manifest, 16, cache, "auto").mode == "memory"
    monkeypatch.setattr(prepare, "available_memory", lambda: 3 * shard)  # would take a third: too much
    assert prepare.load_images(ds.manifest, 16, cache, "auto").mode == "disk"
    monkeypatch.setattr(prepare, "available_memory", lambda: None)  # unknown: the safe choice
    assert prepare.load_images(ds.manifest, 16, cache, "auto").mode == "disk"


def test_folder_layout_counts_what_it_does_not_read(tmp_path):
    root = tmp_path / "faces"
    for split in ("train", "test"):
        for c, i in (("happy", 0), ("sad", 1)):
            write_image(root / split / c / f"{c}{i}.png", seed=i)
    write_image(root / "neutral" / "n0.png", seed=5)  # beside the split folders
    write_image(root / "Training" / "anger" / "a0.png", seed=6)
    write_image(root / "loose.png", seed=7)  # no class folder
    write_image(root / "train" / "happy" / "._happy0.png", seed=8)  # a macOS resource fork copy
    with pytest.warns(UserWarning) as caught:
        ds = load_dataset(dcfg("folder", root, val_fraction=0))
    assert len(ds.manifest) == 4
    dropped = dict(ds.dropped)
    beside = [k for k in dropped if k.startswith("folder beside train/val/test folders")]
    assert sum(dropped[k] for k in beside) == 2  # neutral/ and Training/, each named with its file count
    assert dropped["image outside the class folders"] == 1
    assert dropped["hidden file (e.g. macOS ._ copies)"] == 1
    assert any("neutral" in str(w.message) for w in caught)


def test_csv_numeric_labels_and_half_va_columns_are_said(tmp_path):
    write_image(tmp_path / "a.png", seed=1)
    write_image(tmp_path / "b.png", seed=2)
    (tmp_path / "m.csv").write_text("path,label,valence\na.png,0,0.5\nb.png,happy,0.2\n")
    with pytest.warns(UserWarning) as caught:
        ds = load_dataset(dcfg("csv", tmp_path / "m.csv", val_fraction=0))
    text = " ".join(str(w.message) for w in caught)
    assert "1 label(s) given as numbers, read as AffectNet's codes (0 neutral" in text
    assert "has a valence column but no arousal column" in text
    assert sorted(ds.manifest["label"].tolist()) == [0, 1]
