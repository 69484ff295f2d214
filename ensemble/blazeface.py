"""BlazeFace (Bazarevsky et al. 2019): MediaPipe's full-range face detector, run by LiteRT.

One 192 x 192 pass over the whole photo (letterboxed to a square): a score, a box and six
keypoints (the eyes, the nose tip, the mouth centre, the ear tragions) for each of 2,304 anchors
on a 48 x 48 grid, then greedy non-maximum suppression. Its weights are vendored
(``ensemble/detectors/blazeface_full_range.tflite``, Apache-2.0, see the README there) and run
with LiteRT (``ai-edge-litert``), so nothing is downloaded and torch is not involved.

Boxes are returned in MTCNN's convention, so that the crops measured for MTCNN apply unchanged:
BlazeFace's box is a little smaller and lower on the face than MTCNN's. On the 68 faces both
found in the shared photos, MTCNN's side is 1.17 x BlazeFace's (median) and its centre 0.0725 of
BlazeFace's side higher (``benchmarks/detectors.py`` prints both figures).
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import UserError

MODEL = Path(__file__).resolve().parent / "detectors" / "blazeface_full_range.tflite"
SIZE = 192  # the network's input side
GRID = 48  # anchors: one per cell of a 48 x 48 grid, centred, unit size
MIN_SCORE = 0.5  # MediaPipe's default minimum detection confidence
NMS_IOU = 0.3  # boxes overlapping a better one more than this are the same face
#: BlazeFace box -> MTCNN box: side factor and upward shift of the centre, in BlazeFace sides
TO_MTCNN_SIDE, TO_MTCNN_UP = 1.17, 0.0725

_local = threading.local()


def _interpreter():
    """One LiteRT interpreter per thread (an interpreter is not thread-safe), one CPU thread each."""
    if not hasattr(_local, "blazeface"):
        try:
            from ai_edge_litert.interpreter import Interpreter
        except ImportError:
            raise UserError(
                "the blazeface detector runs on LiteRT: pip install ai-edge-litert, or pass --detector mtcnn"
            ) from None
        with _quiet_stderr():  # LiteRT's C++ "INFO: Created TensorFlow Lite XNNPACK delegate for CPU."
            it = Interpreter(model_path=str(MODEL), num_threads=1)
            it.allocate_tensors()
        outs = it.get_output_details()
        reg = next(o["index"] for o in outs if o["shape"][-1] == 16)
        cls = next(o["index"] for o in outs if o["shape"][-1] == 1)
        _local.blazeface = (it, it.get_input_details()[0]["index"], reg, cls)
    return _local.blazeface


@contextlib.contextmanager
def _quiet_stderr():
    """The process's stderr (file descriptor 2) sent to /dev/null while a LiteRT interpreter is
    built: its C++ log line cannot be turned off otherwise. A moment, once per thread."""
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # a replaced sys.stderr (pytest's capture, a notebook)
        yield
        return
    sys.stderr.flush()
    saved, null = os.dup(fd), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, fd)
        yield
    finally:
        os.dup2(saved, fd)
        os.close(saved)
        os.close(null)


_ys, _xs = np.mgrid[0:GRID, 0:GRID]
ANCHORS = np.stack([(_xs.ravel() + 0.5) / GRID, (_ys.ravel() + 0.5) / GRID], 1).astype(np.float32)


def nms(boxes: np.ndarray, scores: np.ndarray, threshold: float = NMS_IOU) -> list[int]:
    """Greedy non-maximum suppression on (x0, y0, x1, y1) boxes: indices kept, best first."""
    order = np.argsort(-scores, kind="stable")
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    keep = []
    while order.size:
        i, rest = order[0], order[1:]
        keep.append(int(i))
        w = np.clip(np.minimum(boxes[i, 2], boxes[rest, 2]) - np.maximum(boxes[i, 0], boxes[rest, 0]), 0, None)
        h = np.clip(np.minimum(boxes[i, 3], boxes[rest, 3]) - np.maximum(boxes[i, 1], boxes[rest, 1]), 0, None)
        inter = w * h
        order = rest[inter / (area[i] + area[rest] - inter + 1e-12) <= threshold]
    return keep


def detect(rgb: Image.Image, min_score: float = MIN_SCORE) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Faces in an RGB image: boxes (n, 4) x0 y0 x1 y1 in MTCNN's convention, scores (n,), and
    landmarks (n, 5, 2) as :class:`ensemble.detect.Face` holds them (the eye on the image's left,
    the other eye, the nose tip, the mouth centre twice), in the image's pixels, best first."""
    it, inp, reg_i, cls_i = _interpreter()
    side = max(rgb.size)
    square = Image.new("RGB", (side, side))
    square.paste(rgb, (0, 0))
    x = np.asarray(square.resize((SIZE, SIZE), Image.BILINEAR), np.float32) / 127.5 - 1.0
    it.set_tensor(inp, x[None])
    it.invoke()
    raw = it.get_tensor(reg_i)[0]
    logit = np.clip(it.get_tensor(cls_i)[0, :, 0], -100.0, 100.0)
    ok = logit >= np.log(min_score / (1.0 - min_score))  # sigmoid(logit) >= min_score
    if not ok.any():
        return np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros((0, 5, 2), np.float32)
    r, a = raw[ok] / SIZE, ANCHORS[ok]
    score = 1.0 / (1.0 + np.exp(-logit[ok]))
    cx, cy, w, h = r[:, 0] + a[:, 0], r[:, 1] + a[:, 1], r[:, 2], r[:, 3]
    boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 1)
    keep = nms(boxes, score)
    boxes, score, r, a, cx, cy = boxes[keep], score[keep], r[keep], a[keep], cx[keep], cy[keep]
    kp = (r[:, 4:16].reshape(-1, 6, 2) + a[:, None, :]) * side
    s = np.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]) * side * TO_MTCNN_SIDE
    mx, my = cx * side, cy * side - TO_MTCNN_UP * s / TO_MTCNN_SIDE
    out = np.stack([mx - s / 2, my - s / 2, mx + s / 2, my + s / 2], 1)
    landmarks = np.concatenate([kp[:, 0:4], kp[:, 3:4]], 1)  # eyes, nose, mouth centre as both corners
    return out.astype(np.float32), score.astype(np.float32), landmarks.astype(np.float32)
