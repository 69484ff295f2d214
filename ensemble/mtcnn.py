"""MTCNN face detection (Zhang et al., IEEE SPL 2016): a box, a score and five landmarks per face.

The three cascaded networks (P-Net proposes on an image pyramid, R-Net refines 24-px crops, O-Net
scores 48-px crops and places the landmarks) are defined here and take their trained weights from
the ``facenet-pytorch`` wheel (``facenet_pytorch/data/{p,r,o}net.pt``, MIT, 2 MB), read as plain
state dicts without importing that package, whose import pulls in torchvision (over a second of
a cold ``predict``). Images are RGB uint8 arrays; the cascade's box arithmetic is in numpy, its
resampling torch's area interpolation, as in facenet-pytorch's cascade, whose detections this one
reproduces (the project's crop margins and detector figures were measured on them).

Several photos can be detected in one call (:meth:`MTCNN.detect_many`): the pyramid runs per
photo, R-Net and O-Net once over the candidates of all of them.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .errors import UserError

THRESHOLDS = (0.6, 0.7, 0.7)  # P-, R-, O-Net score thresholds (the paper's)
FACTOR = 0.709  # pyramid step: each level has half the pixels of the last


def _conv(cin: int, cout: int, k: int) -> tuple[nn.Conv2d, nn.PReLU]:
    return nn.Conv2d(cin, cout, kernel_size=k), nn.PReLU(cout)


class PNet(nn.Module):
    """Fully convolutional proposal net: a 12-px window every 2 px -> face score, box offsets."""

    def __init__(self):
        super().__init__()
        self.conv1, self.prelu1 = _conv(3, 10, 3)
        self.pool1 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv2, self.prelu2 = _conv(10, 16, 3)
        self.conv3, self.prelu3 = _conv(16, 32, 3)
        self.conv4_1 = nn.Conv2d(32, 2, kernel_size=1)
        self.conv4_2 = nn.Conv2d(32, 4, kernel_size=1)

    def forward(self, x):  # (n, 3, H, W) -> face probability (n, H', W'), offsets (n, 4, H', W')
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.prelu3(self.conv3(self.prelu2(self.conv2(x))))
        return torch.softmax(self.conv4_1(x), 1)[:, 1], self.conv4_2(x)


class RNet(nn.Module):
    """24-px crops -> face probability, box offsets."""

    def __init__(self):
        super().__init__()
        self.conv1, self.prelu1 = _conv(3, 28, 3)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2, self.prelu2 = _conv(28, 48, 3)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3, self.prelu3 = _conv(48, 64, 2)
        self.dense4, self.prelu4 = nn.Linear(576, 128), nn.PReLU(128)
        self.dense5_1 = nn.Linear(128, 2)
        self.dense5_2 = nn.Linear(128, 4)

    def forward(self, x):
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.prelu3(self.conv3(x))
        # the weights were converted from a channels-last framework: flatten as (W, H, C)
        x = self.prelu4(self.dense4(x.permute(0, 3, 2, 1).reshape(len(x), -1)))
        return torch.softmax(self.dense5_1(x), 1)[:, 1], self.dense5_2(x)


class ONet(nn.Module):
    """48-px crops -> face probability, box offsets, five landmarks (x1..x5, y1..y5 in the crop)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.prelu1 = _conv(3, 32, 3)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2, self.prelu2 = _conv(32, 64, 3)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3, self.prelu3 = _conv(64, 64, 3)
        self.pool3 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv4, self.prelu4 = _conv(64, 128, 2)
        self.dense5, self.prelu5 = nn.Linear(1152, 256), nn.PReLU(256)
        self.dense6_1 = nn.Linear(256, 2)
        self.dense6_2 = nn.Linear(256, 4)
        self.dense6_3 = nn.Linear(256, 10)

    def forward(self, x):
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.pool3(self.prelu3(self.conv3(x)))
        x = self.prelu4(self.conv4(x))
        x = self.prelu5(self.dense5(x.permute(0, 3, 2, 1).reshape(len(x), -1)))
        return torch.softmax(self.dense6_1(x), 1)[:, 1], self.dense6_2(x), self.dense6_3(x)


