"""End to end on tiny synthetic faces: train every stage once, then check artifacts, predictors,
tamper detection, the comparison report and ``ensemble predict``."""

import csv
import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_SYNTHETIC, run_cli
from PIL import Image

from ensemble.classes import CLASSES
from ensemble.config import load_config
from ensemble.errors import UserError
from ensemble.predictors import FlatPredictor, HierarchicalPredictor

REPO = Path(__file__).resolve().parents[1]
FER_VALID = REPO.parent / "shared" / "data" / "ferplus" / "FER2013Valid"
SIZE = 32

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, one_thread):
    """flat, stage 1, neighborhoods + experts, router and the comparison, trained once."""
    from ensemble.experiment import open_experiment
    from ensemble.reports import compare
    from ensemble.routing import calibrate_router
    from stages.experts import fit_experts
    from stages.flat import fit_flat
    from stages.stage1 import fit_stage1

    root = tmp_path_factory.mktemp("pipeline")
    cfg = load_config(
        None,
        [
            *TINY_SYNTHETIC,
            f"data.image_size={SIZE}",
            f"data.cache_dir={root / 'cache'}",
            "experts.min_count=5",
        ],
    )
    assert Path(cfg.data.cache_dir) == root / "cache"
    run = root / "run"
    logs = []
    exp = open_experiment(cfg, run, log=logs.append, progress=False)
    out = {
        "flat": fit_flat(exp, log=logs.append),
        "stage1": fit_stage1(exp, log=logs.append),
        "experts": fit_experts(exp, log=logs.append),
        "router": calibrate_router(exp, logs.append),
        "compare": compare(exp, "test", log=logs.append),
    }
    return {"exp": exp, "run": run, "root": root, "logs": logs, **out}


def _sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _test_faces(trained, n=4):
    exp = trained["exp"]
    rows = exp.manifest[exp.manifest["split"] == "test"].iloc[:n]
    return [Path(p) for p in rows["path"]], rows["label"].to_numpy()


# --------------------------------------------------------------------------- artifacts


