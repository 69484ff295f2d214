"""The Python API for whole photos, the detectors and alignment, calibration, bundled models,
the synthetic-run warning and lazy imports. One tiny run is trained once for the module."""

import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_cli, train_tiny_hierarchy
from PIL import Image

from ensemble.data import CLASSES
from ensemble.errors import UserError

REPO = Path(__file__).resolve().parents[1]


_cli = run_cli  # (exit code, stdout, stderr) of ensemble ARGV, in-process


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny synthetic hierarchy (heads on the flat trunk), router and calibration, trained once."""
    root = tmp_path_factory.mktemp("api")
    logs = []
    exp, result = train_tiny_hierarchy(root, log=logs.append)
    calibration = result["calibration"]  # router, then temperatures
    return {"run": root / "run", "exp": exp, "calibration": calibration, "logs": logs, "root": root}


@pytest.fixture(scope="module")
def astronaut():
    from skimage import data  # public-domain NASA portrait, shipped inside scikit-image

    return Image.fromarray(data.astronaut())


@pytest.fixture(scope="module")
def model(run):
    import ensemble

    return ensemble.load(run["run"])


# --------------------------------------------------------------------------- detectors and alignment
def test_detector_choice(astronaut):
    from ensemble.detect import detect

    m = detect(astronaut, "mtcnn")
    assert len(m) == 1 and m[0].landmarks.shape == (5, 2) and m[0].score > 0.9
    x, y, w, h = m[0].box
    assert 150 <= x + w / 2 <= 300 and 60 <= y + h / 2 <= 180 and 60 <= w <= 220  # her face
    le, re_ = m[0].landmarks[:2]
    assert x <= le[0] < re_[0] <= x + w and y <= le[1] <= y + h / 2 + 10  # eyes in the upper half, left then right
    hb = detect(astronaut, "haar")
    assert hb and hb[0].landmarks is None
    hx, _, hw, _ = hb[0].box
    assert abs((hx + hw / 2) - (x + w / 2)) < w / 2  # the same face
    none = detect(astronaut, "none")
    assert [f.box for f in none] == [(0, 0, 512, 512)]
    with pytest.raises(UserError, match="detector must be one of"):
        detect(astronaut, "yolo")
    blank = Image.new("RGB", (400, 300), (120, 120, 120))
    assert detect(blank, "mtcnn") == [] and detect(blank, "haar") == []


def test_an_opencv_without_haar_cascades_is_one_line(monkeypatch):
    """OpenCV 5 has no CascadeClassifier (the pin is <5; a machine may have 5 all the same)."""
    import types

    from ensemble.detect import _load_haar

    monkeypatch.setitem(sys.modules, "cv2", types.SimpleNamespace(__version__="5.0.0"))
    with pytest.raises(UserError, match=r"OpenCV 5.0.0 has no Haar cascades: pip install 'opencv-python-headless<5'"):
        _load_haar()


def test_large_photos_are_downscaled_before_detection_and_boxes_come_back_in_full_size(astronaut):
    from ensemble.detect import detect

    big = astronaut.resize((2048, 2048), Image.BICUBIC)
    small, large = detect(astronaut, "mtcnn")[0], detect(big, "mtcnn", max_side=512)[0]
    np.testing.assert_allclose(np.array(large.box) / 4, small.box, atol=6)
    np.testing.assert_allclose(large.landmarks / 4, small.landmarks, atol=3)


def test_align_crop_by_hand():
    """A white square between two 'eyes' on a line tilted 30 degrees: the crop turns it level."""
    from ensemble.detect import align_crop, eye_angle

    img = np.zeros((200, 200, 3), np.uint8)
    c = np.array([100.0, 100.0])
    d = np.array([np.cos(np.radians(30)), np.sin(np.radians(30))]) * 30
    eyes = np.stack([c - d, c + d])
    for ex, ey in eyes:
        img[int(ey) - 3 : int(ey) + 4, int(ex) - 3 : int(ex) + 4] = 255
    lm = np.vstack([eyes, [[100, 130], [90, 150], [110, 150]]]).astype(np.float32)
    assert eye_angle(lm) == pytest.approx(30, abs=1e-4)
    crop = align_crop(img, (50, 50, 100, 100), lm, margin=0.0, size=100)
    assert crop.shape == (100, 100, 3) and crop.dtype == np.uint8
    rows = np.flatnonzero(crop[..., 0].max(1) > 128)
    cols = np.flatnonzero(crop[..., 0].max(0) > 128)
    assert rows.max() - rows.min() <= 9  # both eyes on one row: level
    assert cols.min() == pytest.approx(20, abs=4) and cols.max() == pytest.approx(80, abs=4)  # 60 px apart, centred
    # no landmarks: a plain square crop of the box, widened by the margin
    plain = align_crop(img, (50, 50, 100, 100), None, margin=0.5, size=50)
    assert plain.shape == (50, 50, 3)
    ref = np.asarray(Image.fromarray(img).resize((50, 50), Image.BILINEAR))  # margin 0.5 of 100 = the whole image
    assert np.abs(plain.astype(int) - ref.astype(int)).mean() < 12


def test_alignment_on_a_rotated_photo(model, astronaut):
    """The astronaut turned 30 degrees: the same face is found, the crop comes out upright and
    the same as from the upright photo, and the model says the same."""
    from ensemble.detect import align_crop, detect, eye_angle

    rot = astronaut.rotate(30, resample=Image.BICUBIC, expand=True, fillcolor=(0, 0, 0))
    up, turned = detect(astronaut, "mtcnn"), detect(rot, "mtcnn")
    assert len(up) == 1 and len(turned) == 1
    # PIL turns counter-clockwise about the centre: map the upright face's centre into the turned photo
    cx, cy = up[0].box[0] + up[0].box[2] / 2 - 256, up[0].box[1] + up[0].box[3] / 2 - 256
    a = np.radians(30)
    ex, ey = cx * np.cos(a) + cy * np.sin(a) + rot.width / 2, -cx * np.sin(a) + cy * np.cos(a) + rot.height / 2
    tx, ty, tw, th = turned[0].box
    assert abs(tx + tw / 2 - ex) < 25 and abs(ty + th / 2 - ey) < 25
    assert eye_angle(turned[0].landmarks) == pytest.approx(eye_angle(up[0].landmarks) - 30, abs=6)
    a0 = align_crop(astronaut, up[0].box, up[0].landmarks, 0.0, 64).astype(float)
    a1 = align_crop(rot, turned[0].box, turned[0].landmarks, 0.0, 64).astype(float)
    straight = align_crop(rot, turned[0].box, None, 0.0, 64).astype(float)  # not turned back
    corr = np.corrcoef(a0.ravel(), a1.ravel())[0, 1]
    assert corr > 0.8 > np.corrcoef(a0.ravel(), straight.ravel())[0, 1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the synthetic-run warning
        r0, r1 = model.predict(astronaut)[0], model.predict(rot)[0]
    assert r0["top_emotion"] == r1["top_emotion"]
    assert max(abs(r0["probabilities"][c] - r1["probabilities"][c]) for c in CLASSES) < 0.15


# --------------------------------------------------------------------------- the API
def test_predict_record_from_path_pil_and_array(model, astronaut, tmp_path):
    path = tmp_path / "a.jpg"
    astronaut.save(path, quality=95)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        recs = [model.predict(src) for src in (path, str(path), astronaut, np.asarray(astronaut))]
    for r in recs:
        assert len(r) == 1
    rec = recs[0][0]
    assert rec["file"] == str(path) and recs[2][0]["file"] is None
    assert set(rec["probabilities"]) == set(CLASSES) and sum(rec["probabilities"].values()) == pytest.approx(
        1, abs=1e-3
    )
    assert rec["emotion"] == rec["top_emotion"] == max(rec["probabilities"], key=rec["probabilities"].get)
    assert rec["confidence"] == max(rec["probabilities"].values()) and not rec["uncertain"]
    assert -1 <= rec["valence"] <= 1 and -1 <= rec["arousal"] <= 1 and 0 <= rec["neighborhood"] < 3
    assert len(rec["box"]) == 4 and np.array(rec["landmarks"]).shape == (5, 2)
    np.testing.assert_allclose(recs[2][0]["confidence"], recs[3][0]["confidence"], atol=1e-6)  # PIL == array
    with pytest.raises(UserError, match="uint8"):
        model.predict(np.zeros((10, 10, 3), np.float32))


def test_device_is_checked_against_the_machine(run, astronaut, tmp_path, capsys):
    """--device / load(device=...): auto picks what is there; a device the machine lacks, or a
    name torch does not know, is one line (exit 2), not torch's traceback."""
    from ensemble.predictors import check_device

    assert check_device("cpu") == "cpu"
    assert check_device("auto") == "cuda" if torch.cuda.is_available() else check_device("auto") in ("mps", "cpu")
    if torch.cuda.is_available():
        assert check_device("cuda:0") == "cuda:0"
    else:
        with pytest.raises(UserError, match="no CUDA device"):
            check_device("cuda")
    with pytest.raises(UserError, match=r"cuda:N or mps, got 'tpu'"):
        check_device("tpu")
    astronaut.save(tmp_path / "a.jpg")
    code, out, err = run_cli(["predict", str(tmp_path / "a.jpg"), "--run", str(run["run"]), "--device", "tpu"], capsys)
    assert code == 2 and "got 'tpu'" in err and "Traceback" not in err
    code, out, err = run_cli(["predict", str(tmp_path / "a.jpg"), "--run", str(run["run"]), "--device", "auto"], capsys)
    assert code == 0 and "a.jpg" in out, err


