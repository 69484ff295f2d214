"""The project's MTCNN cascade: the same faces, boxes and landmarks as facenet-pytorch's, whose
weights it reads, without importing torchvision; its NMS; a missing weight file in one line."""

import importlib.util
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from ensemble import mtcnn
from ensemble.errors import UserError


def _iou(a, b) -> float:
    x0, y0 = max(a[0], b[0]), max(a[1], b[1])
    x1, y1 = min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, x1 - x0) * max(0.0, y1 - y0)
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


@pytest.fixture(scope="module")
def photos():
    """The astronaut, and a 640x360 group: her face small, mirrored, and cut by the left edge."""
    from skimage import data

    astro = Image.fromarray(data.astronaut())
    group = Image.new("RGB", (640, 360), (90, 110, 130))
    group.paste(astro.resize((256, 256)), (-60, 40))
    group.paste(astro.transpose(Image.Transpose.FLIP_LEFT_RIGHT).resize((180, 180)), (300, 20))
    group.paste(astro.resize((120, 120)).rotate(15), (500, 220))
    return [np.asarray(astro), np.asarray(group)]


def test_same_detections_as_facenet_pytorch(photos):
    pytest.importorskip("torchvision")
    from facenet_pytorch.models.mtcnn import MTCNN as Reference

    ref = Reference(keep_all=True, min_face_size=20, thresholds=[0.6, 0.7, 0.7], post_process=False).eval()
    ours = mtcnn.MTCNN(min_face=20)
    total = 0
    for (boxes, scores, points), im in zip(ours.detect_many(photos), photos):
        r_boxes, r_scores, r_points = ref.detect(Image.fromarray(im), landmarks=True)
        keep = scores >= 0.9
        r_keep = np.asarray([s is not None and s >= 0.9 for s in r_scores]) if r_boxes is not None else []
        assert keep.sum() == np.sum(r_keep) >= 1
        for rb, rs, rp in zip(r_boxes[r_keep], np.asarray(r_scores)[r_keep], r_points[r_keep]):
            j = int(np.argmax([_iou(rb, b) for b in boxes]))
            assert _iou(rb, boxes[j]) > 0.99
            assert abs(float(rs) - scores[j]) < 1e-3
            assert np.abs(rp - points[j]).max() < 0.5  # pixels
            total += 1
    assert total >= 4  # the astronaut, and at least three faces of the group


def test_detect_many_equals_one_at_a_time(photos):
    ours = mtcnn.MTCNN()
    for (b1, s1, p1), im in zip(ours.detect_many(photos), photos):
        b2, s2, p2 = ours.detect(im)
        np.testing.assert_allclose(b1, b2, atol=1e-3)
        np.testing.assert_allclose(s1, s2, atol=1e-5)
        np.testing.assert_allclose(p1, p2, atol=1e-3)
    assert ours.detect_many([]) == []
    boxes, scores, points = ours.detect(np.full((60, 80, 3), 128, np.uint8))
    assert boxes.shape == (0, 4) and scores.shape == (0,) and points.shape == (0, 5, 2)


def test_nms_keeps_the_best_of_each_overlapping_group():
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60], [2, 2, 6, 6]], float)
    scores = np.array([0.8, 0.9, 0.7, 0.95])
    assert mtcnn.nms(boxes, scores, 0.5).tolist() == [3, 1, 2]  # the small box overlaps little by IoU
    assert mtcnn.nms(boxes, scores, 0.5, by_min=True).tolist() == [3, 2]  # but lies inside the others
    assert mtcnn.nms(np.zeros((0, 4)), np.zeros(0), 0.5).tolist() == []


def test_pyramid_starts_at_the_smallest_face_and_stops_at_the_window():
    m = mtcnn.MTCNN(min_face=24)
    s = m.scales(240, 320)
    assert s[0] == pytest.approx(0.5) and all(b / a == pytest.approx(mtcnn.FACTOR) for a, b in zip(s, s[1:]))
    assert 240 * s[-1] >= 12 > 240 * s[-1] * mtcnn.FACTOR


def test_missing_weights_are_one_line(monkeypatch, tmp_path):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match="facenet-pytorch"):
        mtcnn.weights_dir()
    with pytest.raises(FileNotFoundError):
        mtcnn.MTCNN(weights=tmp_path)


def test_importing_and_detecting_needs_no_torchvision(photos, tmp_path):
    path = tmp_path / "a.png"
    Image.fromarray(photos[0]).save(path)
    code = (
        "import sys, numpy as np; from PIL import Image; from ensemble.mtcnn import MTCNN; "
        f"b, s, p = MTCNN().detect(np.asarray(Image.open({str(path)!r}))); assert len(b) == 1, b; "
        "assert 'torchvision' not in sys.modules and 'facenet_pytorch' not in sys.modules"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-600:]
