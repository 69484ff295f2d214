"""Video in, one row per face per analysed frame out, with track ids and optional smoothing.

    import ensemble
    table = ensemble.load("artifacts/demo").predict_video("clip.mp4", every=5, smooth=1.0)

Frames are decoded with OpenCV (FFmpeg) in one thread and handed through a bounded queue to
the analyser, which detects and classifies them in batches while the next frames decode: a
long video runs in constant memory. The analyser is any callable with the ``Analyser``
signature (RGB frames in, ``FaceResult`` lists out); ``ModelAnalyser`` adapts
:class:`ensemble.api.Model`.

Columns: file, frame, time_s, track, box_x, box_y, box_w, box_h, emotion, p_<class> (8),
valence, arousal, neighborhood; with ``smooth``: emotion_smooth, p_<class>_smooth,
valence_smooth, arousal_smooth beside the raw ones.
"""

from __future__ import annotations

import math
import os
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .classes import CLASSES
from .errors import UserError

# FFmpeg's own messages ("moov atom not found") would be printed beside ours; we say it in one line
os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")
os.environ.setdefault("OPENCV_LOG_LEVEL", "ERROR")  # and OpenCV's ("[ WARN] cap.cpp: open VIDEOIO(FFMPEG) …")

VIDEO_EXTENSIONS = {".mp4", ".avi", ".mov", ".mkv", ".webm"}
PROBA_COLUMNS = [f"p_{c}" for c in CLASSES]
#: The per-face, per-frame table's columns, in order.
COLUMNS = [
    "file",
    "frame",
    "time_s",
    "track",
    *(f"box_{k}" for k in "xywh"),
    "emotion",
    *PROBA_COLUMNS,
    "valence",
    "arousal",
    "neighborhood",
]


class VideoError(Exception):
    """A video that cannot be (fully) read; the message names why."""


@dataclass
class FaceResult:
    """One face in one frame, as an analyser returns it."""

    box: tuple[int, int, int, int]  # x, y, w, h in frame pixels
    proba: np.ndarray  # (8,) probabilities in CLASSES order
    valence: float = math.nan
    arousal: float = math.nan
    neighborhood: int = -1  # -1: the model has none (flat)
    landmarks: np.ndarray | None = None  # (5, 2) frame pixels, or None


#: list of (H, W, 3) uint8 RGB frames -> per frame, the faces found in it
Analyser = Callable[[list[np.ndarray]], list[list[FaceResult]]]


# --------------------------------------------------------------------------- decoding and selection


@dataclass(frozen=True)
class FrameSelection:
    """Which frames to analyse: every ``every``-th, or about ``fps`` per second, between
    ``start`` and ``end`` seconds (frames with start <= frame / source_fps < end)."""

    every: int | None = None
    fps: float | None = None
    start: float | None = None
    end: float | None = None

    def __post_init__(self):
        if self.every is not None and self.fps is not None:
            raise UserError("give --every or --fps, not both")
        if self.every is not None and self.every < 1:
            raise UserError(f"--every must be a whole number >= 1, got {self.every}")
        if self.fps is not None and not self.fps > 0:
            raise UserError(f"--fps must be > 0, got {self.fps}")
        if self.start is not None and not (self.start >= 0 and math.isfinite(self.start)):
            raise UserError(f"--start must be >= 0 seconds, got {self.start}")
        if self.end is not None and not (self.end > (self.start or 0) and math.isfinite(self.end)):
            raise UserError(f"--end must be after --start, got {self.end}")

    def frame_range(self, source_fps: float) -> tuple[int, int | None]:
        """(first frame, stop frame or None for the end of the video)."""
        first = math.ceil((self.start or 0) * source_fps - 1e-6)
        stop = math.ceil(self.end * source_fps - 1e-6) if self.end is not None else None
        return first, stop

    def keep(self, frame: int, first: int, source_fps: float) -> bool:
        """Whether ``frame`` (>= first) is analysed."""
        k = frame - first
        if self.every is not None:
            return k % self.every == 0
        if self.fps is not None and self.fps < source_fps:
            ratio = self.fps / source_fps  # one frame per 1/fps interval, the first in it
            return k == 0 or math.floor(k * ratio + 1e-9) > math.floor((k - 1) * ratio + 1e-9)
        return True


