"""Issue 15 on a tiny trained run: what meta.json records (trainable counts, crop geometry),
the meta.json schema, and ``predict`` on hostile files. One flat model, trained once."""

import json
import os
import shutil
from pathlib import Path

import pytest
from conftest import run_cli, write_image
from PIL import Image

from ensemble.config import load_config
from ensemble.crop import FACE_CROP_MARGIN, crop_box, training_crop
from ensemble.errors import UserError

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore:dropped"),
    pytest.mark.filterwarnings("ignore:no validation face"),
]
HEADER = "subDirectory_filePath,face_x,face_y,face_width,face_height,facial_landmarks,expression,valence,arousal"


def _affectnet(root: Path) -> Path:
    rows = [HEADER]
    for c in range(8):
        for i in range(4):
            write_image(root / "Manually_Annotated_Images" / str(c) / f"{i}.png", size=(40, 40), seed=10 * c + i)
            rows.append(f"{c}/{i}.png,4,4,30,30,,{c},0.1,0.1")
    (root / "training.csv").write_text("\n".join(rows) + "\n")
    return root


def _fit_flat(root: Path, run: Path, fmt: str, cache: Path, logs: list):
    from ensemble.experiment import open_experiment
    from stages.flat import fit_flat

    cfg = load_config(
        None,
        [
            f"data.format={fmt}",
            f"data.root={str(root)!r}",
            f"data.cache_dir={str(cache)!r}",
            "data.image_size=16",
            "model.backbone=tinyvgg",
            "model.hidden=8",
            "model.trainable=block3",
            "train.epochs=1",
            "train.batch_size=16",
            "train.device=cpu",
            "train.precision=fp32",
            "data.val_fraction=0.25",
        ],
    )
    fit_flat(open_experiment(cfg, run, log=logs.append, progress=False), log=logs.append)
    return json.loads((run / "flat" / "meta.json").read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory, one_thread):
    base = tmp_path_factory.mktemp("edges")
    folder = base / "faces"
    for c in ("happy", "sad", "anger"):
        for i in range(4):
            write_image(folder / c / f"{i}.png", size=(16, 16), seed=i)
    out = {}
    for name, fmt, root in (("affectnet", "affectnet", _affectnet(base / "an")), ("folder", "folder", folder)):
        logs = []
        meta = _fit_flat(root, base / f"run-{name}", fmt, base / "cache", logs)
        out[name] = {"run": base / f"run-{name}", "meta": meta, "logs": logs}
    return out


# --------------------------------------------------------------------------- item 2: counts


def test_trainable_counts_are_logged_and_recorded(runs):
    meta, logs = runs["affectnet"]["meta"], runs["affectnet"]["logs"]
    # tinyvgg: 4 blocks of 2 convolutions; block3 trains blocks 3-4 (4 convs) + the slim head's 2 linears
    assert (meta["n_trainable_layers"], meta["n_weight_layers"]) == (6, 10)
    assert 0 < meta["n_trainable_params"] < meta["n_params"]
    assert any("model.trainable = 'block3': 6 of 10 weight layers" in line for line in logs)


def test_vgg16_counts_per_trainable_setting_match_the_readme():
    """The README's table, measured on torchvision's VGG16 built with random weights (no download)."""
    from ensemble.config import ModelConfig
    from stages.backbones import build_model, trainable_counts

    net = build_model(ModelConfig(backbone="vgg16", pretrained="none", head="classic"), 8)
    got = {}
    for setting in ("head", "block5", "block4", "block3", "block2", "all"):
        net.freeze(setting)
        c = trainable_counts(net)
        got[setting] = (c["n_trainable_layers"], c["n_weight_layers"], c["n_trainable_params"])
    assert c["n_params"] == 134_293_320
    assert got == {
        "head": (3, 16, 119_578_632),
        "block5": (6, 16, 126_658_056),
        "block4": (9, 16, 132_557_832),
        "block3": (12, 16, 134_033_160),
        "block2": (14, 16, 134_254_600),
        "all": (16, 16, 134_293_320),
    }
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    for setting, (layers, total, params) in got.items():
        assert f"| `{setting}` | {layers} of {total} | {params / 1e6:.1f}M" in readme


# --------------------------------------------------------------------------- item 7: crop geometry


