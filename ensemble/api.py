"""The Python API for whole photos; the CLI's ``predict`` uses it too, so the two cannot drift.

    import ensemble
    model = ensemble.load()                      # the bundled model, or ensemble.load("artifacts/run")
    faces = model.predict("photo.jpg")           # one dict per face
    table = model.predict_folder("photos/")      # pandas DataFrame, one row per face
    frames = model.predict_video("clip.mp4")     # pandas DataFrame, one row per face per frame, tracked
    model.annotate("photo.jpg").save("out.jpg")  # boxes, labels, a small valence/arousal marker

A record: ``file``, ``face`` (index in the image), ``box`` (x, y, w, h), ``landmarks`` (5 x 2 or
None), ``emotion`` (``"uncertain"`` when the top probability is below ``min_confidence``),
``top_emotion``, ``confidence``, ``uncertain``, ``probabilities`` (8 classes, temperature-scaled
when the run is calibrated), and for the hierarchy ``valence``, ``arousal``, ``neighborhood``.
"""

from __future__ import annotations

import math
import os
import warnings
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from functools import partial
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from . import detect as detection
from .classes import CLASSES
from .detect import DEFAULT_DETECTOR, align_crop, check_detector, face_region, run_crop
from .errors import UserError
from .images import IMAGE_EXTENSIONS, ImageError, face_array, open_image
from .paths import not_regular, shown

GRAYSCALE_FORMATS = ("ferplus",)  # data sets of grayscale faces: colour photos are shown to the model in gray


def _one_image(image):
    """One image for :meth:`Model.predict` / :meth:`Model.annotate`: a path, a PIL image, a
    (H, W[, C]) uint8 array (as a PIL image) or an encoded image's bytes (as a file object);
    anything else, a batch of arrays included, is a one-line error."""
    import io

    from PIL import Image

    from .images import as_image_list

    if isinstance(image, np.ndarray):
        if image.ndim not in (2, 3):
            raise UserError(
                f"predict takes one image, an (H, W) or (H, W, C) array; got shape {image.shape} "
                f"(for several images use predict_many, which takes a list)"
            )
        return as_image_list(image)[0]
    if isinstance(image, (bytes, bytearray, memoryview)):
        return io.BytesIO(bytes(image))
    if isinstance(image, (str, Path, Image.Image)) or hasattr(image, "read"):
        return image
    raise UserError(
        f"an image is a path, a PIL image, a uint8 array or encoded bytes; got {type(image).__name__} "
        f"(for several images use predict_many)"
    )


def _name(image) -> str:
    return shown(image) if isinstance(image, (str, Path)) else "image"


def load(
    run=None,
    *,
    flat: bool = False,
    router: str | None = None,
    detector: str = DEFAULT_DETECTOR,
    min_confidence: float = 0.0,
    device: str = "cpu",
    precision: str = "auto",
    backend: str = "auto",
    log=None,
) -> Model:
    """A ready model: the bundled default when ``run`` is None, else the run folder ``run``.
    ``device``: cpu (default), cuda, cuda:N, mps, or auto (the first of those this machine has).
    ``precision``: auto (the default: int8 where it can run, else fp32), fp32, bf16/fp16 autocast
    for the networks (faster where the hardware has those units), or int8 (the trunk in 8-bit
    integers on ONNX Runtime, CPU only, where the run's ``onnx`` stage has an int8 graph, as the
    bundled model does: the networks about twice as fast as fp32 on a CPU, the same label on 99 %
    of faces; the model card gives both precisions' figures). ``auto`` takes int8 for the
    hierarchy under the run's own router on ``device="cpu"`` with an up-to-date int8 graph, and
    fp32 for everything else (the flat model, a GPU, ``backend="torch"``, a run without one).
    ``backend``: auto (ONNX Runtime, without torch, where the run has an ``onnx`` stage, as the
    bundled model does, and the hierarchy runs in fp32 or int8 on the CPU; else torch), torch or onnx."""
    from .bundle import resolve_run

    return Model(
        resolve_run(run, log),
        flat=flat,
        router=router,
        detector=detector,
        min_confidence=min_confidence,
        device=device,
        precision=precision,
        backend=backend,
    )