@dataclass
class VideoInfo:
    path: Path
    fps: float
    n_frames: int  # as the container declares it (0 when unknown); decoding is the truth
    width: int
    height: int


def _cv2():
    try:
        import cv2
    except ImportError:
        raise UserError("video needs opencv-python-headless<5 (pip install 'opencv-python-headless<5')") from None
    return cv2


def open_video(path) -> tuple[object, VideoInfo]:
    """An opened ``cv2.VideoCapture`` and what the container says; VideoError if it is no video."""
    cv2 = _cv2()
    path = Path(path)
    if not path.is_file():
        raise VideoError("no such file")
    if path.stat().st_size == 0:
        raise VideoError("empty file")
    image_kind = _image_kind(path)
    if image_kind:  # FFmpeg would read a still image as a one-frame video
        raise VideoError(f"this is a {image_kind} image, not a video")
    cap = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG)
    if not cap.isOpened():
        raise VideoError("not a readable video (OpenCV/FFmpeg cannot open it: damaged, truncated or not a video)")
    fps = float(cap.get(cv2.CAP_PROP_FPS) or 0)
    n = cap.get(cv2.CAP_PROP_FRAME_COUNT)
    n = int(n) if np.isfinite(n) and 0 < n < 1e9 else 0
    info = VideoInfo(
        path,
        fps if np.isfinite(fps) and 0 < fps < 1000 else 0.0,
        n,
        int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)),
        int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT)),
    )
    if info.fps == 0:
        cap.release()
        raise VideoError("the video declares no frame rate")
    return cap, info


def _image_kind(path: Path) -> str | None:
    try:
        with path.open("rb") as f:
            head = f.read(16)
    except OSError as exc:
        raise VideoError(f"cannot read it ({exc.strerror or exc})") from None
    for magic, kind in ((b"\x89PNG", "PNG"), (b"\xff\xd8\xff", "JPEG"), (b"GIF8", "GIF"), (b"BM", "BMP")):
        if head.startswith(magic):
            return kind
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WebP"
    return None


@dataclass
class DecodeEnd:
    """Sent after the last frame: how many frames were decoded, and why decoding stopped."""

    n_decoded: int  # frames read from the start of the range
    last_frame: int  # index of the last frame read (first - 1 when none)
    truncated: str | None = None  # why the video ended before its declared length


def iter_frames(
    cap,
    info: VideoInfo,
    selection: FrameSelection,
    all_frames: bool = False,
    rgb: bool = True,
    stop_event: threading.Event | None = None,
):
    """Yield (frame index, time in seconds, frame) for the selected frames (every frame of the
    range when ``all_frames``), RGB when ``rgb`` else BGR, then one DecodeEnd. Frames that are
    not wanted are skipped with ``grab`` (decoded, never converted or copied). The time is the
    frame's presentation time where the container gives one (right for variable frame rates),
    else index / fps."""
    cv2 = _cv2()
    first, stop = selection.frame_range(info.fps)
    if info.n_frames and first >= info.n_frames:
        raise VideoError(
            f"--start {first / info.fps:.2f} s is at or after the end of the video ({info.n_frames / info.fps:.2f} s)"
        )
    if first > 0:
        cap.set(cv2.CAP_PROP_POS_FRAMES, first)  # FFmpeg seeks to a key frame and decodes up to ``first``
    i = first
    while stop is None or i < stop:
        if stop_event is not None and stop_event.is_set():
            return
        if all_frames or selection.keep(i, first, info.fps):
            ok, frame = cap.read()
            if not ok:
                break
            msec = cap.get(cv2.CAP_PROP_POS_MSEC)
            t = msec / 1000 if np.isfinite(msec) and (msec > 0 or i == 0) else i / info.fps
            yield i, t, cv2.cvtColor(frame, cv2.COLOR_BGR2RGB) if rgb else frame
        elif not cap.grab():
            break
        i += 1
    want = min(info.n_frames, stop) if stop is not None else info.n_frames
    truncated = None
    # the declared count of some containers is an estimate from the duration: allow a little
    if info.n_frames and want - i > max(2, 0.01 * want):
        truncated = f"truncated or damaged: decoding stopped at frame {i} of {want}"
    yield DecodeEnd(i - first, i - 1, truncated)


