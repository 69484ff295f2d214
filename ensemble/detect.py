"""Faces in photos: detect (MTCNN with five landmarks, BlazeFace, or OpenCV's Haar cascade), then align and crop.

``mtcnn``: MTCNN (:mod:`ensemble.mtcnn`), whose weights (2 MB, MIT) install inside
facenet-pytorch's wheel, so nothing is downloaded at run time. It returns a box and five
landmarks per face (eyes, nose, mouth corners), so the face can be turned upright by its eyes.
``blazeface`` (default): MediaPipe's BlazeFace full-range model (:mod:`ensemble.blazeface`; weights vendored,
Apache-2.0; run by LiteRT, ``pip install ai-edge-litert``): one small network pass a photo, eyes,
nose and mouth centre, boxes given in MTCNN's convention.
``haar``: OpenCV's frontal-face cascade (shipped in opencv-python-headless), boxes only.
``none``: the image is already a face crop.

Large photos are downscaled before detection (cost grows with pixels; faces stay findable),
boxes and landmarks are returned in the original image's pixels.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
from PIL import Image

from .errors import UserError

DETECTORS = ("mtcnn", "blazeface", "haar", "none")
DEFAULT_DETECTOR = "blazeface"  # as many visible faces as MTCNN on the shared photos, no false box, 3-6x faster
# FER+ faces are tight 48-px crops (brows to chin): eyes 0.39 of the side apart, at 0.40 of its
# height, mouth at 0.80 (MTCNN's landmarks on 254 FER+ training faces). An MTCNN box shrunk by
# 0.05 of its side on each side gives 0.38 / 0.40 / 0.78 on the shared photos; Haar's box is
# 1/1.09 of MTCNN's with the same centre, so margin 0 crops it alike. Used for runs trained on
# face crops (box_source "image", see run_crop). Measured by benchmarks/crops.py (picture: results/crops-ferplus-vs-detector.png).
DEFAULT_MARGIN = {"mtcnn": -0.05, "blazeface": -0.05, "haar": 0.0}  # blazeface: boxes mapped to MTCNN's
MAX_SIDE = 800  # long side a photo is downscaled to before detection
MIN_FACE = 20  # MTCNN's smallest face, in pixels of the downscaled photo


@dataclass
class Face:
    """One detected face: ``box`` (x, y, w, h) in image pixels, ``landmarks`` (5, 2) or None
    (left eye, right eye, nose, left mouth corner, right mouth corner, as seen in the image),
    ``score`` the detector's confidence (1.0 for Haar, which gives none), ``region`` the part of
    the photo the model is shown (:func:`face_region`), set when the face is cropped."""

    box: tuple[int, int, int, int]
    landmarks: np.ndarray | None = None
    score: float = 1.0
    detector: str = field(default="none")
    region: tuple[float, float, float, float] | None = None


def check_detector(name: str) -> str:
    if name not in DETECTORS:
        raise UserError(f"detector must be one of {', '.join(DETECTORS)}, got {name!r}")
    return name


def _downscale(image: Image.Image, max_side: int) -> tuple[Image.Image, float]:
    scale = min(1.0, max_side / max(image.size))
    if scale < 1.0:
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.BILINEAR)
    return image, scale


_local = threading.local()


def _haar():
    """OpenCV's cascade, one per thread: detectMultiScale on one shared object is not thread-safe."""
    if not hasattr(_local, "haar"):
        _local.haar = _load_haar()
    return _local.haar