def _check_confidence(p) -> float:
    if not isinstance(p, (int, float)) or isinstance(p, bool) or not 0.0 <= float(p) <= 1.0:
        raise UserError(f"min_confidence must be a probability between 0 and 1, got {p!r}")
    return float(p)


def faces_and_crops(im, detector: str, size: int, crop: dict, grayscale: bool) -> tuple[list, np.ndarray]:
    """Detected faces of a PIL image and their aligned crops (n, size, size, 3) uint8, framed like
    the run's training faces (``crop``: detector -> (box source, margin)), gray where it learned gray."""
    from .detect import Face

    if detector == "none":
        faces, crops = [Face((0, 0, im.width, im.height), None, 1.0, "none")], [face_array(im, None, size)]
    else:
        faces = detection.detect(im, detector)
        for f in faces:  # the region the model sees, framed like its training faces (detect.run_crop)
            f.region = face_region(f.box, im.size, *crop[detector])
        crops = [align_crop(im, f.region, f.landmarks, 0.0, size) for f in faces]
    arr = np.stack(crops) if crops else np.zeros((0, size, size, 3), np.uint8)
    if grayscale and len(arr):
        gray = (arr @ np.array([0.299, 0.587, 0.114])).round().clip(0, 255).astype(np.uint8)
        arr = np.repeat(gray[..., None], 3, axis=3)
    return faces, arr


def _prepare(src, detector: str, size: int, crop: dict, grayscale: bool):
    """(source, faces, crops, error) for one image: read, detect, align; a failure is the error."""
    if isinstance(src, (str, Path)) and (why := not_regular(src)):
        return src, [], None, why  # a FIFO or a device is named, never opened
    try:
        im = open_image(src)
    except ImageError as exc:
        return src, [], None, str(exc)
    try:
        return src, *faces_and_crops(im, detector, size, crop, grayscale), None
    except UserError:
        raise  # no detector at all: one line for the whole command
    except Exception as exc:  # noqa: BLE001 - a detector failing on one image must not stop the others
        last = (str(exc).strip().splitlines() or [""])[-1][:120]
        return src, [], None, f"face detection failed ({type(exc).__name__}: {last})"


# --processes auto: worker processes where they were measured to pay (benchmarks/batch.py): on 16
# cores 8 processes read 112 photos/s against 64 with 4 threads; on 2 cores 2 processes read 35
# against 47 (MTCNN). Each starts a Python and its detector (MTCNN: torch, a second or two), so only for
# folders of hundreds.
AUTO_MIN_CORES = 8
AUTO_MIN_IMAGES = 256
AUTO_MAX_PROCESSES = 8


def usable_cores(cpu_max="/sys/fs/cgroup/cpu.max") -> int:
    """The cores this process may run on: its CPU affinity, and a container's CPU quota
    (cgroup v2 ``cpu.max``, e.g. ``docker --cpus=2`` on a larger host) where one is set."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cores = os.cpu_count() or 1
    try:
        quota, period = Path(cpu_max).read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):  # no cgroup v2, or no quota
        pass
    return cores


def auto_processes(n_images: int, cores: int | None = None) -> int:
    """How many detection processes ``processes="auto"`` starts for ``n_images``: 0 (threads)
    below :data:`AUTO_MIN_CORES` cores or :data:`AUTO_MIN_IMAGES` images, else one per core
    but one, at most :data:`AUTO_MAX_PROCESSES`."""
    cores = usable_cores() if cores is None else cores
    if cores < AUTO_MIN_CORES or n_images < AUTO_MIN_IMAGES:
        return 0
    return min(cores - 1, AUTO_MAX_PROCESSES)


def check_processes(processes) -> int | str:
    if isinstance(processes, str) and processes.strip().lower() == "auto":
        return "auto"
    if isinstance(processes, str) and processes.strip().isascii() and processes.strip().isdigit():
        processes = int(processes)
    if isinstance(processes, bool) or not isinstance(processes, int) or processes < 0:
        raise UserError(f"processes must be 0 (threads), a number of worker processes or 'auto', got {processes!r}")
    return processes


class _Inline:
    """The executor interface in the calling thread (one image: no pool to start)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None

    @staticmethod
    def map(fn, items, chunksize: int = 1):
        return map(fn, items)