class _Decoder(threading.Thread):
    """Decodes into a bounded queue (so memory stays flat) while the caller analyses."""

    def __init__(self, cap, info: VideoInfo, selection: FrameSelection, maxsize: int):
        super().__init__(name=f"decode {info.path.name}", daemon=True)
        self.cap, self.info, self.selection = cap, info, selection
        self.queue: queue.Queue = queue.Queue(maxsize=maxsize)
        self.stop_event = threading.Event()

    def _put(self, item) -> bool:
        while not self.stop_event.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def run(self) -> None:
        try:
            for item in iter_frames(self.cap, self.info, self.selection, stop_event=self.stop_event):
                if not self._put(item):
                    return
        except Exception as exc:  # handed to the caller, which raises it
            self._put(exc)

    def close(self) -> None:
        self.stop_event.set()
        self.join()


@dataclass
class VideoResult:
    table: "object"  # pandas DataFrame, one row per face per analysed frame
    info: VideoInfo
    n_analysed: int
    n_decoded: int
    truncated: str | None
    seconds: float


def analyse_video(
    path,
    analyser: Analyser,
    selection: FrameSelection | None = None,
    batch_size: int = 16,
    tracker=None,
    progress: bool | None = None,
) -> VideoResult:
    """Decode, analyse in batches, track. VideoError when the file is no readable video."""
    import pandas as pd
    from tqdm import tqdm

    from .tracking import IoUTracker

    selection = selection or FrameSelection()
    tracker = tracker or IoUTracker()
    cap, info = open_video(path)
    first, stop = selection.frame_range(info.fps)
    total = (min(stop, info.n_frames) if stop is not None else info.n_frames) - first if info.n_frames else None
    decoder = _Decoder(cap, info, selection, maxsize=batch_size)
    bar = tqdm(
        total=total,
        unit="frame",
        desc=Path(path).name,
        disable=None if progress is None else not progress,
        leave=False,
        dynamic_ncols=True,
    )
    rows: list[tuple] = []
    frames: list[np.ndarray] = []
    indices: list[tuple[int, float]] = []  # (frame, seconds)
    n_analysed, last, end = 0, first - 1, None
    t0 = time.perf_counter()
    name = str(path)

    def flush():
        nonlocal n_analysed
        if not frames:
            return
        results = analyser(frames)
        if len(results) != len(frames):
            raise RuntimeError(f"the analyser returned {len(results)} results for {len(frames)} frames")
        for (i, t), faces in zip(indices, results):
            ids = tracker.update(t, [f.box for f in faces], [f.landmarks for f in faces])
            for track, f in sorted(zip(ids, faces), key=lambda z: z[0]):  # rows of a frame by track
                p = np.asarray(f.proba, np.float64)
                rows.append(
                    (
                        name,
                        i,
                        round(t, 4),
                        track,
                        *(int(v) for v in f.box),
                        CLASSES[int(p.argmax())],
                        *p.tolist(),
                        float(f.valence),
                        float(f.arousal),
                        int(f.neighborhood),
                    )
                )
        n_analysed += len(frames)
        frames.clear()
        indices.clear()

    decoder.start()
    try:
        while True:
            item = decoder.queue.get()
            if isinstance(item, BaseException):
                raise item
            if isinstance(item, DecodeEnd):
                end = item
                break
            i, t, frame = item
            frames.append(frame)
            indices.append((i, t))
            bar.update(i - last)
            last = i
            if len(frames) >= batch_size:
                flush()
        flush()
        bar.update(max(0, end.last_frame - last))
    finally:
        decoder.close()
        cap.release()
        bar.close()
    table = pd.DataFrame(rows, columns=COLUMNS)
    if end.n_decoded == 0:
        raise VideoError("no frame could be decoded (damaged, or not a video)")
    return VideoResult(table, info, n_analysed, end.n_decoded, end.truncated, time.perf_counter() - t0)


