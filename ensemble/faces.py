"""Face detection with OpenCV's Haar cascade (shipped inside opencv-python-headless<5)."""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from PIL import Image

from .errors import UserError


@lru_cache(maxsize=1)
def _cascade():
    try:
        import cv2
    except ImportError:
        raise UserError(
            "face detection needs opencv-python-headless<5 (pip install 'opencv-python-headless<5'), "
            "or pass --no-detect for images that are face crops"
        ) from None
    path = cv2.data.haarcascades + "haarcascade_frontalface_default.xml"
    cascade = cv2.CascadeClassifier(path)
    if cascade.empty():
        raise UserError(f"OpenCV's Haar cascade is missing ({path}); install opencv-python-headless<5")
    return cv2, cascade


def detect_faces(image: Image.Image, margin: float = 0.2, min_size: int = 24) -> list[tuple[int, int, int, int]]:
    """Every frontal face as (x, y, w, h), widened by ``margin`` and clipped to the image, largest first."""
    cv2, cascade = _cascade()
    gray = np.asarray(image.convert("L"))
    scale = 1.0
    if max(gray.shape) > 1600:  # detection cost grows with pixels; faces stay findable
        scale = 1600 / max(gray.shape)
        gray = cv2.resize(gray, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    gray = cv2.equalizeHist(gray)
    found = cascade.detectMultiScale(gray, scaleFactor=1.1, minNeighbors=5, minSize=(min_size, min_size))
    boxes = []
    for x, y, w, h in found if len(found) else []:
        x, y, w, h = (v / scale for v in (x, y, w, h))
        m = margin * max(w, h)
        x0, y0 = max(0, int(x - m)), max(0, int(y - m))
        x1, y1 = min(image.width, int(x + w + m)), min(image.height, int(y + h + m))
        boxes.append((x0, y0, x1 - x0, y1 - y0))
    return sorted(boxes, key=lambda b: -b[2] * b[3])