def weights_dir() -> Path:
    """Where facenet-pytorch's wheel keeps the three networks' weights (its package is not imported)."""
    spec = importlib.util.find_spec("facenet_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            "the mtcnn detector takes its weights from facenet-pytorch "
            "(pip install facenet-pytorch==2.5.3 --no-deps), or pass --detector haar"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "data"
    if not all((path / f"{n}.pt").is_file() for n in ("pnet", "rnet", "onet")):
        raise UserError(f"MTCNN weights missing in {path}; reinstall facenet-pytorch==2.5.3 --no-deps")
    return path


def nms(boxes: np.ndarray, scores: np.ndarray, threshold: float, by_min: bool = False) -> np.ndarray:
    """Greedy non-maximum suppression: indices kept, best first. Overlap is intersection over
    union of continuous boxes, or over the smaller box in whole pixels (``by_min``: the last
    step, so a box inside a face's box goes), as the cascade was tuned."""
    order = np.argsort(-scores, kind="stable")
    x0, y0, x1, y1 = boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3]
    plus = 1 if by_min else 0
    area = (x1 - x0 + plus) * (y1 - y0 + plus)
    keep = []
    while order.size:
        i, rest = order[0], order[1:]
        keep.append(i)
        w = np.maximum(0.0, np.minimum(x1[i], x1[rest]) - np.maximum(x0[i], x0[rest]) + plus)
        h = np.maximum(0.0, np.minimum(y1[i], y1[rest]) - np.maximum(y0[i], y0[rest]) + plus)
        inter = w * h
        denom = np.minimum(area[i], area[rest]) if by_min else area[i] + area[rest] - inter
        order = rest[inter / denom <= threshold]
    return np.asarray(keep, dtype=np.int64)


def _nms_per_image(boxes, scores, owner, threshold, by_min=False) -> np.ndarray:
    keep = [
        np.flatnonzero(owner == o)[nms(boxes[owner == o], scores[owner == o], threshold, by_min)]
        for o in np.unique(owner)
    ]
    return np.sort(np.concatenate(keep)) if keep else np.zeros(0, np.int64)


def _square(boxes: np.ndarray) -> np.ndarray:
    """Each box widened to the square of its longer side, same centre."""
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    side = np.maximum(w, h)
    x0 = boxes[:, 0] + (w - side) / 2
    y0 = boxes[:, 1] + (h - side) / 2
    return np.stack([x0, y0, x0 + side, y0 + side], 1)


def _regress(boxes: np.ndarray, offsets: np.ndarray, plus: int = 1) -> np.ndarray:
    """Move each box's corners by the net's offsets, in units of the box's side (+ ``plus`` px:
    the P-Net stage was trained without it, R- and O-Net with it)."""
    w = boxes[:, 2] - boxes[:, 0] + plus
    h = boxes[:, 3] - boxes[:, 1] + plus
    return boxes + offsets * np.stack([w, h, w, h], 1)