def test_crop_box_by_hand():
    assert crop_box((10, 20, 30, 40), (100, 100), 0.0) == (10, 20, 30, 40)
    assert crop_box((10, 20, 30, 40), (100, 100), 0.25) == (0, 10, 50, 60)  # 10 px each side, clipped at 0
    assert crop_box((90, 90, 20, 20), (100, 100), 0.1) == (88, 88, 12, 12)
    assert crop_box((5, 5, 0, 0), (100, 100), 0.2) == (5, 5, 1, 1)


def test_training_crop_and_its_default():
    assert training_crop([(0, 0, 5, 5), None, (1, 1, 2, 2)]) == {"box_source": "annotation", "margin": 0.0}
    assert training_crop([None, None, (1, 1, 2, 2)]) == {"box_source": "image", "margin": FACE_CROP_MARGIN}


def test_meta_records_the_training_crop(runs):
    assert runs["affectnet"]["meta"]["crop"] == {"box_source": "annotation", "margin": 0.0}
    assert runs["folder"]["meta"]["crop"] == {"box_source": "image", "margin": FACE_CROP_MARGIN}


_cli = run_cli  # (exit code, stdout, stderr) of ensemble ARGV, in-process


@pytest.mark.parametrize(
    "name,want",
    [
        # AffectNet boxes (box_source "annotation", margin 0): the detector's box is the crop
        ("affectnet", [40.0, 50.0, 30.0, 20.0]),
        # folder faces were face crops (box_source "image"): MTCNN's measured margin, -0.05 x 30 =
        # 1.5 px off every side of the 30-px square around the box centre (55, 60)
        ("folder", [41.5, 46.5, 27.0, 27.0]),
    ],
)
def test_predict_frames_the_detected_face_as_the_model_was_trained(name, want, runs, tmp_path, capsys, monkeypatch):
    import ensemble.detect
    from ensemble.detect import Face

    monkeypatch.setattr(ensemble.detect, "detect", lambda im, detector: [Face((40, 50, 30, 20), None, 0.99, detector)])
    write_image(tmp_path / "photo.png", size=(200, 100))
    code, out, err = _cli(
        ["predict", str(tmp_path / "photo.png"), "--run", str(runs[name]["run"]), "--flat", "--json"], capsys
    )
    assert code == 0, err
    rec = json.loads(out)
    assert rec["box"] == [40, 50, 30, 20]  # the detector's box, as it found it
    assert rec["crop"] == [round(v) for v in want]


def test_the_crop_rule_by_hand():
    """box_source "image": the detector's measured margin (the recorded 0.2 is not used);
    "annotation": the recorded margin through crop_box, clipped to the image."""
    from ensemble.detect import DEFAULT_MARGIN, face_region, run_crop

    folder = {"crop": {"box_source": "image", "margin": FACE_CROP_MARGIN}}
    assert run_crop(folder, "mtcnn") == ("image", DEFAULT_MARGIN["mtcnn"]) == ("image", -0.05)
    assert run_crop(folder, "haar") == ("image", 0.0)
    assert run_crop({}, "mtcnn") == ("image", -0.05)  # a run that records no crop was trained on face crops
    annotated = {"crop": {"box_source": "annotation", "margin": 0.25}}
    assert run_crop(annotated, "mtcnn") == run_crop(annotated, "haar") == ("annotation", 0.25)
    assert face_region((10, 20, 30, 40), (100, 100), "annotation", 0.25) == (0, 10, 50, 60)  # = crop_box
    assert face_region((10, 20, 30, 40), (100, 100), "image", 0.0) == (5, 20, 40, 40)  # the square, unclipped
    assert face_region((0, 0, 20, 20), (100, 100), "image", 0.5) == (-10, -10, 40, 40)


@pytest.mark.parametrize("bad", [{"flat": 0}, {"flat": float("nan")}, ["flat", 1.0], {"flat": "1"}])
def test_a_calibration_meta_with_bad_temperatures_is_refused(bad, tmp_path):
    from ensemble.meta_schema import check_meta

    assert check_meta({"stage": "calibration", "temperatures": {"flat": 1.3, "hierarchy": 0.9}}, tmp_path)
    with pytest.raises(UserError, match="field 'temperatures'"):
        check_meta({"stage": "calibration", "temperatures": bad}, tmp_path)


# --------------------------------------------------------------------------- item 8: meta.json schema


def _tampered(runs, tmp_path, change):
    run = tmp_path / "run"
    shutil.copytree(runs["folder"]["run"], run)
    meta_file = run / "flat" / "meta.json"
    meta = json.loads(meta_file.read_text())
    change(meta, run)
    meta_file.write_text(json.dumps(meta))
    return run