def test_detection_in_worker_processes_gives_the_same_records(run, astronaut, tmp_path, capsys, monkeypatch):
    """predict_many(processes=2) (CLI --processes 2): spawned detection processes, the same faces,
    crops and answers in the same order as the threads, a bad file still named, not fatal."""
    import ensemble

    astronaut.save(tmp_path / "a.jpg")
    astronaut.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(tmp_path / "b.jpg")
    (tmp_path / "c.jpg").write_text("not an image")
    files = [tmp_path / "a.jpg", tmp_path / "c.jpg", tmp_path / "b.jpg"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the synthetic-run warning
        m = ensemble.load(run["run"], detector="haar")
        threads = list(m.predict_many(files))
        procs = list(m.predict_many(files, processes=2))
    assert [s for s, _, _ in procs] == files and procs[1][2] and not procs[1][1]
    for (_, r1, e1), (_, r2, e2) in zip(threads, procs):
        assert e1 == e2 and [r["box"] for r in r1] == [r["box"] for r in r2]
        np.testing.assert_allclose([r["confidence"] for r in r1], [r["confidence"] for r in r2], atol=1e-6)
    assert [r for _, r, _ in m.predict_many(files, processes="auto")] == [r for _, r, _ in threads]
    for bad in ("-1", "two", "\u00b2"):
        code, out, err = run_cli(
            ["predict", str(tmp_path / "a.jpg"), "--run", str(run["run"]), "--processes", bad], capsys
        )
        assert code == 2 and "--processes" in err and "Traceback" not in err
    code, out, err = run_cli(
        ["predict", str(tmp_path / "a.jpg"), "--run", str(run["run"]), "--processes", "auto"], capsys
    )
    assert code == 0 and "a.jpg" in out, err
    import ensemble.api as api

    monkeypatch.setattr(api, "usable_cores", lambda *a: 1)  # more processes than cores: said, not refused
    with pytest.warns(UserWarning, match="2 detection processes on 1 usable cores"):
        assert list(m.predict_many([], processes=2)) == []


def test_a_dead_detection_worker_is_one_line_and_keeps_what_was_done(run, astronaut, tmp_path, monkeypatch):
    """A worker process killed mid-folder (out of memory): the images finished before it are still
    yielded, then one UserError naming the way out, not a BrokenProcessPool traceback."""
    from concurrent.futures.process import BrokenProcessPool

    import ensemble
    import ensemble.api as api

    class DiesAfterOne:
        def __init__(self, *a, **k):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def map(self, fn, items, chunksize=1):
            yield fn(items[0])
            raise BrokenProcessPool("a child process terminated abruptly")

    astronaut.save(tmp_path / "a.jpg")
    astronaut.save(tmp_path / "b.jpg")
    monkeypatch.setattr(api, "ProcessPoolExecutor", DiesAfterOne)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the synthetic-run warning
        m = ensemble.load(run["run"], detector="haar")
        got = []
        with pytest.raises(UserError, match=r"worker process died after 1 of 2 image\(s\).*--processes 0"):
            for item in m.predict_many([tmp_path / "a.jpg", tmp_path / "b.jpg"], processes=2):
                got.append(item)
    assert [s for s, _, _ in got] == [tmp_path / "a.jpg"] and got[0][1]


def test_auto_processes_follow_the_measured_rule():
    """processes="auto" (the CLI's default): threads on small machines and small inputs, where
    processes were measured slower; one process per core but one, at most 8, otherwise."""
    from ensemble.api import auto_processes, check_processes

    assert auto_processes(10_000, cores=2) == 0  # 2 cores: threads read 47 photos/s, processes 35
    assert auto_processes(10_000, cores=16) == 8  # 16 cores: 8 processes 112, 4 threads 64
    assert auto_processes(10_000, cores=8) == 7
    assert auto_processes(100, cores=16) == 0  # starting processes costs more than it saves
    assert [check_processes(v) for v in ("auto", "AUTO", 0, 3, "3")] == ["auto", "auto", 0, 3, 3]

    for bad in (-1, "x", True, 1.5, "\u00b2"):
        with pytest.raises(UserError, match="processes must be"):
            check_processes(bad)


def test_usable_cores_respect_a_container_quota(tmp_path):
    """docker --cpus=2 on a larger host: cgroup v2's cpu.max caps the cores auto counts."""
    import os

    from ensemble.api import usable_cores

    (tmp_path / "two").write_text("200000 100000\n")
    (tmp_path / "half").write_text("50000 100000\n")
    (tmp_path / "none").write_text("max 100000\n")
    assert usable_cores(tmp_path / "two") == min(2, len(os.sched_getaffinity(0)))
    assert usable_cores(tmp_path / "half") == 1
    assert usable_cores(tmp_path / "none") == usable_cores(tmp_path / "missing") == len(os.sched_getaffinity(0))


def test_bf16_inference_is_close_to_fp32_and_fp16_needs_cuda(run, astronaut, tmp_path, capsys):
    """--precision bf16 runs the networks under autocast: probabilities move a little (so it did
    run in bf16), V/A too; fp16 is refused on a CPU, a bad name in one line."""
    import ensemble

    faces = [astronaut, astronaut.rotate(20), astronaut.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the synthetic-run warning
        m32 = ensemble.load(run["run"], detector="none")
        m16 = ensemble.load(run["run"], detector="none", precision="bf16")
        crops = np.concatenate([m32.faces_in(f)[1] for f in faces])
        a, b = m32._infer(crops), m16._infer(crops)
    pa, pb = np.array([r["proba"] for r in a]), np.array([r["proba"] for r in b])
    assert np.abs(pa - pb).max() < 0.05 and not np.array_equal(pa, pb)
    assert max(abs(x["valence"] - y["valence"]) for x, y in zip(a, b)) < 0.05
    assert "precision='bf16'" in repr(m16)
    with pytest.raises(UserError, match="CUDA"):
        ensemble.load(run["run"], precision="fp16")
    with pytest.raises(UserError, match="precision must be one of auto, fp32, bf16, fp16, int8"):
        ensemble.load(run["run"], precision="int4")
    with pytest.raises(UserError, match="precision int8: .* has no onnx/ stage"):  # int8 runs on ONNX Runtime
        ensemble.load(run["run"], precision="int8")
    astronaut.save(tmp_path / "a.jpg")
    code, out, err = run_cli(
        ["predict", str(tmp_path / "a.jpg"), "--run", str(run["run"]), "--precision", "bf16"], capsys
    )
    assert code == 0 and "a.jpg" in out, err
    code, out, err = run_cli(
        ["predict", str(tmp_path / "a.jpg"), "--run", str(run["run"]), "--precision", "fp16"], capsys
    )
    assert code == 2 and "needs a CUDA device" in err and "Traceback" not in err


def test_min_confidence_marks_faces_uncertain(model, astronaut, run, capsys):
    import ensemble

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rec = model.predict(astronaut, min_confidence=1.0)[0]
        assert rec["uncertain"] and rec["emotion"] == "uncertain" and rec["top_emotion"] in CLASSES
        assert not model.predict(astronaut, min_confidence=0.0)[0]["uncertain"]
        strict = ensemble.load(run["run"], min_confidence=0.999)
        assert strict.predict(astronaut)[0]["uncertain"]
    with pytest.raises(UserError, match="min_confidence"):
        ensemble.load(run["run"], min_confidence=1.5)


def test_predict_folder_is_a_dataframe_one_row_per_face(model, astronaut, tmp_path):
    d = tmp_path / "photos"
    (d / "sub").mkdir(parents=True)
    astronaut.save(d / "one.jpg")
    side = Image.new("RGB", (1100, 512), (90, 90, 90))
    side.paste(astronaut, (0, 0))
    side.paste(astronaut.transpose(Image.Transpose.FLIP_LEFT_RIGHT), (560, 0))
    side.save(d / "sub" / "two.png")
    Image.new("RGB", (300, 200), (200, 200, 200)).save(d / "blank.png")
    (d / "broken.jpg").write_bytes(b"not a jpeg")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        df = model.predict_folder(d)
    faces = df[df["face"].notna()]
    assert sorted(Path(f).name for f in faces["file"]) == ["one.jpg", "two.png", "two.png"]
    assert {f"p_{c}" for c in CLASSES} <= set(df.columns)
    assert {"x", "y", "w", "h", "emotion", "confidence", "valence", "arousal", "neighborhood", "left_eye_x"} <= set(
        df.columns
    )
    np.testing.assert_allclose(faces[[f"p_{c}" for c in CLASSES]].sum(axis=1), 1, atol=1e-3)
    rest = df[df["face"].isna()].set_index(df[df["face"].isna()]["file"].map(lambda f: Path(f).name))
    assert rest.loc["blank.png", "note"] == "no face found"
    assert "decode" in rest.loc["broken.jpg", "error"]
    # batches of one face, one worker: the same rows in the same (file) order
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        one = model.predict_folder(d, batch_size=1)
    assert list(one["file"]) == list(df["file"]) == sorted(df["file"])
    np.testing.assert_allclose(one["confidence"].fillna(-1), df["confidence"].fillna(-1), atol=1e-5)


def test_cli_annotate_and_csv(run, astronaut, tmp_path, capsys):
    import pandas as pd

    d = tmp_path / "in"
    d.mkdir()
    astronaut.save(d / "astro.jpg")
    Image.new("RGB", (300, 200), (200, 200, 200)).save(d / "blank.png")
    out, csv = tmp_path / "annotated", tmp_path / "t" / "faces.csv"
    code, so, se = _cli(
        ["predict", str(d), "--run", str(run["run"]), "--annotate", str(out), "--csv", str(csv)], capsys
    )
    assert code == 0 and "Traceback" not in so + se
    assert "astro.jpg [" in so and "blank.png: no face found" in so
    assert sorted(p.name for p in out.iterdir()) == ["astro.jpg", "blank.jpg"]
    drawn = np.asarray(Image.open(out / "astro.jpg").convert("RGB")).astype(int)
    assert drawn.shape == (512, 512, 3)
    table = pd.read_csv(csv)
    assert len(table) == 2 and table["face"].notna().sum() == 1
    face = table[table["face"].notna()].iloc[0]
    x, y, w, h = (int(face[k]) for k in "xywh")
    orig = np.asarray(astronaut).astype(int)
    edge = np.abs(drawn[y, x : x + w] - orig[y, x : x + w]).mean()  # the box's top edge is drawn
    inside = np.abs(drawn[y + h // 2, x + 5 : x + w - 5] - orig[y + h // 2, x + 5 : x + w - 5]).mean()
    assert edge > 40 > inside
    assert face["emotion"] in CLASSES and abs(sum(face[f"p_{c}"] for c in CLASSES) - 1) < 1e-3


def test_cli_detector_options(run, astronaut, tmp_path, capsys):
    p = tmp_path / "a.png"
    astronaut.save(p)
    code, so, se = _cli(["predict", str(p), "--run", str(run["run"]), "--detector", "haar", "--json"], capsys)
    assert code == 0 and json.loads(so.splitlines()[0])["detector"] == "haar"
    code, so, se = _cli(["predict", str(p), "--run", str(run["run"]), "--detector", "none", "--json"], capsys)
    assert code == 0 and json.loads(so)["box"] is None and se == ""  # a face crop: no synthetic-run warning
    code, so, se = _cli(["predict", str(p), "--run", str(run["run"]), "--detector", "yunet"], capsys)
    assert code == 2 and "Traceback" not in se
    code, so, se = _cli(["predict", str(p), "--run", str(run["run"]), "--min-confidence", "1.5"], capsys)
    assert code == 2 and "Traceback" not in se
    code, so, se = _cli(["predict", str(p), "--run", str(run["run"]), "--min-confidence", "1"], capsys)
    assert code == 0 and "uncertain (best guess" in so


def test_a_synthetic_run_warns_once_on_photos(run, astronaut):
    import ensemble

    m = ensemble.load(run["run"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        m.predict(astronaut, detector="none")  # a face crop: no warning
        assert not caught
        m.predict(astronaut)
        m.predict(astronaut)
        list(m.predict_many([astronaut]))
    msgs = [str(w.message) for w in caught]
    assert len(msgs) == 1, msgs
    assert str(run["run"]) in msgs[0] and "synthetic" in msgs[0] and "bundled" in msgs[0]


def test_cli_says_which_run_it_uses_without_a_bundle(run, astronaut, tmp_path, monkeypatch, capsys):
    import shutil

    from ensemble import bundle

    monkeypatch.setattr(bundle, "PACKAGED", tmp_path / "no-models")
    monkeypatch.chdir(tmp_path)
    p = tmp_path / "a.png"
    astronaut.save(p)
    code, _, se = _cli(["predict", str(p)], capsys)
    assert code == 2 and "no bundled model" in se and "--run" in se
    shutil.copytree(run["run"], tmp_path / "artifacts" / "demo")
    code, _, se = _cli(["predict", str(p), "--detector", "none"], capsys)
    assert code == 0
    assert [line for line in se.splitlines() if "artifacts/demo" in line and "synthetic" in line]


# --------------------------------------------------------------------------- calibration
def test_temperature_scaling_lowers_ece_on_a_held_out_split():
    """An over-confident model (logits 3x the true ones): T fitted on one split, ECE falls on another."""
    from ensemble.calibration import apply_temperature, ece, fit_temperature

    rng = np.random.default_rng(0)

    def sample(n):
        z = rng.normal(0, 1.2, size=(n, 8))
        p_true = np.exp(z) / np.exp(z).sum(1, keepdims=True)
        y = np.array([rng.choice(8, p=p) for p in p_true])
        over = np.exp(3 * z) / np.exp(3 * z).sum(1, keepdims=True)
        return over, y

    p_sel, y_sel = sample(3000)
    p_test, y_test = sample(3000)
    t = fit_temperature(p_sel, y_sel)
    assert t == pytest.approx(3.0, rel=0.15)
    before, after = ece(p_test, y_test), ece(apply_temperature(p_test, t), y_test)
    assert after < before / 3 and after < 0.03
    np.testing.assert_array_equal(apply_temperature(p_test, t).argmax(1), p_test.argmax(1))
    # hand-checked: two bins; confidence 0.9 right once and wrong once -> |0.5 - 0.9| = 0.4
    assert ece(np.array([[0.9, 0.1], [0.9, 0.1]]), np.array([0, 1])) == pytest.approx(0.4)
    z = np.array([[0.7, 0.2, 0.1, 0.0]])
    got = apply_temperature(z, 2.0)
    want = np.sqrt(z) / np.sqrt(z).sum()
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert got[0, 3] == 0


def test_a_temperature_that_would_raise_the_ece_is_refused():
    """Hard routing's answers: right 80% of the time at 0.8, and on a routing error the true class
    gets almost nothing. The NLL wants T of several (it flattens everything to pay for those
    errors), which makes a model that is as sure as it is right say it is far less sure."""
    from ensemble.calibration import apply_temperature, choose_temperature, ece, fit_temperature

    n, c = 1000, 8
    y = np.arange(n) % c
    pred = np.where(np.arange(n) % 5 == 0, (y + 1) % c, y)  # one in five wrong
    p = np.full((n, c), 0.2 / (c - 1))
    p[np.arange(n), pred] = 0.8
    wrong = pred != y
    p[np.flatnonzero(wrong), y[wrong]] = 1e-9
    p /= p.sum(1, keepdims=True)
    t_nll = fit_temperature(p, y)
    assert t_nll > 2 and ece(apply_temperature(p, t_nll), y) > ece(p, y) + 0.1
    assert choose_temperature(p, y) == (1.0, t_nll)
    # a calibrated model (labels drawn from its own softmax) made overconfident (logits × 3):
    # the NLL's T undoes it, lowers the ECE, and is kept
    rng = np.random.default_rng(0)
    z = rng.normal(0, 1.5, (n, c))
    calibrated = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    y = np.array([rng.choice(c, p=q) for q in calibrated])
    sharp = np.exp(3 * z) / np.exp(3 * z).sum(1, keepdims=True)
    t, refused = choose_temperature(sharp, y)
    assert refused is None and 2 < t < 4.5 and ece(apply_temperature(sharp, t), y) < ece(sharp, y) - 0.1


def test_the_run_stores_its_calibration_hashed(run, model, tmp_path):
    import shutil

    import ensemble
    from ensemble.artifacts import read_meta

    cal = run["calibration"]
    assert set(cal["models"]) == {"flat", "hierarchy"}
    for c in cal["models"].values():
        assert c["temperature"] > 0 and {"ece_before", "ece_after"} <= set(c["val"])
        assert c["val"]["nll_after"] <= c["val"]["nll_before"] + 1e-6  # fitted there: never worse
        assert c["val"]["ece_after"] <= c["val"]["ece_before"]  # kept only where it helps
    meta = read_meta(run["run"] / "calibration")
    assert "calibration.json" in meta["files"]
    assert model.temperature == pytest.approx(cal["models"]["hierarchy"]["temperature"], rel=1e-3)
    bad = tmp_path / "run"
    shutil.copytree(run["run"], bad)
    info = json.loads((bad / "calibration" / "calibration.json").read_text())
    info["models"]["hierarchy"]["temperature"] = 0.01
    (bad / "calibration" / "calibration.json").write_text(json.dumps(info))
    with pytest.raises(UserError, match="sha256"):
        ensemble.load(bad)


# --------------------------------------------------------------------------- bundled models
def test_bundle_converts_to_float16_and_refuses_a_tampered_file(run, astronaut, tmp_path, monkeypatch, capsys):
    import ensemble
    from ensemble import bundle
    from ensemble.artifacts import read_meta

    packaged = tmp_path / "models"
    code, so, se = _cli(
        [
            "bundle",
            "--run",
            str(run["run"]),
            "--out",
            str(packaged / "ferplus"),
            "--command",
            "ensemble fit-flat --config configs/x.toml",
        ],
        capsys,
    )
    assert code == 0 and "float16" in so
    b = packaged / "ferplus"
    for w in b.rglob("weights.pt"):
        state = torch.load(w, weights_only=True)
        assert all(v.dtype == torch.float16 for v in state.values() if v.is_floating_point())
        read_meta(w.parent)  # the rewritten hashes hold
    size = sum(f.stat().st_size for f in b.rglob("*.pt"))
    assert size < 0.6 * sum(
        f.stat().st_size
        for f in run["run"].rglob("*.pt")
        if "checkpoint" not in f.name and not f.parent.name.startswith(".")
    )
    card = bundle.read_card(b)
    assert card["command"].startswith("ensemble fit-flat") and card["classes"] == list(CLASSES)
    assert card["input_size"] == 32 and "not for decisions" in card["not_for"] and card["licence"]
    assert "calibration" in card["figures"]
    # loads back to float32 and answers as the original
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        orig, half = ensemble.load(run["run"]), ensemble.load(b)
        assert orig.backend == "torch" and half.backend == "onnx"  # the bundle carries its onnx stage
        on_torch = ensemble.load(b, backend="torch")
        assert all(p.dtype == torch.float32 for p in on_torch.net.net.parameters())
        p0, p1 = orig.predict(astronaut)[0]["probabilities"], half.predict(astronaut)[0]["probabilities"]
    assert max(abs(p0[c] - p1[c]) for c in CLASSES) < 0.02
    # the default of load / predict / models when it is installed
    monkeypatch.setattr(bundle, "PACKAGED", packaged)
    assert bundle.default_run() == b and ensemble.load().run == b
    (tmp_path / "none").mkdir()
    code, so, se = _cli(["models", "--artifacts", str(tmp_path / "none")], capsys)
    assert code == 0 and f"{b}  [bundled, default]" in so and "not for" in so
    # a tampered weight file is refused in one line
    w = b / "stage1" / "weights.pt"
    data = bytearray(w.read_bytes())
    data[-20] ^= 0xFF
    w.write_bytes(bytes(data))
    p = tmp_path / "a.png"
    astronaut.save(p)
    code, so, se = _cli(["predict", str(p)], capsys)
    assert code == 2 and "sha256" in se and "Traceback" not in se


def test_models_lists_runs_under_artifacts(run, tmp_path, monkeypatch, capsys):
    import shutil

    from ensemble import bundle

    monkeypatch.setattr(bundle, "PACKAGED", tmp_path / "no-models")
    shutil.copytree(run["run"], tmp_path / "artifacts" / "tiny")
    code, so, _ = _cli(["models", "--artifacts", str(tmp_path / "artifacts")], capsys)
    assert code == 0 and "tiny  [artifacts]" in so and "synthetic" in so and "ECE" in so
    (tmp_path / "empty").mkdir()
    code, so, _ = _cli(["models", "--artifacts", str(tmp_path / "empty")], capsys)
    assert code == 0 and so.startswith("no models")
    code, so, se = _cli(["models", "--artifacts", str(tmp_path / "nothing")], capsys)
    assert code == 2 and "no such folder" in se
    # a run whose flat model's meta.json is damaged, or that lacks one, is listed as damaged
    shutil.copytree(run["run"], tmp_path / "artifacts" / "broken")
    (tmp_path / "artifacts" / "broken" / "flat" / "meta.json").write_text("xx")
    shutil.copytree(run["run"], tmp_path / "artifacts" / "noflat")
    shutil.rmtree(tmp_path / "artifacts" / "noflat" / "flat")
    shutil.rmtree(tmp_path / "artifacts" / "noflat" / "stage1")
    code, so, _ = _cli(["models", "--artifacts", str(tmp_path / "artifacts")], capsys)
    assert code == 0 and "tiny  [artifacts]  " in so
    assert "broken  [artifacts]  damaged:" in so and "not valid JSON" in so
    assert "noflat  [artifacts]  damaged: no trained flat model or stage 1" in so


def test_loading_builds_on_the_meta_device_and_shares_one_trunk(run):
    from ensemble.predictors import HierarchicalPredictor

    hp = HierarchicalPredictor.load(run["run"])
    tensors = [*hp.net.parameters(), *hp.net.buffers()]
    assert tensors and not any(t.is_meta for t in tensors)
    assert len(hp.net.trunks) == 1


# --------------------------------------------------------------------------- lazy imports
def test_predicting_a_photo_imports_neither_pandas_nor_scikit_learn(run, tmp_path, astronaut):
    """A first answer (API, then CLI) loads torch, the networks and the detector: nothing for
    data sets or fitting."""
    astronaut.save(tmp_path / "a.jpg")
    code = (
        "import sys\n"
        "import ensemble\n"
        f"model = ensemble.load({str(run['run'])!r}, detector='haar')\n"
        f"model.predict({str(tmp_path / 'a.jpg')!r})\n"
        "from ensemble.cli import main\n"
        "try:\n"
        f"    main(['predict', {str(tmp_path / 'a.jpg')!r}, '--run', {str(run['run'])!r}, '--detector', 'haar'])\n"
        "except SystemExit as e:\n"
        "    assert not e.code, e.code\n"
        "print(sorted(m for m in ('pandas', 'sklearn', 'scipy', 'joblib', 'matplotlib') if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120, check=False
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout


def test_the_bundled_model_answers_without_torchvision(tmp_path, astronaut):
    """On torch too, the first answer (the bundled VGG16-BN hierarchy) builds its networks itself:
    importing torchvision (and with it torch._dynamo) is over a second of a cold predict.
    (A MobileNetV2 run loads without torchvision too: test_backbones; the default backend, ONNX
    Runtime, imports no torch at all: test_onnx_runtime.)"""
    astronaut.save(tmp_path / "a.jpg")
    code = (
        "import sys\n"
        "import ensemble\n"
        f"assert ensemble.load(backend='torch').predict({str(tmp_path / 'a.jpg')!r})[0]['emotion'] == 'happy'\n"
        "print(sorted(m for m in ('torchvision', 'torch._dynamo', 'facenet_pytorch') if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120, check=False
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout


def test_help_imports_neither_torch_nor_pandas():
    code = (
        "import sys\n"
        "from ensemble.cli import main\n"
        "for args in (['--help'], ['predict', '--help'], ['models', '--help']):\n"
        "    try:\n"
        "        main(args)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "print(sorted(m for m in ('torch', 'pandas', 'numpy', 'sklearn', 'cv2') if m in sys.modules))\n"
        "import ensemble\n"
        "print(sorted(m for m in ('torch', 'pandas') if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60, check=False
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[-2:] == ["[]", "[]"], out.stdout


def test_predict_and_annotate_refuse_what_is_not_one_image(model, astronaut, tmp_path):
    import io

    from PIL import Image

    for bad in (123, None, ["a.jpg"], np.zeros((2, 16, 16, 3), np.uint8), np.zeros(5, np.uint8)):
        for call in (model.predict, model.annotate):
            with pytest.raises(UserError) as info:
                call(bad)
            assert "\n" not in str(info.value)
    with pytest.raises(UserError, match="nope.jpg: file not found"):
        model.annotate(str(tmp_path / "nope.jpg"))
    buf = io.BytesIO()
    astronaut.save(buf, format="JPEG")
    from_bytes = model.predict(buf.getvalue(), detector="none")  # an encoded image's bytes
    from_array = model.predict(np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB")), detector="none")
    assert len(from_bytes) == 1 and from_bytes[0]["emotion"] == from_array[0]["emotion"]


def test_an_animated_image_says_only_its_first_frame_is_used(model, astronaut, tmp_path):
    gif = tmp_path / "anim.gif"
    frame = astronaut.resize((128, 128))
    frame.save(gif, save_all=True, append_images=[frame.transpose(0)], duration=100, loop=0)
    with pytest.warns(UserWarning, match="2 frames; only the first is used"):
        faces = model.predict(str(gif), detector="none")
    assert len(faces) == 1


def test_fit_flat_refuses_to_orphan_the_stages_built_on_its_trunk(run, tmp_path, capsys):
    import hashlib
    import shutil

    from conftest import TINY_HIERARCHY

    copy = tmp_path / "run"
    shutil.copytree(run["run"], copy)
    weights = copy / "flat" / "weights.pt"
    kept = hashlib.sha256(weights.read_bytes()).hexdigest()
    sets = [a for kv in TINY_HIERARCHY for a in ("--set", kv)]
    code, out, err = _cli(["fit-flat", *sets, "--set", "train.seed=7", "--out", str(copy)], capsys)
    assert code == 2 and "is the trunk of stage1, experts/" in err and "new --out" in err, err
    assert hashlib.sha256(weights.read_bytes()).hexdigest() == kept


def test_a_run_that_is_not_whole_says_what_to_run(run, tmp_path):
    import json
    import shutil

    from ensemble.predictors import HierarchicalPredictor

    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="is not a trained run: it has no flat/ or stage1/"):
        HierarchicalPredictor.load(tmp_path / "empty")
    partial = tmp_path / "partial"
    shutil.copytree(run["run"], partial)
    shutil.rmtree(partial / "neighborhoods")
    with pytest.raises(UserError, match="no neighborhoods and experts yet \\(run ensemble fit-experts\\)"):
        HierarchicalPredictor.load(partial)
    # stage 1 retrained after the router was calibrated: its V/A are not the ones routed on
    stale = tmp_path / "stale"
    shutil.copytree(run["run"], stale)
    meta = json.loads((stale / "stage1" / "meta.json").read_text())
    meta["fingerprint"] = {**meta["fingerprint"], "train.lr": 0.05}
    (stale / "stage1" / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="calibrated with another stage 1"):
        HierarchicalPredictor.load(stale)
    HierarchicalPredictor.load(run["run"])  # the run as trained loads
