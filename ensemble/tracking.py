"""Face tracks across video frames, and temporal smoothing along a track.

``IoUTracker`` gives the same person the same id from frame to frame: each live track
predicts where its box will be (constant velocity), detections are matched to tracks by
box overlap with that prediction (and, where the detector gives landmarks, by how close the
landmarks are), one to one (Hungarian assignment); a track survives ``max_gap_s`` seconds
without a detection, so a face hidden for a few frames comes back under its old id.
The motion prediction is what keeps two faces that cross paths from swapping ids.

``smooth`` averages a track's values over time: ``centred`` (mean over a window of
``seconds`` centred on each frame) or ``ema`` (exponential, time constant ``seconds``,
with the weight of each step set by the time since the previous one, so frame gaps and
``--every`` do not change what a second means).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

SMOOTHING = ("centred", "ema")


def iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Intersection over union of boxes (x, y, w, h): ``a`` (n, 4), ``b`` (m, 4) -> (n, m)."""
    a = np.asarray(a, np.float64).reshape(-1, 4)
    b = np.asarray(b, np.float64).reshape(-1, 4)
    ax0, ay0, ax1, ay1 = a[:, 0:1], a[:, 1:2], a[:, 0:1] + a[:, 2:3], a[:, 1:2] + a[:, 3:4]
    bx0, by0, bx1, by1 = b[:, 0], b[:, 1], b[:, 0] + b[:, 2], b[:, 1] + b[:, 3]
    iw = np.clip(np.minimum(ax1, bx1) - np.maximum(ax0, bx0), 0, None)
    ih = np.clip(np.minimum(ay1, by1) - np.maximum(ay0, by0), 0, None)
    inter = iw * ih
    union = a[:, 2:3] * a[:, 3:4] + b[:, 2] * b[:, 3] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


@dataclass
class Track:
    id: int
    box: np.ndarray  # (4,) x, y, w, h at ``time``
    time: float  # seconds of the last detection
    velocity: np.ndarray = field(default_factory=lambda: np.zeros(4))  # box units per second
    landmarks: np.ndarray | None = None  # (5, 2) at ``time``
    hits: int = 1

    def predicted(self, time: float) -> np.ndarray:
        return self.box + self.velocity * (time - self.time)


class IoUTracker:
    """Assign track ids to the faces of successive frames.

    min_iou:         a detection continues a track only if it overlaps the track's predicted
                     box at least this much.
    max_gap_s:       a track not seen for longer than this (seconds) ends; a face seen again
                     later gets a new id.
    landmark_weight: weight of the mean landmark distance (in units of the box diagonal) in the
                     matching cost, when both the track and the detection have landmarks.
    """

    def __init__(
        self, min_iou: float = 0.2, max_gap_s: float = 1.0, landmark_weight: float = 1.0, velocity_momentum: float = 0.5
    ):
        self.min_iou, self.max_gap_s = min_iou, max_gap_s
        self.landmark_weight, self.velocity_momentum = landmark_weight, velocity_momentum
        self.tracks_: list[Track] = []
        self.n_tracks_ = 0

    def update(self, time: float, boxes, landmarks=None) -> list[int]:
        """Faces of the frame at ``time`` seconds -> their track ids, in the order given."""
        from scipy.optimize import linear_sum_assignment

        boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
        landmarks = list(landmarks) if landmarks is not None else [None] * len(boxes)
        self.tracks_ = [t for t in self.tracks_ if time - t.time <= self.max_gap_s + 1e-9]
        ids = [0] * len(boxes)
        matched_det: set[int] = set()
        if self.tracks_ and len(boxes):
            pred = np.stack([t.predicted(time) for t in self.tracks_])
            overlap = iou(pred, boxes)  # (tracks, detections)
            cost = 1.0 - overlap
            for i, t in enumerate(self.tracks_):
                for j, lm in enumerate(landmarks):
                    if t.landmarks is not None and lm is not None:
                        moved = np.asarray(t.landmarks) + t.velocity[:2] * (time - t.time)
                        diag = float(np.hypot(boxes[j, 2], boxes[j, 3])) or 1.0
                        cost[i, j] += self.landmark_weight * float(np.linalg.norm(moved - lm, axis=1).mean()) / diag
            big = 1e6
            rows, cols = linear_sum_assignment(np.where(overlap >= self.min_iou, cost, big))
            for i, j in zip(rows, cols):
                if overlap[i, j] < self.min_iou:
                    continue
                t = self.tracks_[i]
                dt = time - t.time
                if dt > 0:
                    v = (boxes[j] - t.box) / dt
                    t.velocity = (
                        v if t.hits == 1 else self.velocity_momentum * t.velocity + (1 - self.velocity_momentum) * v
                    )
                t.box, t.time, t.landmarks, t.hits = boxes[j].copy(), time, landmarks[j], t.hits + 1
                ids[j] = t.id
                matched_det.add(j)
        for j in range(len(boxes)):
            if j not in matched_det:
                self.n_tracks_ += 1
                self.tracks_.append(Track(self.n_tracks_, boxes[j].copy(), time, landmarks=landmarks[j]))
                ids[j] = self.n_tracks_
        return ids


def smooth(times, values, seconds: float, method: str = "centred") -> np.ndarray:
    """Smooth ``values`` (n,) or (n, d) sampled at increasing ``times`` (seconds) along one track.

    centred: y_i = mean of x_j with |t_j - t_i| <= seconds / 2.
    ema:     y_0 = x_0; y_i = y_(i-1) + a_i (x_i - y_(i-1)), a_i = 1 - exp(-(t_i - t_(i-1)) / seconds).
    """
    if method not in SMOOTHING:
        raise ValueError(f"smoothing must be one of {', '.join(SMOOTHING)}, got {method!r}")
    t = np.asarray(times, np.float64)
    x = np.asarray(values, np.float64)
    if len(t) == 0 or seconds <= 0:
        return x.copy()
    if method == "centred":
        half = seconds / 2 + 1e-9
        lo = np.searchsorted(t, t - half, side="left")
        hi = np.searchsorted(t, t + half, side="right")
        csum = np.concatenate([np.zeros((1,) + x.shape[1:]), np.cumsum(x, axis=0)])
        counts = (hi - lo).reshape((-1,) + (1,) * (x.ndim - 1))
        return (csum[hi] - csum[lo]) / counts
    y = np.empty_like(x)
    y[0] = x[0]
    alpha = 1.0 - np.exp(-np.diff(t) / seconds)
    for i in range(1, len(x)):
        y[i] = y[i - 1] + alpha[i - 1] * (x[i] - y[i - 1])
    return y