@pytest.mark.parametrize("stage", ["flat", "stage1"])
def test_stage_artifacts(trained, stage):
    folder = trained["run"] / stage
    for name in ("weights.pt", "meta.json", "history.csv", "metrics.json", "config.json"):
        assert (folder / name).is_file(), name
    state = torch.load(folder / "weights.pt", map_location="cpu", weights_only=True)
    assert state and all(isinstance(v, torch.Tensor) for v in state.values())
    assert any(k.startswith("trunk.") for k in state) and any(k.startswith("head.") for k in state)
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["input_size"] == SIZE
    assert len(meta["mean"]) == 3 and len(meta["std"]) == 3
    assert meta["backbone"] == "tinyvgg" and meta["n_blocks"] == 4
    assert meta["classes"] == (list(CLASSES) if stage == "flat" else ["valence", "arousal"])
    assert set(meta["files"]) >= {"weights.pt", "history.csv", "metrics.json", "config.json"}
    assert "meta.json" not in meta["files"]
    for name, digest in meta["files"].items():
        assert _sha256(folder / name) == digest, name
    with open(folder / "history.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["epoch"] for r in rows] == ["1"]


def test_flat_metrics(trained):
    m = json.loads((trained["run"] / "flat" / "metrics.json").read_text())
    assert m == json.loads(json.dumps(trained["flat"]))
    n_test = len(trained["exp"].idx("test"))
    for split in ("val", "test"):
        s = m[split]
        assert 0 <= s["accuracy"] <= 1 and 0 <= s["balanced_accuracy"] <= 1
        assert set(s["per_class_recall"]) == set(CLASSES)
        conf = np.array(s["confusion"])
        assert conf.shape == (8, 8)
        assert s["accuracy"] == pytest.approx(np.trace(conf) / conf.sum())
    assert np.array(m["test"]["confusion"]).sum() == n_test


def test_stage1_metrics(trained):
    m = json.loads((trained["run"] / "stage1" / "metrics.json").read_text())
    for split in ("val", "test"):
        for kind in ("rmse", "ccc", "pcc", "sagr"):
            for dim in ("valence", "arousal"):
                assert f"{kind}_{dim}" in m[split]
        assert m[split]["rmse_valence"] >= 0
        assert 0 <= m[split]["sagr_arousal"] <= 1


def test_neighborhoods_experts_router_artifacts(trained):
    run = trained["run"]
    index = json.loads((run / "experts" / "index.json").read_text())
    assert index == json.loads(json.dumps(trained["experts"]))
    nb_meta = json.loads((run / "neighborhoods" / "meta.json").read_text())
    assert index["k"] == nb_meta["k"] == len(index["experts"])
    covered = set()
    for r, info in enumerate(index["experts"]):
        folder = run / "experts" / str(r)
        meta = json.loads((folder / "meta.json").read_text())
        assert meta["classes"] == info["classes"]
        assert (folder / "weights.pt").is_file() != bool(info.get("constant"))
        covered |= set(info["classes"])
    train_labels = trained["exp"].manifest.query("split == 'train'")["label"]
    assert covered == {CLASSES[i] for i in set(train_labels)}  # every class has an expert
    router = json.loads((run / "router" / "meta.json").read_text())
    assert router["mode"] in ("hard", "soft") and router["temperature"] > 0
    assert router["mode"] == trained["router"]["mode"]


def test_no_temporary_folders_left(trained):
    leftovers = [
        p
        for p in trained["run"].rglob("*")
        if ".tmp" in p.name or ".work" in p.name or ".old" in p.name or p.name.startswith(".write-test")
    ]
    assert leftovers == []


# --------------------------------------------------------------------------- predictors


def test_flat_predictor_on_paths_and_pil_images(trained):
    fp = FlatPredictor.load(trained["run"])
    paths, _ = _test_faces(trained)
    p_paths = fp.predict_proba([str(p) for p in paths])
    p_pil = fp.predict_proba([Image.open(p) for p in paths])
    assert p_paths.shape == (len(paths), 8)
    np.testing.assert_allclose(p_paths.sum(1), 1.0, atol=1e-5)
    np.testing.assert_allclose(p_paths, p_pil, atol=1e-6)
    assert fp.classes == list(CLASSES)
    assert fp.predict_proba([]).shape == (0, 8)


def test_preprocess_is_float32_nchw(trained):
    hp = HierarchicalPredictor.load(trained["run"])
    paths, _ = _test_faces(trained, 3)
    x = hp.preprocess(paths)
    assert x.dtype == np.float32 and x.shape == (3, 3, SIZE, SIZE)
    # normalised with the run's own mean/std
    raw = np.asarray(Image.open(paths[0]).convert("RGB").resize((SIZE, SIZE), Image.BILINEAR), np.float32) / 255
    want = (raw.transpose(2, 0, 1) - np.array(hp.mean, np.float32)[:, None, None]) / np.array(hp.std, np.float32)[
        :, None, None
    ]
    np.testing.assert_allclose(x[0], want, atol=1e-5)
    # a larger image is resized to the network's input
    big = Image.open(paths[0]).convert("RGB").resize((100, 80))
    assert hp.preprocess([big]).shape == (1, 3, SIZE, SIZE)


@pytest.mark.parametrize("router", [None, "hard", "soft"])
def test_hierarchical_predictor(trained, router):
    hp = HierarchicalPredictor.load(trained["run"], router=router)
    assert hp.mode == (router or trained["router"]["mode"])
    paths, _ = _test_faces(trained)
    proba = hp.predict_proba([str(p) for p in paths])
    assert proba.shape == (len(paths), 8)
    np.testing.assert_allclose(proba.sum(1), 1.0, atol=1e-5)
    np.testing.assert_allclose(hp.predict_proba([Image.open(p) for p in paths]), proba, atol=1e-6)
    out = hp.predict(paths)
    k = hp.nbh.k_
    assert out["valence"].shape == out["arousal"].shape == (len(paths),)
    assert np.all(np.abs(out["valence"]) <= 1) and np.all(np.abs(out["arousal"]) <= 1)
    assert out["neighborhood"].shape == (len(paths),) and set(out["neighborhood"].tolist()) <= set(range(k))
    assert out["region_weights"].shape == (len(paths), k)
    assert out["label"] == [CLASSES[i] for i in out["proba"].argmax(1)]
    if hp.mode == "hard":  # the hierarchy alone: only the chosen expert's classes have probability
        va, ep = hp.parts_from_input(hp.preprocess(paths))
        alone, w = hp.route(va, ep, final=False)
        for p, r in zip(alone, w.argmax(1)):
            allowed = [CLASSES.index(c) for c in hp.expert_classes[r]]
            assert p[np.setdiff1d(np.arange(8), allowed)].sum() == 0
        if not hp.net.alpha and not hp.net.tau:
            np.testing.assert_allclose(alone, out["proba"], atol=1e-6)


def test_hierarchical_predictor_bad_inputs(trained, tmp_path):
    hp = HierarchicalPredictor.load(trained["run"])
    bad = tmp_path / "bad.png"
    bad.write_text("not a png")
    with pytest.raises(UserError, match="bad.png"):
        hp.predict_proba([bad])
    with pytest.raises(UserError, match="router must be hard or soft"):
        HierarchicalPredictor.load(trained["run"], router="oracle")
    with pytest.raises(UserError, match="run folder not found"):
        HierarchicalPredictor.load(tmp_path / "nope")


# --------------------------------------------------------------------------- tampering


@pytest.fixture
def run_copy(trained, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(trained["run"], dst)
    return dst


def test_truncated_stage1_weights_are_refused(run_copy):
    w = run_copy / "stage1" / "weights.pt"
    data = w.read_bytes()
    w.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="sha256"):
        HierarchicalPredictor.load(run_copy)


def test_appended_byte_in_neighborhoods_is_refused(run_copy, monkeypatch):
    import joblib

    f = run_copy / "neighborhoods" / "model.joblib"
    with open(f, "ab") as fh:
        fh.write(b"\0")
    loaded = []
    monkeypatch.setattr(joblib, "load", lambda *a, **k: loaded.append(a) or None)
    with pytest.raises(UserError, match="sha256"):
        HierarchicalPredictor.load(run_copy)
    assert loaded == []  # refused before anything is unpickled


def test_swapped_flat_weights_are_refused(run_copy):
    shutil.copyfile(run_copy / "stage1" / "weights.pt", run_copy / "flat" / "weights.pt")
    with pytest.raises(UserError, match="sha256"):
        FlatPredictor.load(run_copy)


def test_missing_expert_file_is_refused(run_copy):
    index = json.loads((run_copy / "experts" / "index.json").read_text())
    trainedexp = next((i for i, e in enumerate(index["experts"]) if not e.get("constant")), None)
    if trainedexp is None:
        pytest.skip("every neighborhood has a single class in this run")
    (run_copy / "experts" / str(trainedexp) / "weights.pt").unlink()
    with pytest.raises(UserError, match="missing"):
        HierarchicalPredictor.load(run_copy)


# --------------------------------------------------------------------------- compare


def test_compare_report(trained):
    rep = trained["run"] / "reports"
    assert (rep / "report.md").is_file()
    text = (rep / "report.md").read_text()
    models = ["flat", "hard", "soft", "oracle", "mixed", "flat+la", "mixed+la"]
    for model in models:
        assert f"| {model} |" in text
        assert (rep / f"confusion_{model.replace('+', '_')}.png").is_file()
        with Image.open(rep / f"confusion_{model.replace('+', '_')}.png") as im:
            assert im.size[0] > 100
    with open(rep / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["model"] for r in rows] == models
    assert rows[3]["routing_accuracy"] and float(rows[3]["routing_accuracy"]) == pytest.approx(1.0)  # oracle
    assert rows[0]["routing_accuracy"] == ""
    result = trained["compare"]
    assert result["n"] == len(trained["exp"].idx("test"))
    for r in rows:
        assert float(r["balanced_accuracy"]) == pytest.approx(result["models"][r["model"]]["balanced_accuracy"])
    # the flat row is the flat model's own test score
    assert result["models"]["flat"]["accuracy"] == pytest.approx(trained["flat"]["test"]["accuracy"])
    # the run's output is mixed+la: what the predictor gives
    router = trained["router"]
    assert (result["alpha"], result["tau"], result["flat_tau"]) == (router["alpha"], router["tau"], router["flat_tau"])
    # paired bootstrap intervals of each hierarchy against its flat baseline, in the table and the report
    for m, base in (("hard", "flat"), ("soft", "flat"), ("mixed", "flat"), ("mixed+la", "flat+la")):
        b = result["vs_flat"][m]
        assert b["baseline"] == base and b["n_resamples"] == 1000
        for metric in ("accuracy", "balanced_accuracy"):
            want = result["models"][m][metric] - result["models"][base][metric]
            assert b[metric]["diff"] == pytest.approx(want)
            assert b[metric]["low"] <= b[metric]["diff"] <= b[metric]["high"]
    assert "paired bootstrap 95% (1000 resamples)" in text
    # routing accuracy for each router input; the run's input is the one calibrated
    assert set(result["routing_accuracy_by_inputs"]) == {"va", "va+flat"}
    assert result["routing_accuracy_by_inputs"][result["router_inputs"]][result["router_default"]] == pytest.approx(
        result["routing_accuracy"][result["router_default"]]
    )
    assert result["router_inputs"] == router["inputs"] == "va"  # router.inputs = "va", the default
    saved = json.loads((rep / "metrics.json").read_text())
    assert saved["vs_flat"]["soft"]["balanced_accuracy"]["low"] == pytest.approx(
        result["vs_flat"]["soft"]["balanced_accuracy"]["low"]
    )


# --------------------------------------------------------------------------- ensemble predict


_cli = run_cli  # (exit code, stdout, stderr) of ensemble ARGV, in-process


def test_cli_predict_good_and_broken_files(trained, tmp_path, capsys):
    paths, _ = _test_faces(trained, 2)
    d = tmp_path / "in"
    d.mkdir()
    shutil.copyfile(paths[0], d / "good.png")
    shutil.copyfile(paths[1], d / "visage été ünï 2.png")
    (d / "empty.jpg").write_bytes(b"")
    (d / "notes.png").write_text("this is text, not a PNG\n")
    data = paths[0].read_bytes()
    (d / "cut.png").write_bytes(data[: len(data) // 2])
    code, out, err = _cli(["predict", str(d), "--run", str(trained["run"]), "--no-detect", "--json"], capsys)
    assert code == 1
    assert "Traceback" not in out + err
    records = [json.loads(line) for line in out.splitlines() if line.strip()]
    assert sorted(Path(r["file"]).name for r in records) == sorted(["good.png", "visage été ünï 2.png"])
    for r in records:
        assert r["emotion"] in CLASSES and 0 <= r["probability"] <= 1
        assert r["box"] is None
        assert len(r["top3"]) == 3 and r["top3"][0][0] == r["emotion"]
        assert -1 <= r["valence"] <= 1 and -1 <= r["arousal"] <= 1
        assert r["expert_classes"] and set(r["expert_classes"]) <= set(CLASSES)
        # one expert per neighborhood: the record names the neighborhood and its expert's classes,
        # not a second copy of the neighborhood's number
        assert "expert" not in r and r["expert_classes"] == trained_experts_classes(trained)[r["neighborhood"]]
        if trained["router"]["mode"] == "hard" and not trained["router"]["alpha"]:  # the routed expert named it
            assert r["emotion"] in r["expert_classes"]
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert sorted(Path(e.split(": ")[1]).name for e in errors) == ["cut.png", "empty.jpg", "notes.png"]
    assert "3 of 5 file(s) could not be read" in err


def test_cli_predict_on_every_hostile_file_of_issue_6(trained, tmp_path, capsys):
    """A folder holding each hostile file and one good face: the convertible images are
    predicted, each unusable one is named in one error line, exit code 1, no traceback."""
    from conftest import png_with_declared_size, write_broken_files

    paths, _ = _test_faces(trained, 1)
    d = tmp_path / "hostile"
    write_broken_files(d)  # 0-byte .jpg, text named .jpg, truncated PNG
    face = Image.open(paths[0]).convert("RGB")
    shutil.copyfile(paths[0], d / "good face.png")
    face.convert("RGBA").save(d / "rgba.png")
    Image.fromarray((np.asarray(face.convert("L"), dtype=np.uint16) * 257)).save(d / "gray16.png")
    face.convert("CMYK").save(d / "cmyk.jpg")
    face.convert("P").save(d / "palette.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated: the reader must turn it upright
    face.transpose(Image.Transpose.ROTATE_90).save(d / "exif-rotated.jpg", exif=exif)
    face.save(d / "ñame with spaces é.png")
    Image.new("RGB", (1, 1)).save(d / "one-pixel.png")
    png_with_declared_size(d / "bomb.png", 30000, 30000)
    code, out, err = _cli(["predict", str(d), "--run", str(trained["run"]), "--no-detect", "--json"], capsys)
    assert code == 1 and "Traceback" not in out + err
    predicted = sorted(Path(json.loads(line)["file"]).name for line in out.splitlines())
    assert predicted == sorted(
        [
            "good face.png",
            "rgba.png",
            "gray16.png",
            "cmyk.jpg",
            "palette.png",
            "exif-rotated.jpg",
            "ñame with spaces é.png",
        ]
    )
    named = sorted(Path(line.split(": ")[1]).name for line in err.splitlines() if line.startswith("error:"))
    assert named == ["bomb.png", "empty.jpg", "one-pixel.png", "text.jpg", "truncated.png"]


def test_cli_predict_skips_and_counts_non_image_names_in_folders(trained, tmp_path, capsys):
    paths, _ = _test_faces(trained, 1)
    d = tmp_path / "walk"
    (d / "sub").mkdir(parents=True)
    shutil.copyfile(paths[0], d / "sub" / "face.png")
    (d / "README.txt").write_text("not an image")
    (d / ".DS_Store").write_bytes(b"\0")
    (d / ".thumbs").mkdir()
    shutil.copyfile(paths[0], d / ".thumbs" / "hidden.png")  # in a hidden folder: skipped, counted
    (d / "linked").symlink_to(d / "sub", target_is_directory=True)  # a linked folder: not followed, counted
    code, out, err = _cli(["predict", str(d), "--run", str(trained["run"]), "--no-detect", "--json"], capsys)
    assert code == 0
    assert [Path(json.loads(line)["file"]).name for line in out.splitlines()] == ["face.png"]
    assert "skipped 4 entries in folders" in err and ".DS_Store" in err and "README.txt" in err


def test_outputs_never_replace_inputs(trained, run_copy, tmp_path, capsys):
    """--csv onto an input photo, --annotate into the folder of the inputs, export into the run:
    each refused in one line before anything is written; the inputs are unchanged."""
    paths, _ = _test_faces(trained, 1)
    photo = tmp_path / "face.png"
    shutil.copyfile(paths[0], photo)
    link = tmp_path / "same.csv"
    link.symlink_to(photo)  # another name for the same file
    before = _sha256(photo)
    for target in (photo, link):
        code, out, err = _cli(["predict", str(photo), "--run", str(trained["run"]), "--csv", str(target)], capsys)
        assert code == 2 and "would replace the input" in err and len(err.strip().splitlines()) == 1, err
    jpg = tmp_path / "in" / "x.jpg"
    jpg.parent.mkdir()
    shutil.copyfile(photo, tmp_path / "in" / "x.png")
    Image.open(photo).convert("RGB").save(jpg)
    kept = _sha256(jpg)
    code, out, err = _cli(
        ["predict", str(jpg.parent), "--run", str(trained["run"]), "--annotate", str(jpg.parent)], capsys
    )
    assert code == 2 and "would replace the input" in err and "--annotate" in err, err
    assert _sha256(jpg) == kept and not out  # refused before anything was predicted
    weights = run_copy / "flat" / "weights.pt"
    kept = _sha256(weights)
    code, out, err = _cli(["export", "--run", str(run_copy), "--format", "torchscript", "--out", str(weights)], capsys)
    assert code == 2 and "one of the inputs" in err, err
    assert _sha256(weights) == kept
    assert _sha256(photo) == before


def test_csv_has_a_row_for_every_input(trained, tmp_path, capsys):
    paths, _ = _test_faces(trained, 1)
    bad = tmp_path / "text.jpg"
    bad.write_text("not an image")
    table = tmp_path / "out.csv"
    args = [str(paths[0]), str(bad), "--run", str(trained["run"]), "--no-detect", "--csv", str(table)]
    code, out, err = _cli(["predict", *args], capsys)
    assert code == 1 and "1 of 2 file(s) could not be read" in err
    with open(table) as f:
        rows = list(csv.DictReader(f))
    assert [Path(r["file"]).name for r in rows] == [paths[0].name, "text.jpg"]
    assert rows[1]["error"] and not rows[1]["emotion"] and rows[0]["face"] == "0"  # an integer, not "0.0"
    assert list(rows[0])[0] == "file" and list(rows[0])[-2:] == ["error", "note"]


def test_face_table_keeps_column_order_and_integers_with_face_less_rows():
    from ensemble.api import face_table, no_face_row

    face = {"file": "a.jpg", "face": 0, "emotion": "happy", "x": 3, "y": 4, "p_happy": 1.0}
    table = face_table([no_face_row("b.jpg"), face, no_face_row("c.jpg", "cannot decode image")])
    assert list(table.columns) == ["file", "face", "emotion", "x", "y", "p_happy", "error", "note"]
    assert str(table["face"].dtype) == "Int64" and str(table["x"].dtype) == "Int64"
    assert table["p_happy"].dtype == float
    assert table["note"].tolist()[0] == "no face found" and table["error"].tolist()[2] == "cannot decode image"


def test_damaged_config_json_of_a_run_is_one_line(run_copy, capsys):
    for content in ("xx", "[]"):
        (run_copy / "config.json").write_text(content)
        code, out, err = _cli(["compare", "--run", str(run_copy)], capsys)
        assert code == 2 and "config.json" in err and "Traceback" not in err, err
        assert len(err.strip().splitlines()) == 1, err


def test_cli_predict_text_output_and_flat(trained, tmp_path, capsys):
    paths, _ = _test_faces(trained, 1)
    code, out, err = _cli(["predict", str(paths[0]), "--run", str(trained["run"]), "--no-detect"], capsys)
    assert code == 0 and err == ""
    assert out.startswith(str(paths[0])) and "neighborhood" in out
    code, out, err = _cli(
        ["predict", str(paths[0]), "--run", str(trained["run"]), "--no-detect", "--flat", "--json"], capsys
    )
    assert code == 0
    rec = json.loads(out)
    assert rec["emotion"] in CLASSES and "valence" not in rec


def test_cli_predict_missing_run(tmp_path, capsys):
    img = tmp_path / "x.png"
    Image.new("RGB", (8, 8)).save(img)
    code, out, err = _cli(["predict", str(img), "--run", str(tmp_path / "no_run"), "--no-detect"], capsys)
    assert code == 2
    assert err.startswith("error:") and "Traceback" not in err


def _ordinary_photo(face_png: Path, dst: Path) -> tuple[int, int, int, int]:
    """A FER+ face upscaled to 200 px on a 640x480 grey background; returns the face's (x, y, w, h)."""
    face = Image.open(face_png).convert("RGB").resize((200, 200), Image.BICUBIC)
    photo = Image.new("RGB", (640, 480), (128, 128, 128))
    photo.paste(face, (220, 140))
    photo.save(dst)
    return 220, 140, 200, 200


@pytest.mark.skipif(not FER_VALID.is_dir(), reason=f"FER+ images not present at {FER_VALID}")
def test_cli_predict_detects_a_face_in_an_ordinary_photo(trained, tmp_path, capsys):
    candidates = sorted(FER_VALID.glob("*.png"))[:8]
    assert candidates, f"no PNGs in {FER_VALID}"
    tried = []
    for face_png in candidates:
        photo = tmp_path / f"photo_{face_png.stem}.jpg"
        fx, fy, fw, fh = _ordinary_photo(face_png, photo)
        code, out, err = _cli(["predict", str(photo), "--run", str(trained["run"]), "--json"], capsys)
        assert code == 0 and "Traceback" not in out + err
        records = [json.loads(line) for line in out.splitlines() if line.strip()]
        found = [r for r in records if r.get("box")]
        tried.append((face_png.name, len(found)))
        if not found:
            assert records and records[0]["note"] == "no face found"
            continue
        x, y, w, h = found[0]["box"]  # the largest face comes first
        cx, cy = x + w / 2, y + h / 2
        assert fx <= cx <= fx + fw and fy <= cy <= fy + fh, found[0]["box"]
        assert 0 <= x and 0 <= y and x + w <= 640 and y + h <= 480
        assert found[0]["emotion"] in CLASSES
        return
    pytest.fail(f"the Haar cascade found no face in any of the test photos: {tried}")


def test_cli_predict_finds_the_face_in_a_real_photograph(trained, tmp_path, capsys):
    """scikit-image ships NASA's portrait of astronaut Eileen Collins (public domain): a real
    512x512 colour photograph with one face, whose box is known."""
    from skimage import data  # in the test extra; bundled with the wheel, no download

    photo = tmp_path / "astronaut portrait.jpg"
    Image.fromarray(data.astronaut()).save(photo, quality=90)
    code, out, err = _cli(["predict", str(photo), "--run", str(trained["run"]), "--json"], capsys)
    assert code == 0 and "Traceback" not in out + err
    rec = json.loads(out.splitlines()[0])
    x, y, w, h = rec["box"]
    assert 150 <= x + w / 2 <= 300 and 60 <= y + h / 2 <= 180 and 80 <= w <= 220, rec["box"]  # her face
    assert rec["emotion"] in CLASSES and abs(sum(p for _, p in rec["top3"])) <= 1.0001
    assert -1 <= rec["valence"] <= 1 and -1 <= rec["arousal"] <= 1 and rec["expert_classes"]


def _reopen(trained, run, *extra):
    from ensemble.experiment import open_experiment

    exp = trained["exp"]
    cfg = load_config(
        None,
        [
            f"{sec}.{k}={json.dumps(v)}"
            for sec in ("data", "model", "train")
            for k, v in dataclasses.asdict(getattr(exp.cfg, sec)).items()
            if not isinstance(v, dict)
        ]
        + ["experts.min_count=5", *extra],
    )
    return open_experiment(cfg, run, log=lambda m: None, progress=False)


def test_resume_keeps_a_finished_stage_and_refuses_other_settings(trained, run_copy):
    from stages.flat import fit_flat

    weights = _sha256(run_copy / "flat" / "weights.pt")
    logs = []
    metrics = fit_flat(_reopen(trained, run_copy), resume=True, log=logs.append)
    assert any("already trained" in m and "kept" in m for m in logs), logs
    assert metrics == json.loads((run_copy / "flat" / "metrics.json").read_text())
    with pytest.raises(UserError, match="finished flat trained with other settings"):
        fit_flat(_reopen(trained, run_copy, "train.lr=0.05"), resume=True, log=logs.append)
    assert _sha256(run_copy / "flat" / "weights.pt") == weights


def test_a_stage_cannot_build_on_its_own_trunk(trained, run_copy):
    from stages.flat import fit_flat

    weights = _sha256(run_copy / "flat" / "weights.pt")
    with pytest.raises(UserError, match="cannot build on its own trunk"):
        fit_flat(_reopen(trained, run_copy, "flat.model.trunk_from=flat"), log=lambda m: None)
    assert _sha256(run_copy / "flat" / "weights.pt") == weights


def test_compare_refuses_a_config_of_another_input_size(trained, run_copy, capsys):
    code, out, err = _cli(
        ["compare", "--run", str(run_copy), "--set", "data.format=synthetic", "--set", "data.image_size=48"], capsys
    )
    assert code == 2 and "data.image_size = 48" in err and "Traceback" not in err


def test_compare_on_a_folder_without_a_run_reads_no_data(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = _cli(["compare", "--run", str(tmp_path / "nothing")], capsys)
    assert code == 2 and "holds no trained run" in err
    assert not (tmp_path / "artifacts").exists()  # no synthetic faces were generated


def test_an_interrupted_expert_refit_leaves_the_working_experts(trained, run_copy, monkeypatch):
    import stages.experts as experts_mod
    from ensemble.engine import TrainingInterrupted

    before = {p.name: _sha256(p / "meta.json") for p in (run_copy / "experts").iterdir() if p.is_dir()}
    real = experts_mod.train_network
    calls = []

    def interrupted_on_the_second(*a, **k):
        calls.append(a[0])
        if len(calls) == 2:
            raise TrainingInterrupted("interrupted (test)")
        return real(*a, **k)

    monkeypatch.setattr(experts_mod, "train_network", interrupted_on_the_second)
    with pytest.raises(TrainingInterrupted):
        experts_mod.fit_experts(_reopen(trained, run_copy, "train.seed=1"), log=lambda m: None)
    monkeypatch.setattr(experts_mod, "train_network", real)
    after = {p.name: _sha256(p / "meta.json") for p in (run_copy / "experts").iterdir() if p.is_dir()}
    assert after == before  # the run still holds its complete, working experts
    HierarchicalPredictor.load(run_copy).predict_proba(_test_faces(trained, 2)[0])
    logs = []
    exp = _reopen(trained, run_copy, "train.seed=1")
    experts_mod.fit_experts(exp, resume=True, log=logs.append)
    assert sum("already trained" in m for m in logs) == 1  # the expert finished before the interruption
    assert not (run_copy / ".experts.new").exists()
    assert not (run_copy / "router").exists()  # calibrated for the old neighborhoods: gone with them
    from ensemble.routing import calibrate_router

    calibrate_router(exp, log=logs.append)
    HierarchicalPredictor.load(run_copy).predict_proba(_test_faces(trained, 2)[0])
    leftovers = [p.name for p in (run_copy / "experts").iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_out_of_fold_stage1_keeps_each_finished_fold(trained, run_copy, monkeypatch):
    import stages.experts as experts_mod

    exp = _reopen(trained, run_copy, "experts.train_on=routed", "experts.oof_folds=2")
    first = experts_mod.oof_stage1_va(exp, log=lambda m: None)
    folds = sorted(p.name for p in (run_copy / ".oof").rglob("fold*.npy"))
    assert folds == ["fold0.npy", "fold1.npy"] and first.shape == (len(exp.idx("train")), 2)
    monkeypatch.setattr(experts_mod, "fit", lambda *a, **k: pytest.fail("a finished fold was refitted"))
    np.testing.assert_array_equal(experts_mod.oof_stage1_va(exp, log=lambda m: None), first)


def test_predictors_take_one_image_or_arrays(trained):
    from PIL import Image as PILImage

    paths, _ = _test_faces(trained, 2)
    fp = FlatPredictor.load(trained["run"])
    one = fp.predict_proba(str(paths[0]))  # a single path, not its characters
    assert one.shape == (1, 8)
    arr = np.asarray(PILImage.open(paths[0]).convert("RGB"))
    np.testing.assert_allclose(fp.predict_proba(arr), one, atol=1e-6)
    np.testing.assert_allclose(fp.predict_proba([arr, paths[1]])[0], one[0], atol=1e-6)
    with pytest.raises(UserError, match="uint8"):
        fp.predict_proba(arr.astype(np.float32))


def test_cli_predict_flat_with_a_router_is_refused(trained, tmp_path, capsys):
    paths, _ = _test_faces(trained, 1)
    code, out, err = _cli(
        ["predict", str(paths[0]), "--run", str(trained["run"]), "--flat", "--router", "soft"], capsys
    )
    assert code == 2 and "--flat" in err and "Traceback" not in err


def test_cli_compare_writes_only_into_its_report_folder(trained, run_copy, tmp_path, capsys):
    before = _sha256(run_copy / "config.json")
    rep = tmp_path / "report"
    code, out, err = _cli(["compare", "--run", str(run_copy), "--out", str(rep)], capsys)
    assert code == 0, err
    assert (rep / "report.md").is_file() and (rep / "config.json").is_file()
    assert _sha256(run_copy / "config.json") == before


def trained_experts_classes(trained) -> list[list[str]]:
    return [e["classes"] for e in sorted(trained["experts"]["experts"], key=lambda e: e["region"])]


def test_router_without_validation_faces_keeps_the_configured_mode_and_temperature(trained, tmp_path):
    from ensemble.config import DEFAULT_TEMPERATURE, RouterConfig
    from ensemble.routing import calibrate_router

    run_copy = tmp_path / "run"
    shutil.copytree(trained["run"], run_copy)
    exp = trained["exp"]
    manifest = exp.manifest.copy()
    manifest.loc[manifest["split"] == "val", "split"] = "unused"  # no validation faces
    for mode, temperature, want_mode, want_t in (
        ("hard", 0.3, "hard", 0.3),
        ("auto", 0.0, "soft", DEFAULT_TEMPERATURE),
    ):
        cfg = dataclasses.replace(exp.cfg, router=RouterConfig(mode=mode, temperature=temperature))
        logs = []
        result = calibrate_router(dataclasses.replace(exp, cfg=cfg, run=run_copy, manifest=manifest), logs.append)
        assert (result["mode"], result["temperature"]) == (want_mode, want_t)
        assert any("no validation faces" in m and want_mode in m for m in logs), logs
        saved = json.loads((run_copy / "router" / "router.json").read_text())
        assert (saved["mode"], saved["temperature"]) == (want_mode, want_t)
        hp = HierarchicalPredictor.load(run_copy)
        assert hp.mode == want_mode and hp.net.posterior.temperature == pytest.approx(want_t)


def test_fit_experts_without_stage1_is_refused_before_anything_trains(trained, tmp_path):
    from ensemble.routing import fit_experts_and_router

    run = tmp_path / "run"
    run.mkdir()
    shutil.copytree(trained["run"] / "flat", run / "flat")
    exp = _reopen(trained, run, 'experts.train_on="true_va"')
    with pytest.raises(UserError, match="fit-experts needs stage 1.*fit-stage1 first"):
        fit_experts_and_router(exp, log=lambda m: None)
    assert not any((run / name).exists() for name in ("neighborhoods", "experts", ".experts.new", "router"))


def test_a_refused_or_failed_command_leaves_the_runs_config(trained, run_copy):
    """config.json is what compare and calibrate read back: written when a stage succeeds, not
    when a command that then stops opens the run."""
    from ensemble.config import records_config
    from ensemble.experiment import open_experiment

    before = _sha256(run_copy / "config.json")
    cfg = dataclasses.replace(trained["exp"].cfg, train=dataclasses.replace(trained["exp"].cfg.train, seed=99))
    exp = open_experiment(cfg, run_copy, log=lambda *a: None, progress=False)
    assert _sha256(run_copy / "config.json") == before  # opening alone writes nothing over it

    @records_config
    def failing(exp):
        raise UserError("refused")

    with pytest.raises(UserError):
        failing(exp)
    assert _sha256(run_copy / "config.json") == before

    @records_config
    def succeeding(exp):
        return {}

    succeeding(exp)
    assert json.loads((run_copy / "config.json").read_text())["train"]["seed"] == 99


def test_a_fresh_fit_says_it_replaces_an_interrupted_checkpoint(tmp_path):
    from ensemble.experiment import open_experiment
    from stages.flat import fit_flat

    cfg = load_config(None, [*TINY_SYNTHETIC, f"data.cache_dir={tmp_path / 'cache'}"])
    run = tmp_path / "run"
    (run / ".flat.work").mkdir(parents=True)
    (run / ".flat.work" / "checkpoint.pt").write_bytes(b"epochs of an interrupted fit")
    logs = []
    fit_flat(open_experiment(cfg, run, log=logs.append, progress=False), log=logs.append)
    assert any("starting afresh over an interrupted run's checkpoint" in line for line in logs), logs