def _load_haar():
    try:
        import cv2
    except ImportError:
        raise UserError(
            "face detection needs opencv-python-headless<5 (pip install 'opencv-python-headless<5'), "
            "or pass --detector none for images that are face crops"
        ) from None
    if not hasattr(cv2, "CascadeClassifier"):  # OpenCV 5 dropped the cascades
        raise UserError(
            f"OpenCV {getattr(cv2, '__version__', '?')} has no Haar cascades: pip install 'opencv-python-headless<5', "
            "or pass --detector mtcnn"
        )
    if not hasattr(cv2, "data"):  # a distribution's build (apt, conda) without the cascade files
        raise UserError(
            f"this OpenCV build ({getattr(cv2, '__version__', '?')}) ships no cascade files (cv2.data): "
            "pip install 'opencv-python-headless<5', or pass --detector mtcnn"
        )
    path = cv2.data.haarcascades + "haarcascade_frontalface_default.xml"
    cascade = cv2.CascadeClassifier(path)
    if cascade.empty():
        raise UserError(f"OpenCV's Haar cascade is missing ({path}); install opencv-python-headless<5")
    return cv2, cascade


@lru_cache(maxsize=1)
def _mtcnn():
    from .mtcnn import MTCNN

    return MTCNN(min_face=MIN_FACE)  # the paper's thresholds; one instance serves every decode thread


def detect_haar(image: Image.Image, max_side: int = MAX_SIDE, min_size: int = 24) -> list[Face]:
    cv2, cascade = _haar()
    small, scale = _downscale(image.convert("L"), max_side)
    if min(small.size) < min_size:  # no face of the smallest size fits (a 2 x 30000 strip)
        return []
    gray = cv2.equalizeHist(np.asarray(small))
    found = cascade.detectMultiScale(gray, scaleFactor=1.1, minNeighbors=5, minSize=(min_size, min_size))
    faces = [Face(tuple(round(v / scale) for v in b), None, 1.0, "haar") for b in (found if len(found) else [])]
    return sorted(faces, key=lambda f: -f.box[2] * f.box[3])


def detect_mtcnn(image: Image.Image, max_side: int = MAX_SIDE, min_score: float = 0.9) -> list[Face]:
    model = _mtcnn()
    small, scale = _downscale(image.convert("RGB"), max_side)
    if min(small.size) < MIN_FACE:  # no face of the smallest size fits (a 2 x 30000 strip)
        return []
    boxes, probs, points = model.detect(np.asarray(small))
    keep = probs >= min_score
    return _faces(image, scale, boxes[keep], probs[keep], points[keep], "mtcnn")


def _faces(image: Image.Image, scale: float, boxes, scores, points, detector: str) -> list[Face]:
    """Faces from a detector's (x0, y0, x1, y1) boxes, scores and landmarks on the photo downscaled
    by ``scale``: back in the photo's pixels, clipped to it, slivers dropped, largest first."""
    faces = []
    for b, p, lm in zip(boxes, scores, points):
        x0, y0, x1, y1 = (float(v) / scale for v in b)
        x0, y0 = max(0.0, x0), max(0.0, y0)
        x1, y1 = min(float(image.width), x1), min(float(image.height), y1)
        if x1 - x0 < 2 or y1 - y0 < 2:
            continue
        box = (round(x0), round(y0), round(x1 - x0), round(y1 - y0))
        faces.append(Face(box, np.asarray(lm, np.float32) / scale, float(p), detector))
    return sorted(faces, key=lambda f: -f.box[2] * f.box[3])


def detect_blazeface(image: Image.Image, max_side: int = MAX_SIDE) -> list[Face]:
    from .blazeface import detect as blazeface

    small, scale = _downscale(image.convert("RGB"), max_side)
    return _faces(image, scale, *blazeface(small), "blazeface")


def detect(image: Image.Image, detector: str = DEFAULT_DETECTOR, max_side: int = MAX_SIDE) -> list[Face]:
    """Every face in ``image``, largest first; ``none``: the whole image is one face."""
    check_detector(detector)
    if detector == "none":
        return [Face((0, 0, image.width, image.height), None, 1.0, "none")]
    if detector == "haar":
        return detect_haar(image, max_side)
    if detector == "blazeface":
        return detect_blazeface(image, max_side)
    return detect_mtcnn(image, max_side)


def eye_angle(landmarks: np.ndarray | None) -> float:
    """Roll of the face in degrees (positive: the right eye, as seen, is lower), 0 without landmarks."""
    if landmarks is None:
        return 0.0
    (lx, ly), (rx, ry) = landmarks[0], landmarks[1]
    return math.degrees(math.atan2(ry - ly, rx - lx))


