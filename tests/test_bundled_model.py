"""The FER+ hierarchy that ships inside the package: present, intact, small, and right on a real photo.

These tests read the committed model (``ensemble/models/ferplus``); they never skip: a missing or
damaged bundle is a failure, since `ensemble predict photo.jpg` depends on it.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from ensemble import bundle
from ensemble.classes import CLASSES

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def bundled():
    run = bundle.default_run()
    assert run is not None and run.name == bundle.DEFAULT_NAME, "the FER+ model is not bundled"
    return run


@pytest.fixture(scope="module")
def model(bundled):
    import ensemble

    return ensemble.load()


@pytest.fixture(scope="module")
def astronaut_jpg(tmp_path_factory):
    from PIL import Image
    from skimage import data

    path = tmp_path_factory.mktemp("photo") / "astronaut.jpg"
    Image.fromarray(data.astronaut()).save(path, quality=90)
    return path


def test_bundle_is_a_complete_half_precision_run_within_budget(bundled):
    import torch

    runs = bundle.bundled_models()
    assert [p.name for p in runs] == [bundle.DEFAULT_NAME]  # one bundled model: the repository's only weights
    total = sum(p.stat().st_size for p in bundled.rglob("*") if p.is_file())
    assert total <= 40 * 2**20, f"bundled model is {total / 2**20:.1f} MiB"
    for stage in ("flat", "stage1", "neighborhoods", "experts", "router", "calibration", "model_card", "onnx"):
        assert (bundled / stage / "meta.json").is_file(), stage
    weights = torch.load(bundled / "flat" / "weights.pt", map_location="cpu", weights_only=True)
    floats = [t for t in weights.values() if t.is_floating_point()]
    assert floats and all(t.dtype == torch.float16 for t in floats)


def test_default_load_is_the_bundle_and_verifies_every_file(bundled, model):
    assert model.run == bundled
    # every stage folder lists each file with its sha256: nothing unlisted, nothing altered
    from ensemble.artifacts import read_meta

    for meta in bundled.rglob("meta.json"):
        read_meta(meta.parent, meta.parent.name)


def test_model_card_says_what_it_is_and_is_not(bundled):
    card = json.loads((bundled / "model_card" / "card.json").read_text())
    assert card["classes"] == list(CLASSES)
    assert card["data"]["format"] == "ferplus" and "MIT" in card["licence"]
    assert "not for decisions about people" in card["not_for"]
    assert card["command"].startswith("ensemble fit-flat")


def test_models_lists_every_compared_row_and_names_what_predict_answers(bundled):
    from ensemble.bundle import list_models, render_models

    text = render_models([r for r in list_models() if r["run"] == bundled])
    for row in ("flat", "hard", "soft", "mixed", "mixed+la", "oracle"):
        assert f"valid {row}: accuracy" in text, row
    assert "what predict answers" in text.split("valid mixed+la:")[1].splitlines()[0]
    assert "runs on: ONNX Runtime, without torch" in text


def test_a_tampered_bundled_file_is_refused(bundled, tmp_path):
    import shutil

    import ensemble
    from ensemble.errors import UserError

    copy = tmp_path / "ferplus"
    shutil.copytree(bundled, copy)
    w = copy / "stage1" / "weights.pt"
    w.write_bytes(w.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(UserError):
        ensemble.load(copy).predict(__import__("numpy").zeros((48, 48, 3), "uint8"), detector="none")


def test_astronaut_photo_is_happy_through_the_api(model, astronaut_jpg):
    faces = model.predict(str(astronaut_jpg))
    assert len(faces) == 1
    face = faces[0]
    assert face["emotion"] == "happy", face["probabilities"]
    assert face["valence"] > 0.2


def test_astronaut_rotated_30_degrees_is_the_same_face_and_emotion(model):
    from PIL import Image
    from skimage import data

    photo = Image.fromarray(data.astronaut()).rotate(30, resample=Image.BICUBIC, expand=True)
    faces = model.predict(photo)
    assert len(faces) == 1 and faces[0]["emotion"] == "happy", faces


def test_cli_predict_on_a_photo_uses_the_bundle(astronaut_jpg):
    out = subprocess.run(
        [sys.executable, "-m", "ensemble", "predict", str(astronaut_jpg), "--json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.strip()]
    assert len(rows) == 1 and rows[0]["emotion"] == "happy"
    assert "synthetic" not in out.stderr and "artifacts/demo" not in out.stderr


def test_loading_reads_each_weights_file_once(bundled, monkeypatch):
    """The flat model's trunk serves stage 1, every expert and the flat model itself: read and
    converted to float32 once (a second read held a second 60 MB copy at the load's peak)."""
    import collections

    import torch

    import ensemble

    reads = collections.Counter()
    real = torch.load

    def counting(f, *a, **k):
        reads[str(f)] += 1
        return real(f, *a, **k)

    monkeypatch.setattr(torch, "load", counting)
    model = ensemble.load(backend="torch")  # (the default, ONNX Runtime, reads each file once too: without torch)
    assert reads and max(reads.values()) == 1, reads
    assert str(bundled / "flat" / "weights.pt") in reads
    net = model.net.net
    assert net.flat_head is not None  # the bundle's answer mixes the flat model in
    assert len({id(t) for t in net.trunks.values()}) == 1  # one trunk module for every stage


def test_a_bundled_model_is_named_by_its_name_where_no_such_folder_exists(bundled, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert bundle.resolve_run(bundled.name) == bundled  # --run ferplus, ensemble.load("ferplus")
    (tmp_path / bundled.name).mkdir()
    assert bundle.resolve_run(bundled.name) == tmp_path.joinpath(bundled.name).relative_to(tmp_path)  # a folder wins
    assert bundle.resolve_run("no-such-model") == type(bundled)("no-such-model")  # left to the loader's message