def _as_tensor(x: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> (1, 3, H, W) float32 0..255, contiguous channel planes: the pyramid's
    area resampling and the crops' slices run faster on them than on a channels-last view (the
    nets' weights are channels last and take their input so; the detections are identical)."""
    return torch.from_numpy(np.asarray(x, np.uint8)[:, :, :3].transpose(2, 0, 1).astype(np.float32))[None]


def _normalise(x: torch.Tensor) -> torch.Tensor:
    """Pixels to the nets' input range [-1, 1] (after resampling, as they were trained)."""
    return (x - 127.5) * 0.0078125


def _crops(images: list[torch.Tensor], boxes: np.ndarray, owner: np.ndarray, size: int) -> torch.Tensor:
    """(n, 3, size, size), normalised: each box's part of its image, resized to ``size`` by area.

    Boxes count pixels from 1 (the cascade's MATLAB origins): box x0..x1 covers columns x0-1..x1-1.
    A box past the image's edge is clipped to it and its inside stretched to the square, as in
    facenet-pytorch's cascade, whose detections the project's crop margins were measured on.
    Area resizing is adaptive average pooling, called directly (``F.interpolate``'s
    Python around it was a fifth of this loop's time)."""
    out = torch.zeros(len(boxes), 3, size, size)
    for k, (b, o) in enumerate(zip(boxes.astype(np.int64).tolist(), owner.tolist())):
        img = images[o]
        h, w = img.shape[-2:]
        x0, y0, x1, y1 = max(b[0], 1) - 1, max(b[1], 1) - 1, min(b[2], w), min(b[3], h)
        if x1 > x0 and y1 > y0:
            out[k] = F.adaptive_avg_pool2d(img[0, :, y0:y1, x0:x1], size)
    return _normalise(out).contiguous(memory_format=torch.channels_last)


class MTCNN:
    """The cascade with trained weights; ``detect``/``detect_many`` take RGB uint8 arrays.

    ``min_face``: the smallest face side found, in pixels (sets the pyramid's first level).
    Thread-safe: inference only, no state changes after construction.
    """

    def __init__(self, min_face: int = 20, thresholds=THRESHOLDS, factor: float = FACTOR, weights: Path | None = None):
        path = Path(weights) if weights else weights_dir()
        self.pnet, self.rnet, self.onet = PNet(), RNet(), ONet()
        for net, name in ((self.pnet, "pnet"), (self.rnet, "rnet"), (self.onet, "onet")):
            net.load_state_dict(torch.load(path / f"{name}.pt", map_location="cpu", weights_only=True))
            net.eval().requires_grad_(False).to(memory_format=torch.channels_last)
        self.min_face, self.thresholds, self.factor = int(min_face), tuple(thresholds), float(factor)

    def scales(self, h: int, w: int) -> list[float]:
        """Pyramid levels: the smallest face maps to P-Net's 12-px window, then down by ``factor``
        while the image's short side still holds one window."""
        s, out = 12.0 / self.min_face, []
        while min(h, w) * s >= 12:
            out.append(s)
            s *= self.factor
        return out

    def _propose(self, img: torch.Tensor) -> np.ndarray:
        """P-Net over the pyramid: (n, 9) = box x0 y0 x1 y1, score, offsets, after NMS."""
        h, w = img.shape[-2:]
        found = []
        for s in self.scales(h, w):
            level = F.interpolate(img, size=(int(h * s + 1), int(w * s + 1)), mode="area")
            prob, reg = self.pnet(_normalise(level))
            prob, reg = prob[0].numpy(), reg[0].numpy()
            ys, xs = np.nonzero(prob >= self.thresholds[0])
            if not len(ys):
                continue
            # window (x, y) of the map covers pixels [2x, 2x + 12) of the level; in float32, as
            # tuned (a float64 floor moves a few boxes by a pixel, and NMS then keeps others)
            fx, fy, f = xs.astype(np.float32), ys.astype(np.float32), np.float32(s)
            x0, y0 = np.floor((2 * fx + 1) / f), np.floor((2 * fy + 1) / f)
            x1, y1 = np.floor((2 * fx + 12) / f), np.floor((2 * fy + 12) / f)
            cand = np.column_stack([x0, y0, x1, y1, prob[ys, xs], reg[:, ys, xs].T])
            found.append(cand[nms(cand[:, :4], cand[:, 4], 0.5)])
        if not found:
            return np.zeros((0, 9))
        cand = np.concatenate(found)
        return cand[nms(cand[:, :4], cand[:, 4], 0.7)]

    @torch.inference_mode()
    def detect_many(self, images: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Per image: boxes (n, 4) x0 y0 x1 y1, scores (n,), landmarks (n, 5, 2) (left eye, right
        eye, nose, mouth corners as seen), in the image's pixels, best score first."""
        if not len(images):
            return []
        images = [_as_tensor(im) for im in images]
        props = [self._propose(im) for im in images]
        owner = np.concatenate([np.full(len(p), i) for i, p in enumerate(props)]).astype(np.int64)
        cand = np.concatenate(props)
        boxes = _square(_regress(cand[:, :4], cand[:, 5:9], plus=0))
        if len(boxes):  # R-Net refines
            score, reg = (t.numpy() for t in self.rnet(_crops(images, boxes, owner, 24)))
            ok = score > self.thresholds[1]
            boxes, owner, score, reg = boxes[ok], owner[ok], score[ok], reg[ok]
            keep = _nms_per_image(boxes, score, owner, 0.7)
            boxes = _square(_regress(boxes[keep], reg[keep]))
            owner = owner[keep]
        points = np.zeros((0, 5, 2))
        score = np.zeros(0)
        if len(boxes):  # O-Net scores and places the landmarks
            score, reg, lm = (t.numpy() for t in self.onet(_crops(images, boxes, owner, 48)))
            ok = score > self.thresholds[2]
            boxes, owner, score, reg, lm = boxes[ok], owner[ok], score[ok], reg[ok], lm[ok]
            side = (boxes[:, 2:4] - boxes[:, 0:2] + 1)[:, None, :]
            points = np.stack([lm[:, :5], lm[:, 5:]], 2) * side + boxes[:, None, 0:2] - 1
            boxes = _regress(boxes, reg)
            keep = _nms_per_image(boxes, score, owner, 0.7, by_min=True)
            boxes, owner, score, points = boxes[keep], owner[keep], score[keep], points[keep]
        out = []
        for i in range(len(images)):
            mine = np.flatnonzero(owner == i)
            mine = mine[np.argsort(-score[mine], kind="stable")]
            out.append(
                (boxes[mine].astype(np.float32), score[mine].astype(np.float32), points[mine].astype(np.float32))
            )
        return out

    def detect(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self.detect_many([image])[0]