def align_crop(image, box, landmarks=None, margin: float = 0.0, size: int = 48) -> np.ndarray:
    """(size, size, 3) uint8: the square around ``box`` widened by ``margin`` of its side on each
    side, turned so the eyes are level when ``landmarks`` are given, resized to ``size``.

    ``image``: PIL image or (H, W[, 3]) uint8 array; ``box``: (x, y, w, h). Pixels outside the
    photo repeat its border. One affine warp does rotation, crop and resize.
    """
    import cv2

    arr = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    x, y, w, h = box
    cx, cy = x + w / 2.0, y + h / 2.0
    side = max(w, h) * (1.0 + 2.0 * margin)
    theta = math.radians(eye_angle(landmarks))
    # output pixel (u, v) -> source  c + R(theta) @ s * ((u, v) - size/2 + 0.5)
    s = side / size
    cos, sin = math.cos(theta) * s, math.sin(theta) * s
    half = size / 2.0 - 0.5
    to_src = np.array([[cos, -sin, cx - cos * half + sin * half], [sin, cos, cy - sin * half - cos * half]], np.float64)
    interp = cv2.INTER_AREA if s > 1.5 else cv2.INTER_LINEAR
    if s > 1.5:  # shrink first so a large face is averaged, not aliased
        k = 1.0 / s
        pre = cv2.resize(arr, None, fx=k, fy=k, interpolation=cv2.INTER_AREA)
        to_src = np.vstack([to_src, [0, 0, 1]])
        to_src = (np.diag([pre.shape[1] / arr.shape[1], pre.shape[0] / arr.shape[0], 1.0]) @ to_src)[:2]
        arr, interp = pre, cv2.INTER_LINEAR
    return cv2.warpAffine(
        np.ascontiguousarray(arr),
        to_src,
        (size, size),
        flags=interp | cv2.WARP_INVERSE_MAP,
        borderMode=cv2.BORDER_REPLICATE,
    )


def run_crop(meta: dict, detector: str) -> tuple[str, float]:
    """How a face that ``detector`` found is cropped for a run's model: ``(box_source, margin)``.

    The run's ``meta.json`` records its training crop (:mod:`ensemble.crop`):

    * ``box_source = "image"``: the training images ARE face crops (FER+, folders of faces). The
      crop that matches them is the detector's measured one, :data:`DEFAULT_MARGIN` (MTCNN -0.05,
      Haar 0; benchmarks/crops.py). The margin such runs record (0.2) describes no measurement,
      so it is not used here.
    * ``box_source = "annotation"``: the model saw the data set's face boxes (AffectNet). The
      detector's box stands for that box, widened by the recorded ``margin`` with
      :func:`ensemble.crop.crop_box`, the detector contract.
    * Runs that record no crop were trained on face crops: as ``"image"``.
    """
    crop = meta.get("crop") or {}
    if crop.get("box_source") == "annotation":
        return "annotation", float(crop.get("margin", 0.0))
    return "image", DEFAULT_MARGIN.get(detector, 0.0)


def face_region(box, image_size: tuple[int, int], box_source: str, margin: float) -> tuple[float, ...]:
    """The region (x, y, w, h) of the photo that becomes the model's input for a detected ``box``
    (see :func:`run_crop`): for ``"annotation"`` :func:`ensemble.crop.crop_box` (clipped to the
    image, like the training boxes); for ``"image"`` the square around the box widened by
    ``margin`` of its side on each side (pixels past the photo's edge repeat its border)."""
    from .crop import crop_box

    if box_source == "annotation":
        return tuple(float(v) for v in crop_box(box, image_size, margin))
    x, y, w, h = (float(v) for v in box)
    side = max(w, h) * (1.0 + 2.0 * margin)
    return (x + w / 2 - side / 2, y + h / 2 - side / 2, side, side)