def _secret(meta, run):
    secret = run.parent / "secret.txt"
    secret.write_text("not for you")
    import hashlib

    meta["files"]["../../secret.txt"] = hashlib.sha256(secret.read_bytes()).hexdigest()


@pytest.mark.parametrize(
    "change,field",
    [
        (lambda m, r: m.update(input_size=0), "input_size"),
        (lambda m, r: m.update(input_size="48"), "input_size"),
        (lambda m, r: m.update(mean=[]), "mean"),
        (lambda m, r: m.update(std=[0, 0, 0]), "std"),
        (lambda m, r: m.update(std=[1, float("nan"), 1]), "std"),
        (lambda m, r: m.update(classes="happy"), "classes"),
        (lambda m, r: m.update(crop={"box_source": "elsewhere", "margin": 0}), "crop"),
        (_secret, "files"),
    ],
)
def test_a_tampered_meta_json_is_refused_in_one_line(change, field, runs, tmp_path, capsys):
    run = _tampered(runs, tmp_path, change)
    write_image(tmp_path / "face.png")
    code, out, err = _cli(["predict", str(tmp_path / "face.png"), "--run", str(run), "--flat", "--no-detect"], capsys)
    assert code == 2 and out == "" and "Traceback" not in err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1 and f"field '{field}'" in err


# --------------------------------------------------------------------------- item 8: predict on hostile files


def test_predict_skips_a_2x30000_image_and_goes_on(runs, tmp_path, capsys):
    Image.new("RGB", (2, 30000), (128, 128, 128)).save(tmp_path / "a_thin.png")
    write_image(tmp_path / "b_face.png", size=(64, 64))
    code, out, err = _cli(
        [
            "predict",
            str(tmp_path / "a_thin.png"),
            str(tmp_path / "b_face.png"),
            "--run",
            str(runs["folder"]["run"]),
            "--flat",
        ],
        capsys,
    )
    assert code == 0 and "Traceback" not in err and "dsize" not in err  # no face in either: not a failure
    assert "a_thin.png" in out + err and "b_face.png" in out


def test_predict_names_a_file_the_detector_fails_on_and_prints_the_others(runs, tmp_path, capsys, monkeypatch):
    import ensemble.detect
    from ensemble.detect import Face

    def detect(im, detector):
        if im.size == (33, 33):
            raise RuntimeError("OpenCV(4) error: (-215:Assertion failed) !dsize.empty()")
        return [Face((0, 0, im.size[0], im.size[1]), None, 0.99, detector)]

    monkeypatch.setattr(ensemble.detect, "detect", detect)
    for i, size in enumerate([(20, 20), (33, 33), (24, 24)]):
        write_image(tmp_path / f"{i}.png", size=size)
    code, out, err = _cli(
        ["predict", str(tmp_path), "--run", str(runs["folder"]["run"]), "--flat", "--batch-size", "1"], capsys
    )
    assert code == 1
    assert [line.split(" ")[0].rsplit("/", 1)[-1] for line in out.splitlines()] == ["0.png", "2.png"]
    assert "1.png: face detection failed (RuntimeError" in err


def test_predict_names_fifos_and_device_links_and_escapes_newlines(runs, tmp_path, capsys):
    d = tmp_path / "in"
    d.mkdir()
    os.mkfifo(d / "pipe.png")
    (d / "zero.png").symlink_to("/dev/zero")  # stat()ed only, never read
    write_image(d / "two\nlines.png")
    code, out, err = _cli(
        [
            "predict",
            str(d / "pipe.png"),
            str(d / "zero.png"),
            str(d / "two\nlines.png"),
            "--run",
            str(runs["folder"]["run"]),
            "--flat",
            "--no-detect",
        ],
        capsys,
    )
    assert code == 1
    assert "pipe.png: a FIFO, not a regular file" in err and "zero.png: a device, not a regular file" in err
    assert "no such file" not in err
    assert len(out.splitlines()) == 1 and "two\\nlines.png: " in out  # one line per face
    code, out, err = _cli(["predict", str(d), "--run", str(runs["folder"]["run"]), "--flat", "--no-detect"], capsys)
    assert code == 0 and len(out.splitlines()) == 1
    assert "skipped 2 entries" in err and "pipe.png" in err and "zero.png" in err
