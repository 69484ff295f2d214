"""What one epoch trains on: the balance plan, class weights, augmentation and the image batches.

Per epoch a balance plan picks the faces (down/up/transform sampling, seeded by epoch); the
batches are augmented on the device (random crop and flip; transform copies also get a random
rotation) by :func:`warp`, the one rotate/flip/crop function (the feature cache uses it too), then,
where the config asks, by :func:`photo_augment` (lighting, gray, blur, JPEG).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from .classes import canonical_class
from .runtime import Runtime


@dataclass
class StageData:
    """What a stage trains on: indices into an ImageSource, and their targets."""

    images: object  # ImageSource
    train_idx: np.ndarray
    train_y: np.ndarray  # classify: (n,) int labels (local to the stage); regress: (n, 2) float
    val_idx: np.ndarray
    val_y: np.ndarray
    class_names: list[str] = field(default_factory=list)  # classify: names in logit order
    train_soft: np.ndarray | None = None  # classify: (n, C) target distributions, optional


def class_weights(counts: np.ndarray, balance_cfg, class_names: list[str]) -> np.ndarray | None:
    """Per-class loss weights from the epoch's effective class counts (mean 1 over present classes)."""
    mode = balance_cfg.weights
    if mode == "none":
        return None
    counts = np.asarray(counts, float)
    present = counts > 0
    w = np.zeros_like(counts)
    if mode == "inverse":
        w[present] = 1.0 / counts[present]
    elif mode == "sqrt_inverse":
        w[present] = 1.0 / np.sqrt(counts[present])
    else:  # explicit (config._RULES allows nothing else)
        known = {canonical_class(k): float(v) for k, v in balance_cfg.class_weights.items()}  # aliases allowed
        return np.array([known.get(c, 1.0) for c in class_names])
    w[present] = w[present] / w[present].mean()
    return w