def add_smoothing(table, seconds: float, method: str = "centred"):
    """``table`` with emotion_smooth, p_<class>_smooth, valence_smooth, arousal_smooth added,
    each track smoothed over time on its own (see ``tracking.smooth``)."""
    from .tracking import SMOOTHING, smooth

    if method not in SMOOTHING:
        raise UserError(f"--smooth-method must be one of {', '.join(SMOOTHING)}, got {method!r}")
    if not seconds > 0:
        raise UserError(f"--smooth must be > 0 seconds, got {seconds}")
    cols = PROBA_COLUMNS + ["valence", "arousal"]
    out = table.copy()
    smoothed = np.full((len(table), len(cols)), np.nan)
    if len(table):
        for _, g in table.groupby(["file", "track"], sort=False):
            g = g.sort_values("frame")
            pos = table.index.get_indexer(g.index)
            smoothed[pos] = smooth(g["time_s"].to_numpy(), g[cols].to_numpy(np.float64), seconds, method)
    for k, c in enumerate(cols):
        out[f"{c}_smooth"] = smoothed[:, k]
    p = smoothed[:, : len(PROBA_COLUMNS)]
    out["emotion_smooth"] = [CLASSES[int(r.argmax())] for r in p] if len(p) else []
    return out


def predict_video(
    path,
    model,
    *,
    every: int | None = None,
    fps: float | None = None,
    start: float | None = None,
    end: float | None = None,
    smooth: float | None = None,
    smooth_method: str = "centred",
    batch_size: int = 16,
    progress: bool | None = None,
    detector: str | None = None,
):
    """One row per face per analysed frame of the video at ``path`` (pandas DataFrame; columns
    in the module docstring). ``model``: an :class:`ensemble.api.Model` (``detector``: one of
    its detectors, default its own) or any ``Analyser``. ``table.attrs``
    holds the video's fps, size, frame counts and, if it ended early, why. Usually called as
    ``ensemble.load().predict_video(path)``."""
    import warnings

    analyser = ModelAnalyser(model, detector, batch_size) if hasattr(model, "predict_many") else model
    if isinstance(model, (str, Path)) or not callable(analyser):
        raise UserError(
            "predict_video needs a model (ensemble.load(run)) or an analyser; use ensemble.load(run).predict_video(path)"
        )
    try:
        res = analyse_video(path, analyser, FrameSelection(every, fps, start, end), batch_size, progress=progress)
    except VideoError as exc:
        raise UserError(f"{path}: {exc}") from None
    table = add_smoothing(res.table, smooth, smooth_method) if smooth else res.table
    if res.truncated:
        warnings.warn(f"{path}: {res.truncated}; the frames before it are in the table", stacklevel=2)
    table.attrs.update(
        fps=res.info.fps,
        width=res.info.width,
        height=res.info.height,
        n_decoded=res.n_decoded,
        n_analysed=res.n_analysed,
        truncated=res.truncated,
    )
    return table


# --------------------------------------------------------------------------- a model as an analyser


class ModelAnalyser:
    """Adapter from :class:`ensemble.api.Model` (its detector, alignment, crop, networks and
    calibration, exactly as for photos) to the ``Analyser`` interface: a batch of frames goes
    through ``Model.predict_many``. ``detector``: the model's own unless given ("none": each
    frame is one face crop).

    This is the only place the video code meets a model: any object that turns a list of RGB
    frames into ``FaceResult`` lists can take its place (a detector with landmarks, MTCNN by
    default, fills ``landmarks``, and the tracker then matches on them too)."""

    def __init__(self, model, detector: str | None = None, batch_size: int = 32):
        self.model, self.detector, self.batch_size = model, detector, batch_size

    def __call__(self, frames: Sequence[np.ndarray]) -> list[list[FaceResult]]:
        from PIL import Image

        images = [Image.fromarray(f) for f in frames]
        out: list[list[FaceResult]] = []
        for im, (_, records, err) in zip(
            images, self.model.predict_many(images, detector=self.detector, batch_size=self.batch_size)
        ):
            if err is not None:
                raise VideoError(err)
            out.append([face_result(r, im.size) for r in records])
        if len(out) != len(frames):
            raise RuntimeError(f"the model returned {len(out)} results for {len(frames)} frames")
        return out


def face_result(record: dict, size: tuple[int, int]) -> FaceResult:
    """A ``FaceResult`` from one record of ``ensemble.api.Model`` (``box`` None: the whole frame)."""
    box = record["box"] or (0, 0, *size)
    return FaceResult(
        tuple(int(v) for v in box),
        np.array([record["probabilities"][c] for c in CLASSES], np.float64),
        float(record.get("valence", math.nan)),
        float(record.get("arousal", math.nan)),
        int(record.get("neighborhood", -1)),
        np.array(record["landmarks"], np.float64) if record.get("landmarks") else None,
    )
