"""The feature cache: when the first blocks of the trunk are frozen, their output is computed once
per (face, view), kept on disk (fp16, memory-mapped), and the trainable tail learns from it.

Views are fixed: plain, flipped, and for transform balancing a few rotated/flipped copies per
face (:func:`feature_views`). Keyed by the frozen weights, the faces and the view, so stage 1,
its out-of-fold refits and every expert built on one trunk share one cache.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from .artifacts import state_digest
from .batches import make_loader, normalize, to_input, warp
from .errors import UserError
from .paths import make_dir
from .runtime import Runtime


def feature_views(n: int, tc, bc) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """The fixed views a feature cache holds: (name, flip flags (n,), rotation degrees (n,))."""
    zero = np.zeros(n)
    views = [("plain", zero, zero)]
    if tc.augment or bc.flip:
        views.append(("flip", np.ones(n), zero))
    if bc.mode == "transform":  # the report's transform copies: a fixed set of rotated, flipped views per face
        for v in range(tc.transform_views):
            rng = np.random.default_rng([tc.seed + 99, v])
            flip = (rng.random(n) < 0.5).astype(float) if bc.flip else zero
            views.append(
                (
                    f"transform-r{bc.rotation:g}-f{int(bc.flip)}-s{tc.seed}-v{v}",
                    flip,
                    rng.uniform(-bc.rotation, bc.rotation, n),
                )
            )
    return views


class RowView:
    """A view cached for some faces only: indexed by face like the full views; asking for a face
    it does not hold is a bug and raises, so no uncomputed (zero) features can be trained on."""

    def __init__(self, arr: np.ndarray, rows: np.ndarray, n: int):
        self.arr = arr
        self.where = np.full(n, -1, dtype=np.int64)
        self.where[rows] = np.arange(len(rows))

    def __getitem__(self, faces):
        pos = self.where[faces]
        if (pos < 0).any():
            raise RuntimeError(f"feature cache: face {int(np.asarray(faces)[pos < 0][0])} is not in this view's rows")
        return self.arr[pos]


@torch.no_grad()
def feature_store(
    net, images, mean, std, rt: Runtime, views, log=print, desc: str = "", rows: dict | None = None
) -> list:
    """The frozen blocks' output for every face and view, fp16, memory-mapped from disk.

    Keyed by the trunk's weights, the faces and the view, so stage 1, its out-of-fold refits
    and every expert built on one trunk share one cache. Returns one (n, C, h, w) array per view;
    a view named in ``rows`` is computed for those faces only (keyed by them too) and returned
    as a :class:`RowView`.
    """
    root = Path(images.cache_dir) / "features"
    make_dir(root, "data.cache_dir")
    frozen = net.trunk[: net.n_frozen_blocks]
    trunk_key = f"{state_digest(frozen)[:16]}-b{net.n_frozen_blocks}"
    rows = rows or {}
    out = []
    net.eval()
    for name, flip, angle in views:
        subset = np.unique(np.asarray(rows[name], dtype=np.int64)) if name in rows else None
        if subset is not None:
            key = hashlib.sha256(subset.tobytes()).hexdigest()[:12]
            path = root / f"{trunk_key}-{images.digest}-{name}-rows{len(subset)}-{key}.npy"
        else:
            path = root / f"{trunk_key}-{images.digest}-{name}.npy"
        faces = subset if subset is not None else np.arange(len(images))
        if subset is not None and len(subset) == 0:
            out.append(RowView(np.zeros((0,)), subset, len(images)))
            continue
        if not path.is_file():
            t0 = time.time()
            tmp = path.with_name(path.name + f".tmp{os.getpid()}.npy")
            arr = None
            loader = make_loader(images, faces, 256, rt.single_process(), None, 0)
            for xb, jb, _ in loader:
                j = jb.numpy()  # positions in ``faces``: the rows of this view's array
                face = faces[j]
                x = to_input(xb, rt)
                f = torch.as_tensor(flip[face], device=rt.device, dtype=torch.float32)
                a = torch.as_tensor(np.radians(angle[face]), device=rt.device, dtype=torch.float32)
                if bool((f != 0).any() or (a != 0).any()):
                    x = warp(x, a, 1 - 2 * f)
                x = normalize(x, mean, std)
                if rt.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                with rt.autocast():
                    feat = frozen(x).to(torch.float16).cpu().numpy()  # halve the copy off the device
                if arr is None:
                    need = len(faces) * feat[0].nbytes
                    free = shutil.disk_usage(root).free
                    if need > 0.95 * free:
                        raise UserError(
                            f"the feature cache view '{name}' needs {need / 1e9:.1f} GB under {root} and "
                            f"{free / 1e9:.1f} GB are free: set train.feature_cache = false, fewer "
                            f"train.transform_views, or data.cache_dir on a larger disk"
                        )
                    arr = np.lib.format.open_memmap(
                        tmp, mode="w+", dtype=np.float16, shape=(len(faces),) + feat.shape[1:]
                    )
                arr[j] = feat
            arr.flush()
            del arr
            os.replace(tmp, path)
            if rt.is_main:
                log(
                    f"{desc}: feature cache '{name}' of the frozen trunk for {len(faces)} faces, "
                    f"{path.stat().st_size / 1e6:.1f} MB, {time.time() - t0:.1f}s"
                )
        arr = np.load(path, mmap_mode="r")
        out.append(arr if subset is None else RowView(arr, subset, len(images)))
    return out


def copy_rows(train_idx: np.ndarray, train_y: np.ndarray, bc) -> np.ndarray:
    """The faces that :func:`ensemble.batches.epoch_plan` can draw as transform copies: every
    training face of a class below the up-sampling target (min(cap, largest class))."""
    if bc.mode != "transform" or np.ndim(train_y) != 1 or len(train_y) == 0:
        return np.zeros(0, dtype=np.int64)
    classes, counts = np.unique(train_y, return_counts=True)
    target = min(bc.cap, counts.max())
    return np.asarray(train_idx)[np.isin(train_y, classes[counts < target])]


def feature_cache(net, images, train_idx, val_idx, mean, std, rt, tc, bc, desc, log, train_y=None) -> dict:
    """The views of every face (:func:`feature_store`) and what the loop needs to draw from them:
    the training rows, the validation features (plain view, float32) and which views are plain.
    With ``train_y``, the rotated views of transform balancing are computed only for the faces
    that can be drawn as copies (:func:`copy_rows`) when they are at most half of all faces."""
    views = feature_views(len(images), tc, bc)
    rows = {}
    eligible = copy_rows(train_idx, train_y, bc) if train_y is not None else None
    # a few faces: their own small views; most of the data set: the whole views, shared by every
    # stage on this trunk (several experts' subsets could otherwise add up to more than one pass)
    if eligible is not None and len(eligible) <= len(images) // 2:
        rows = {name: eligible for name, _, _ in views if name.startswith("transform")}
    store = feature_store(net, images, mean, std, rt, views, log, desc, rows)
    val = torch.from_numpy(np.asarray(store[0][val_idx], dtype=np.float32)) if len(val_idx) else None
    return {
        "views": store,
        "train_rows": train_idx,
        "val": val,
        "transform_views": np.flatnonzero([name.startswith("transform") for name, _, _ in views]),
        "n_plain": 2 if len(views) >= 2 and views[1][0] == "flip" and tc.augment else 1,
    }


def feature_batches(features, plan, copy, batch_size, seed, epoch, device):
    """Batches of cached features: originals pick a random plain/flipped view, copies a random
    one of the rotated views."""
    rng = np.random.default_rng([seed, epoch, 11])
    order = rng.permutation(len(plan))
    views, rows_all = features["views"], features["train_rows"]
    for s in range(0, len(order), batch_size):
        pos = order[s : s + batch_size]
        rows = rows_all[plan[pos]]
        view = rng.integers(0, features["n_plain"], len(pos))
        tv = features["transform_views"]
        if len(tv):
            view = np.where(copy[pos], tv[rng.integers(0, len(tv), len(pos))], view)
        x = np.empty((len(pos),) + views[0].shape[1:], dtype=np.float32)
        for v in np.unique(view):
            sel = np.flatnonzero(view == v)
            x[sel] = views[v][rows[sel]]
        yield torch.from_numpy(x).to(device), pos