def epoch_plan(labels: np.ndarray, balance_cfg, seed: int, epoch: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions into the training set for one epoch, and which of them are transform copies.

    none: every face once. down: every class sampled to ``floor`` (default: the rarest class).
    up: rarer classes topped up with duplicates to min(cap, largest class). transform: as up,
    but the added copies are marked to get a random rotation and flip (the report's remedy).
    """
    mode = balance_cfg.mode
    n = len(labels)
    rng = np.random.default_rng([seed, epoch, 7])
    if mode == "none" or labels.ndim != 1:
        return np.arange(n), np.zeros(n, dtype=bool)
    classes, counts = np.unique(labels, return_counts=True)
    picks, copies = [], []
    if mode == "down":
        target = balance_cfg.floor or counts.min()
        for c, k in zip(classes, counts):
            idx = np.flatnonzero(labels == c)
            take = rng.choice(idx, size=min(k, target), replace=False)
            picks.append(take)
            copies.append(np.zeros(len(take), dtype=bool))
    else:  # up or transform (config._RULES allows nothing else)
        target = min(balance_cfg.cap, counts.max())
        for c, k in zip(classes, counts):
            idx = np.flatnonzero(labels == c)
            extra = rng.choice(idx, size=max(0, target - k), replace=True)
            picks += [idx, extra]
            copies += [np.zeros(len(idx), dtype=bool), np.full(len(extra), mode == "transform")]
    return np.concatenate(picks), np.concatenate(copies)


def warp(x: torch.Tensor, angle: torch.Tensor, flip: torch.Tensor, scale=None, tx=None, ty=None) -> torch.Tensor:
    """Rotate by ``angle`` (radians), mirror where ``flip`` is -1, zoom by ``scale`` and shift by
    (``tx``, ``ty``) (fractions of the half-side), each per face; reflection padding.

    ``x``: (batch, 3, H, W); the others: (batch,) tensors (``scale`` 1, shifts 0 when None).
    """
    zero = torch.zeros_like(angle)
    cos, sin = torch.cos(angle), torch.sin(angle)
    if scale is not None:
        cos, sin = cos / scale, sin / scale
    tx = zero if tx is None else tx
    ty = zero if ty is None else ty
    theta = torch.stack([torch.stack([cos * flip, -sin, tx], 1), torch.stack([sin * flip, cos, ty], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def _blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur with one ``sigma`` (pixels) per face; sigma 0 leaves a face as it is."""
    n, c, h, w = x.shape
    radius = max(1, math.ceil(3 * float(sigma.max())))
    radius = min(radius, (min(h, w) - 1) // 2) if min(h, w) > 2 else 0
    if radius == 0:
        return x
    t = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    s = sigma.to(x.dtype).clamp_min(1e-3).view(n, 1)
    k = torch.exp(-(t.view(1, -1) ** 2) / (2 * s**2))
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (n * c, taps)
    y = x.reshape(1, n * c, h, w)
    y = F.conv2d(F.pad(y, (radius, radius, 0, 0), mode="reflect"), k.view(n * c, 1, 1, -1), groups=n * c)
    y = F.conv2d(F.pad(y, (0, 0, radius, radius), mode="reflect"), k.view(n * c, 1, -1, 1), groups=n * c)
    return y.view(n, c, h, w)


def _jpeg(x: torch.Tensor, quality: torch.Tensor) -> torch.Tensor:
    """Each face JPEG-encoded and decoded (Pillow) at its own ``quality`` (0 = untouched)."""
    import io

    from PIL import Image

    out = x.clone()
    for i in torch.nonzero(quality > 0).flatten().tolist():
        face = (x[i] * 255).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).cpu().numpy()
        buf = io.BytesIO()
        Image.fromarray(face).save(buf, format="JPEG", quality=int(quality[i]))
        back = np.array(Image.open(buf).convert("RGB"))
        out[i] = torch.from_numpy(back).to(x.device, x.dtype).permute(2, 0, 1) / 255
    return out


def photo_augment(x: torch.Tensor, tc, gen: torch.Generator) -> torch.Tensor:
    """What separates a detector's crop of a photo from a data set's face: lighting
    (``brightness``, ``contrast``), colour (``grayscale``), focus (``blur``) and compression
    (``jpeg``), each drawn per face. ``x``: (batch, 3, H, W) in [0, 1]; off when all are 0."""
    n, dev = x.shape[0], x.device
    r = lambda: torch.rand(n, generator=gen, device=dev)  # noqa: E731
    if tc.brightness or tc.contrast:
        mean = x.mean((1, 2, 3), keepdim=True)
        c = (1 + (r() * 2 - 1) * tc.contrast).view(n, 1, 1, 1)
        b = ((r() * 2 - 1) * tc.brightness).view(n, 1, 1, 1)
        x = ((x - mean) * c + mean + b).clamp(0, 1)
    if tc.grayscale:
        gray = (x * torch.tensor([0.299, 0.587, 0.114], device=dev).view(1, 3, 1, 1)).sum(1, keepdim=True)
        x = torch.where((r() < tc.grayscale).view(n, 1, 1, 1), gray.expand_as(x), x)
    if tc.blur:
        x = _blur(x, torch.where(r() < 0.5, r() * tc.blur, torch.zeros(n, device=dev)))
    if tc.jpeg:
        q = (tc.jpeg + r() * (95 - tc.jpeg)).round().long()
        x = _jpeg(x, torch.where(r() < 0.5, q, torch.zeros_like(q)))
    return x


def augment(x: torch.Tensor, copy: torch.Tensor, train_cfg, balance_cfg, gen: torch.Generator) -> torch.Tensor:
    """Random crop (scale/shift) and flip for every face, plus rotation for transform copies,
    then the photo augmentations (:func:`photo_augment`) where the config turns them on.

    ``x``: (batch, 3, H, W) float in [0, 1]; ``copy``: (batch,) bool. Same shape out.
    """
    n = x.shape[0]
    dev = x.device
    r = lambda: torch.rand(n, generator=gen, device=dev)  # noqa: E731
    s = train_cfg.crop_scale
    scale = 1 + (r() * 2 - 1) * s if train_cfg.augment else torch.ones(n, device=dev)
    tx = (r() * 2 - 1) * s if train_cfg.augment else torch.zeros(n, device=dev)
    ty = (r() * 2 - 1) * s if train_cfg.augment else torch.zeros(n, device=dev)
    flip_p = torch.where(
        copy,
        torch.full((n,), 0.5 if balance_cfg.flip else 0.0, device=dev),
        torch.full((n,), 0.5 if train_cfg.augment else 0.0, device=dev),
    )
    flip = torch.where(r() < flip_p, -1.0, 1.0)
    angle = torch.where(copy, (r() * 2 - 1) * math.radians(balance_cfg.rotation), torch.zeros(n, device=dev))
    return photo_augment(warp(x, angle, flip, scale, tx, ty), train_cfg, gen)


class _Faces(torch.utils.data.Dataset):
    """Faces by position in a plan: (uint8 HWC tensor, plan position, ok)."""

    def __init__(self, images, idx: np.ndarray):
        self.images, self.idx = images, idx

    def __len__(self):
        return len(self.idx)

    def __getitem__(self, j):
        img = self.images.get(int(self.idx[j]))
        if img is None:
            return torch.zeros(self.images.size, self.images.size, 3, dtype=torch.uint8), j, False
        return torch.from_numpy(np.array(img)), j, True  # a copy: memmap rows are read-only


def make_loader(images, idx, batch_size, rt: Runtime, shuffle_seed: int | None, workers: int):
    """A DataLoader of (uint8 (H, W, 3) face, position, decoded ok) for faces ``idx``: shuffled by
    ``shuffle_seed`` (split over the ranks under DDP), in order when it is None."""
    ds = _Faces(images, idx)
    if rt.world > 1 and shuffle_seed is not None:
        sampler = torch.utils.data.DistributedSampler(
            ds, num_replicas=rt.world, rank=rt.rank, shuffle=True, seed=shuffle_seed
        )
    elif shuffle_seed is not None:
        g = torch.Generator().manual_seed(shuffle_seed)
        sampler = torch.utils.data.RandomSampler(ds, generator=g)
    else:
        sampler = torch.utils.data.SequentialSampler(ds)
    return torch.utils.data.DataLoader(
        ds,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        pin_memory=rt.device.type == "cuda",
        persistent_workers=False,
    )


def to_input(batch_u8: torch.Tensor, rt: Runtime) -> torch.Tensor:
    """(batch, H, W, 3) uint8 -> (batch, 3, H, W) float on the device, in [0, 1] (not yet normalised)."""
    return batch_u8.to(rt.device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255)


def normalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    """(x - mean) / std per channel; ``x``: (batch, 3, H, W)."""
    m = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s


def image_batches(images, train_idx, plan, copy, tc, bc, rt, gen, mean, std, epoch, workers, stats=None):
    """Augmented, normalised image batches: (x, positions into plan). Faces that fail to decode
    on the fly (``data.cache = "none"``) are skipped and counted in ``stats["skipped"]``."""
    loader = make_loader(images, train_idx[plan], tc.batch_size, rt, tc.seed * 1000 + epoch, workers)
    if isinstance(loader.sampler, torch.utils.data.DistributedSampler):
        loader.sampler.set_epoch(epoch)
    for xb, jb, okb in loader:
        keep = okb.bool()
        if not keep.all():  # decoded on the fly and failed: skip and count
            if stats is not None:
                stats["skipped"] = stats.get("skipped", 0) + int((~keep).sum())
            xb, jb = xb[keep], jb[keep]
            if len(jb) == 0:
                continue
        cp = torch.as_tensor(copy[jb.numpy()], device=rt.device)
        x = augment(to_input(xb, rt), cp, tc, bc, gen)
        x = normalize(x, mean, std)
        if rt.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        yield x, jb.numpy()
