"""Decode, crop and resize every image once; training and evaluation read the result.

``prepare_images`` streams a manifest through the decoder (with worker processes) into one
uint8 array ``(n, size, size, 3)`` on disk, memory-mapped, plus a mask of the images that
decoded. Memory stays constant whatever the data-set size: rows are written as they come.
The shard is keyed by the manifest's paths, boxes and the size, so every stage (stage 1,
flat, each expert) and every later run reuses it.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from .data import ImageError, face_array, manifest_digest, row_box
from .paths import make_dir


def _decode(job):
    path, box, size = job
    try:
        return face_array(path, box, size), None
    except ImageError as exc:
        return None, str(exc)


class ImageSource:
    """Faces of a manifest at one size: ``get(i) -> (size, size, 3) uint8 or None``."""

    def __init__(
        self,
        manifest: pd.DataFrame,
        size: int,
        cache_dir: str | Path,
        array: np.ndarray | None = None,
        ok: np.ndarray | None = None,
        digest: str | None = None,
    ):
        self.paths = manifest["path"].tolist()
        self.boxes = [row_box(r) for r in manifest[["x", "y", "w", "h"]].itertuples(index=False)]
        self.size = size
        self.cache_dir = Path(cache_dir)  # where caches derived from these faces live (e.g. features/)
        self.digest = digest or manifest_digest(manifest, size)  # names caches derived from these faces
        self.array = array  # prepared (n, size, size, 3) array (in memory or memory-mapped), or None (decode on demand)
        self.ok = ok if ok is not None else np.ones(len(self.paths), dtype=bool)
        self.mode = "none" if array is None else ("disk" if isinstance(array, np.memmap) else "memory")

    def __len__(self) -> int:
        return len(self.paths)

    def get(self, i: int) -> np.ndarray | None:
        if self.array is not None:
            return np.asarray(self.array[i]) if self.ok[i] else None
        img, _ = _decode((self.paths[i], self.boxes[i], self.size))
        return img


def prepare_images(
    manifest: pd.DataFrame, size: int, cache_dir: str | Path, workers: int = 0, progress: bool = True
) -> tuple[Path, dict]:
    """Write (or find) the prepared shard for ``manifest``; returns its folder and stats."""
    folder = Path(cache_dir) / "prepared" / manifest_digest(manifest, size)  # the folder's name is the digest
    info_file = folder / "info.json"
    if info_file.is_file():
        return folder, json.loads(info_file.read_text())
    make_dir(Path(cache_dir), "data.cache_dir")
    make_dir(folder.parent, "data.cache_dir")
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    n = len(manifest)
    ok = np.zeros(n, dtype=bool)
    bad: list[str] = []  # the first few, for the warning
    n_bad = 0
    paths = manifest["path"].tolist()
    boxes = [row_box(r) for r in manifest[["x", "y", "w", "h"]].itertuples(index=False)]
    jobs = ((p, b, size) for p, b in zip(paths, boxes))
    bar = tqdm(total=n, desc=f"prepare {size}px", unit="img", disable=None if progress else True, leave=False)
    if workers > 0:
        ctx = get_context("spawn")
        pool = ctx.Pool(workers)
        results = pool.imap(_decode, jobs, chunksize=256)
    else:
        pool = None
        results = map(_decode, jobs)
    blank = bytes(size * size * 3)
    try:
        # rows arrive in order and are appended to a .npy file: memory stays flat however many rows
        with open(tmp / "images.npy", "wb") as f:
            np.lib.format.write_array_header_1_0(
                f,
                {
                    "descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)),
                    "fortran_order": False,
                    "shape": (n, size, size, 3),
                },
            )
            for i, (img, err) in enumerate(results):
                if img is None:
                    n_bad += 1
                    if len(bad) < 20:
                        bad.append(f"{paths[i]}: {err}")
                    f.write(blank)
                else:
                    f.write(np.ascontiguousarray(img, dtype=np.uint8).tobytes())
                    ok[i] = True
                bar.update()
            f.flush()
            os.fsync(f.fileno())
    finally:
        bar.close()
        if pool is not None:
            pool.close()
            pool.join()
    np.save(tmp / "ok.npy", ok)
    info = {"n": n, "size": size, "n_bad": n_bad, "bad_examples": bad}
    (tmp / "info.json").write_text(json.dumps(info, indent=1))
    try:
        os.replace(tmp, folder)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder, info


def load_images(
    manifest: pd.DataFrame,
    size: int,
    cache_dir: str | Path,
    mode: str = "auto",
    workers: int = 0,
    progress: bool = True,
) -> ImageSource:
    """An ImageSource over the manifest (``data.cache``): ``none`` decodes every image when it is
    read; otherwise the prepared shard is written (once) and read from ``disk`` (memory-mapped),
    or held in ``memory``; ``auto`` holds it in memory when it takes under a quarter of the
    memory available now, else reads it from disk."""
    if mode == "none":
        return ImageSource(manifest, size, cache_dir)
    folder, info = prepare_images(manifest, size, cache_dir, workers, progress)
    if info["n_bad"]:
        shown = "; ".join(info["bad_examples"][:3])
        warnings.warn(f"skipped {info['n_bad']} unreadable image(s): {shown}", stacklevel=2)
    shard = folder / "images.npy"
    if mode == "auto":
        available = available_memory()
        mode = "memory" if available is not None and shard.stat().st_size < available / 4 else "disk"
    array = np.load(shard, mmap_mode="r" if mode == "disk" else None)
    return ImageSource(manifest, size, cache_dir, array, np.load(folder / "ok.npy"), digest=folder.name)


def available_memory() -> int | None:
    """Bytes of memory available to new allocations (Linux ``MemAvailable``), or None if unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None
