"""BlazeFace, the default face detector: vendored weights, LiteRT, boxes in MTCNN's convention,
landmarks that align, a clear error without its runtime."""

from __future__ import annotations

import hashlib
import threading

import numpy as np
import pytest
from PIL import Image

from ensemble import blazeface
from ensemble.detect import DEFAULT_DETECTOR, DETECTORS, detect, eye_angle
from ensemble.errors import UserError


@pytest.fixture(scope="module")
def astronaut():
    from skimage import data

    return Image.fromarray(data.astronaut())


def test_the_weights_are_vendored_intact_with_their_licence():
    data = blazeface.MODEL.read_bytes()
    assert hashlib.sha256(data).hexdigest() == "99bf9494d84f50acc6617d89873f71bf6635a841ea699c17cb3377f9507cfec3"
    folder = blazeface.MODEL.parent
    assert "Apache License" in (folder / "LICENSE-APACHE-2.0.txt").read_text()
    assert "Apache License 2.0" in (folder / "README.md").read_text()


def test_it_is_the_default_of_the_api_and_the_cli():
    import click

    from ensemble.cli import cli

    assert DEFAULT_DETECTOR == "blazeface" and "blazeface" in DETECTORS
    option = next(p for p in cli.commands["predict"].params if p.name == "detector")
    assert option.default == DEFAULT_DETECTOR and isinstance(option.type, click.Choice)


def test_one_face_on_the_astronaut_where_mtcnn_finds_it(astronaut):
    (b,) = detect(astronaut, "blazeface")
    (m,) = detect(astronaut, "mtcnn")
    assert b.detector == "blazeface" and 0.5 <= b.score <= 1 and b.landmarks.shape == (5, 2)
    # boxes in MTCNN's convention: the square side and the centre agree within a fifth of the side
    side_b, side_m = max(b.box[2:]), max(m.box[2:])
    assert 0.8 < side_b / side_m < 1.25
    centre = lambda f: np.array([f.box[0] + f.box[2] / 2, f.box[1] + f.box[3] / 2])  # noqa: E731
    assert np.abs(centre(b) - centre(m)).max() < 0.2 * side_m
    # the eyes: the one on the image's left first, both inside the box, level like MTCNN's
    lx, rx = b.landmarks[0][0], b.landmarks[1][0]
    assert lx < rx and b.box[0] < lx and rx < b.box[0] + b.box[2]
    assert abs(eye_angle(b.landmarks) - eye_angle(m.landmarks)) < 5


def test_a_turned_face_is_found_and_its_roll_measured(astronaut):
    turned = astronaut.rotate(30, resample=Image.BICUBIC, expand=True)
    (b,) = detect(turned, "blazeface")
    (m,) = detect(turned, "mtcnn")
    assert abs(eye_angle(b.landmarks) - eye_angle(m.landmarks)) < 5 and abs(eye_angle(b.landmarks)) > 20


def test_no_face_on_a_blank_image_and_tiny_images_pass():
    assert detect(Image.new("RGB", (300, 200), (120, 120, 120)), "blazeface") == []
    assert detect(Image.new("RGB", (2, 3000)), "blazeface") == []


def test_nms_keeps_the_best_of_overlapping_boxes():
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60]], np.float32)
    assert blazeface.nms(boxes, np.array([0.7, 0.9, 0.8])) == [1, 2]


def test_without_litert_the_error_is_one_line(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "ai_edge_litert.interpreter", None)  # import fails as if not installed
    caught = []

    def fresh_thread():  # interpreters are per thread: a new thread builds one
        try:
            blazeface.detect(Image.new("RGB", (64, 64)))
        except UserError as exc:
            caught.append(str(exc))

    t = threading.Thread(target=fresh_thread)
    t.start()
    t.join()
    assert len(caught) == 1 and "pip install ai-edge-litert" in caught[0] and "\n" not in caught[0]