def _one_thread(detector: str) -> None:
    """A detection process's start: one torch thread for MTCNN (the one detector that runs on
    torch), so that N processes use N cores; the others never import torch."""
    if detector == "mtcnn":
        import torch

        torch.set_num_threads(1)


class Model:
    """A trained run (hierarchy by default, or its flat model) plus a face detector."""

    def __init__(
        self,
        run,
        *,
        flat: bool = False,
        router: str | None = None,
        detector: str = DEFAULT_DETECTOR,
        min_confidence: float = 0.0,
        device: str = "cpu",
        precision: str = "auto",
        backend: str = "auto",
    ):
        from .bundle import read_card
        from .calibration import load_temperature
        from .onnx_runtime import OnnxHierarchy, choose_backend_and_precision

        self.run = Path(run)
        if flat and router:
            raise UserError("router chooses how the hierarchy routes; the flat model has no router")
        self.flat = flat
        self.backend, precision = choose_backend_and_precision(
            backend, self.run, flat=flat, router=router, device=device, precision=precision
        )
        if self.backend == "onnx":  # no torch in this process
            self.net = OnnxHierarchy.load(self.run, precision=precision)
        else:
            from .predictors import FlatPredictor, HierarchicalPredictor, check_device, check_precision

            device = check_device(device)
            precision = check_precision(precision, device)
            self.net = (
                FlatPredictor.load(self.run, device)
                if flat
                else HierarchicalPredictor.load(self.run, router=router, device=device)
            )
            self.net.precision = precision
        self.temperature = load_temperature(self.run, "flat" if flat else "hierarchy")
        self.detector = check_detector(detector)
        self.min_confidence = _check_confidence(min_confidence)
        self.card = read_card(self.run)
        fmt = (self.card.get("data") or {}).get("format")
        self.synthetic = fmt == "synthetic"
        self.grayscale = fmt in GRAYSCALE_FORMATS
        self.crop = {d: run_crop(self.net.meta, d) for d in ("mtcnn", "blazeface", "haar")}  # (box_source, margin)
        self._warned = False

    def __repr__(self) -> str:
        return (
            f"Model(run={str(self.run)!r}, {'flat' if self.flat else 'hierarchy'}, detector={self.detector!r}, "
            f"T={self.temperature:.3g}, min_confidence={self.min_confidence}, precision={self.net.precision!r}, device={str(self.net.device)!r}, backend={self.backend!r})"
        )

    # -- faces ---------------------------------------------------------------------------------
    def _warn_synthetic(self, detector: str) -> None:
        if self.synthetic and detector != "none" and not self._warned:
            from .bundle import default_run

            self._warned = True
            bundled = default_run()
            warnings.warn(
                f"{self.run} was trained on synthetic faces, not photos: its answers on photos mean little"
                f" (the bundled model {bundled or '(none in this install)'} is the default without --run)",
                stacklevel=3,
            )

    def faces_in(self, image, detector: str | None = None) -> tuple[list, np.ndarray]:
        """Detected faces and their aligned crops (n, size, size, 3) uint8, as the network sees them."""

        detector = check_detector(detector or self.detector)
        try:
            im = open_image(image)
        except ImageError as exc:
            raise UserError(f"{image if isinstance(image, (str, Path)) else 'image'}: {exc}") from None
        return self._faces_in_image(im, detector)

    def _faces_in_image(self, im, detector: str) -> tuple[list, np.ndarray]:
        return faces_and_crops(im, detector, self.net.size, self.crop, self.grayscale)

    # -- the networks --------------------------------------------------------------------------
    def _infer(self, crops: np.ndarray) -> list[dict]:
        """Per crop: probabilities (temperature-scaled) and, for the hierarchy, V/A and neighborhood."""
        from .calibration import apply_temperature
        from .images import uint8_to_input

        if len(crops) == 0:
            return []
        x = uint8_to_input(crops, self.net.mean, self.net.std)
        if self.flat:
            proba, extra = self.net.proba_from_input(x), [{} for _ in crops]
        else:
            proba, va, w = self.net.infer(x)
            extra = [
                {"valence": float(v[0]), "arousal": float(v[1]), "neighborhood": int(r)}
                for v, r in zip(va, w.argmax(1))
            ]
        proba = apply_temperature(proba, self.temperature)
        return [{"proba": p, **e} for p, e in zip(proba, extra)]

    def _record(self, source, i, face, out, min_confidence) -> dict:
        p = out["proba"]
        top = int(p.argmax())
        conf = float(p[top])
        uncertain = conf < min_confidence
        order = np.argsort(-p)[:3]
        rec = {
            "file": str(source) if isinstance(source, (str, Path)) else None,
            "face": i,
            "box": [int(v) for v in face.box] if face.detector != "none" else None,
            "crop": [round(v) for v in face.region] if face.region is not None else None,
            "landmarks": face.landmarks.round(1).tolist() if face.landmarks is not None else None,
            "detector": face.detector,
            "detector_score": round(float(face.score), 4),
            "emotion": "uncertain" if uncertain else CLASSES[top],
            "top_emotion": CLASSES[top],
            "confidence": round(conf, 4),
            "probability": round(conf, 4),
            "uncertain": bool(uncertain),
            "top3": [[CLASSES[j], round(float(p[j]), 4)] for j in order],
            "probabilities": {c: round(float(v), 4) for c, v in zip(CLASSES, p)},
        }
        if "valence" in out:
            r = out["neighborhood"]
            rec.update(
                valence=round(out["valence"], 4),
                arousal=round(out["arousal"], 4),
                neighborhood=r,  # one expert per neighborhood: its classes follow
                expert_classes=self.net.expert_classes[r],
            )
        return rec

    # -- public --------------------------------------------------------------------------------
    def predict(self, image, *, detector: str | None = None, min_confidence: float | None = None) -> list[dict]:
        """One record per face in ``image`` (a path, a PIL image, an (H, W[, 3]) uint8 array, or
        an encoded image's bytes)."""
        mc = self.min_confidence if min_confidence is None else _check_confidence(min_confidence)
        image = _one_image(image)
        detector = check_detector(detector or self.detector)
        self._warn_synthetic(detector)
        faces, crops = self.faces_in(image, detector)
        return [self._record(image, i, f, o, mc) for i, (f, o) in enumerate(zip(faces, self._infer(crops)))]

    def predict_many(
        self,
        sources,
        *,
        detector: str | None = None,
        min_confidence: float | None = None,
        batch_size: int = 32,
        workers: int | None = None,
        processes: int | str = 0,
    ):
        """Yield ``(source, records, error)`` per source in order; decoding and detection run in a
        thread pool (``workers`` threads) while the network works on batches of faces from earlier
        images, or, with ``processes`` > 0, in that many worker processes (one torch thread each;
        each starts a Python and its detector (torch for MTCNN, about a second), so it pays on large folders; a script that
        asks for processes must guard its entry point with ``if __name__ == "__main__":``, as
        Python's spawned processes import it again). ``processes="auto"`` (the CLI's default):
        :func:`auto_processes` decides from the machine's cores and the number of images."""
        mc = self.min_confidence if min_confidence is None else _check_confidence(min_confidence)
        detector = check_detector(detector or self.detector)
        sources = list(sources)
        if sources:
            self._warn_synthetic(detector)
        workers = workers or min(4, os.cpu_count() or 1)
        processes = check_processes(processes)
        if processes == "auto":  # face crops (detector none) need no detection worth a process
            processes = auto_processes(len(sources)) if detector != "none" else 0
        elif processes > (cores := usable_cores()):
            warnings.warn(
                f"{processes} detection processes on {cores} usable cores: each holds its own detector "
                "(hundreds of MB with MTCNN's torch); more processes than cores only add memory",
                stacklevel=2,
            )
        prepare = partial(_prepare, detector=detector, size=self.net.size, crop=self.crop, grayscale=self.grayscale)

        pending = []  # (source, faces, crops, error), waiting for their batch to be inferred

        def flush():
            crops = [c for _, _, c, _ in pending if c is not None and len(c)]
            outs = self._infer(np.concatenate(crops)) if crops else []
            k = 0
            for src, faces, c, err in pending:
                n = 0 if c is None else len(c)
                recs = [self._record(src, i, f, o, mc) for i, (f, o) in enumerate(zip(faces, outs[k : k + n]))]
                k += n
                yield src, recs, err
            pending.clear()

        if processes:  # spawned, not forked: a fork of a process that has run torch can hang
            pool = ProcessPoolExecutor(
                processes, mp_context=get_context("spawn"), initializer=_one_thread, initargs=(detector,)
            )
        elif len(sources) > 1:
            pool = ThreadPoolExecutor(max_workers=workers)
        else:  # one image: nothing to overlap, and a thread's own torch buffers cost ~40 MB
            pool = _Inline()
        with pool:
            n_faces = received = 0
            try:
                for item in pool.map(prepare, sources, chunksize=4 if processes else 1):
                    received += 1
                    pending.append(item)
                    n_faces += 0 if item[2] is None else len(item[2])
                    if n_faces >= batch_size:
                        yield from flush()
                        n_faces = 0
            except BrokenProcessPool:  # a worker killed (out of memory, a signal): what was done is kept
                yield from flush()
                raise UserError(
                    f"a face-detection worker process died after {received} of {len(sources)} image(s) "
                    "(out of memory?); rerun with --processes 0 (threads) or fewer processes"
                ) from None
            yield from flush()

    def predict_folder(
        self,
        path,
        *,
        detector: str | None = None,
        min_confidence: float | None = None,
        batch_size: int = 32,
        processes: int | str = 0,
    ):
        """A pandas DataFrame, one row per face, for every image under ``path`` (walked); images
        without a face get one row with ``emotion`` None, unreadable ones a row with ``error``.
        ``processes``: detect in that many worker processes, or ``"auto"`` (see :meth:`predict_many`)."""
        files, skipped = walk([path])
        if skipped:
            warnings.warn(skipped_note(skipped), stacklevel=2)
        rows = []
        for src, recs, err in self.predict_many(
            files, detector=detector, min_confidence=min_confidence, batch_size=batch_size, processes=processes
        ):
            rows += [flat_row(r) for r in recs] or [no_face_row(src, err)]
        return face_table(rows)

    def predict_video(
        self,
        path,
        *,
        detector: str | None = None,
        every: int | None = None,
        fps: float | None = None,
        start: float | None = None,
        end: float | None = None,
        smooth: float | None = None,
        smooth_method: str = "centred",
        batch_size: int = 16,
        progress: bool | None = None,
    ):
        """A pandas DataFrame, one row per face per analysed frame of the video at ``path``, with
        a ``track`` id per face across frames (see :func:`ensemble.video.predict_video`): ``every``
        N-th frame or about ``fps`` a second, from ``start`` to ``end`` seconds, ``smooth``
        seconds of smoothing per track (reported beside the raw values)."""
        from .video import predict_video

        detector = check_detector(detector or self.detector)
        self._warn_synthetic(detector)
        return predict_video(
            path,
            self,
            detector=detector,
            every=every,
            fps=fps,
            start=start,
            end=end,
            smooth=smooth,
            smooth_method=smooth_method,
            batch_size=batch_size,
            progress=progress,
        )

    def annotate(self, image, records: list[dict] | None = None, *, detector: str | None = None):
        """A copy of ``image`` (PIL, RGB) with each face's box, label and confidence, and a small
        valence/arousal marker (the dot in a square whose axes are valence -1..1 and arousal -1..1)."""
        from PIL import ImageDraw

        image = _one_image(image)
        try:
            im = open_image(image).copy()
        except ImageError as exc:
            raise UserError(f"{_name(image)}: {exc}") from None
        records = self.predict(im, detector=detector) if records is None else records  # decoded once
        draw = ImageDraw.Draw(im)
        lw = max(2, round(max(im.size) / 400))
        for r in records:
            x, y, w, h = r["box"] or (0, 0, im.width - 1, im.height - 1)
            color = (150, 150, 150) if r["uncertain"] else (40, 220, 90)
            draw.rectangle([x, y, x + w, y + h], outline=color, width=lw)
            label = f"{r['emotion']} {r['confidence']:.2f}"
            ty = max(0, y - 12 - lw)
            draw.rectangle([x, ty, x + 7 * len(label) + 4, ty + 12], fill=(0, 0, 0))
            draw.text((x + 2, ty), label, fill=color)
            if r.get("landmarks"):
                for px, py in r["landmarks"]:
                    draw.ellipse([px - lw, py - lw, px + lw, py + lw], outline=(255, 200, 0))
            if "valence" in r:
                s = max(16, min(48, w // 3))
                bx, by = x + w + lw, y
                draw.rectangle([bx, by, bx + s, by + s], outline=(255, 255, 255), fill=(30, 30, 30))
                draw.line([bx + s / 2, by, bx + s / 2, by + s], fill=(90, 90, 90))
                draw.line([bx, by + s / 2, bx + s, by + s / 2], fill=(90, 90, 90))
                vx = bx + (r["valence"] + 1) / 2 * s
                vy = by + (1 - (r["arousal"] + 1) / 2) * s
                draw.ellipse([vx - 2, vy - 2, vx + 2, vy + 2], fill=(255, 80, 80))
        return im


def walk(paths) -> tuple[list[Path], list[Path]]:
    """Files to predict, and what walked folders hold that is not predicted: files without an
    image extension, not regular files (FIFOs, devices: skipped by name, never opened), hidden
    files and whatever is in hidden folders, and linked folders (not followed: no loops)."""
    files, skipped = [], []
    for p in map(Path, paths):
        if p.is_dir():
            for f in sorted(p.rglob("*")):
                if f.is_dir():
                    if f.is_symlink():
                        skipped.append(f)
                    continue
                hidden = any(part.startswith(".") for part in f.relative_to(p).parts)
                ok = not hidden and f.suffix.lower() in IMAGE_EXTENSIONS and f.is_file()
                (files if ok else skipped).append(f)
        else:
            files.append(p)  # named explicitly: always tried
    return files, skipped


def skipped_note(skipped: list[Path]) -> str:
    """One line naming what :func:`walk` skipped (a count and the first three)."""
    return (
        f"skipped {len(skipped)} entr{'y' if len(skipped) == 1 else 'ies'} in folders: no image extension, "
        f"hidden, not a regular file, or a linked folder (not followed) (e.g. {', '.join(shown(f) for f in skipped[:3])})"
    )


def flat_row(rec: dict) -> dict:
    """A record as one table row: box and probabilities spread into columns."""
    row = {
        k: v
        for k, v in rec.items()
        if k not in ("box", "crop", "probabilities", "landmarks", "top3", "expert_classes", "probability")
    }
    row.update(dict(zip(("x", "y", "w", "h"), rec["box"] or (None,) * 4)))
    row.update({f"p_{c}": v for c, v in rec["probabilities"].items()})
    if rec.get("landmarks"):
        names = ("left_eye", "right_eye", "nose", "mouth_left", "mouth_right")
        for n, (px, py) in zip(names, rec["landmarks"]):
            row[f"{n}_x"], row[f"{n}_y"] = px, py
    return row


def no_face_row(src, err: str | None = None) -> dict:
    """The table row of an image without a face (``note``) or that could not be read (``error``)."""
    return {
        "file": str(src),
        "face": None,
        "emotion": None,
        "error": err or None,
        "note": None if err else "no face found",
    }


def face_table(rows: list[dict]):
    """A pandas DataFrame of :func:`flat_row` and :func:`no_face_row` rows: the faces' columns in
    their order, then ``error`` and ``note``; integer columns (face, box, landmarks) stay integers
    where a face-less row leaves them empty."""
    import pandas as pd

    cols: list[str] = []
    for r in sorted(rows, key=lambda r: r.get("face") is None):  # face rows' keys first
        cols += [k for k in r if k not in cols and k not in ("error", "note")]
    cols += [k for k in ("error", "note") if any(k in r for r in rows)]
    table = pd.DataFrame(rows, columns=cols)
    for c in cols:
        values = [r[c] for r in rows if r.get(c) is not None]
        if values and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values):
            table[c] = table[c].astype("Int64")
    return table
