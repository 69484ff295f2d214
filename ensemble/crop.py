"""The face crop a model was trained on, recorded in its ``meta.json``, and reproduced at prediction.

Training crops come from the data set: AffectNet's annotated face box (``box_source =
"annotation"``), or the whole image where the data set holds face crops (FER+, folders,
CSVs without boxes: ``box_source = "image"``). ``predict`` finds faces with a detector and
must hand the model a crop framed like those. The contract between any detector and the
model is :func:`crop_box`: the detector returns the face's box as it sees it (no margin),
and the model's recorded ``margin`` widens it — a fraction of the box's longer side added
on every side, clipped to the image.

For annotated boxes the margin is 0 (the detector's box stands for the annotation's box).
For whole-image face crops :data:`FACE_CROP_MARGIN` is recorded (the margin ``predict`` used
before runs recorded their crop), but ``predict`` frames those with the detector's own measured
margin instead, the one that reproduces FER+'s training crops: the rule for both cases is
:func:`ensemble.detect.run_crop`.
"""

from __future__ import annotations

import math

FACE_CROP_MARGIN = 0.2
BOX_SOURCES = ("annotation", "image")


def training_crop(boxes) -> dict:
    """``{"box_source", "margin"}`` for the training faces' boxes ((x, y, w, h) or None each):
    "annotation" when most faces had a box, else "image"."""
    boxes = list(boxes)
    n_boxed = sum(b is not None for b in boxes)
    if boxes and n_boxed * 2 >= len(boxes):
        return {"box_source": "annotation", "margin": 0.0}
    return {"box_source": "image", "margin": FACE_CROP_MARGIN}


def crop_box(box, image_size: tuple[int, int], margin: float) -> tuple[int, int, int, int]:
    """The detector's ``box`` (x, y, w, h) widened by ``margin`` x its longer side on every side,
    clipped to ``image_size`` (width, height); integer pixels, at least 1 x 1."""
    x, y, w, h = (float(v) for v in box)
    width, height = image_size
    m = margin * max(w, h)
    x0, y0 = max(0, math.floor(x - m)), max(0, math.floor(y - m))
    x1, y1 = min(width, math.ceil(x + w + m)), min(height, math.ceil(y + h + m))
    return x0, y0, max(1, x1 - x0), max(1, y1 - y0)
