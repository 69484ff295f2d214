"""The one training loop, for every neural stage (stage 1, flat, experts).

Nothing here knows about emotions: a stage hands in a network, the indices and targets of
its training and validation faces, and a task (``classify`` or ``regress``). Device and
precision are decided once (:func:`runtime`) and passed in.

Per epoch: a balance plan picks the faces (down/up/transform sampling, seeded by epoch),
the batches are augmented on the device (random crop and flip; transform copies also get a
random rotation), one optimizer step per batch, then validation, ``history.csv`` and a
checkpoint from which ``resume`` continues. When the whole trunk is frozen, the trunk's
output is computed once per (face, view), kept on disk, and the trainable tail learns from it.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import json
import math
import os
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from .errors import UserError
from .metrics import classification_metrics, regression_metrics


class TrainingInterrupted(Exception):
    """Ctrl-C or SIGTERM: the last complete epoch is checkpointed; rerun with --resume."""


# --------------------------------------------------------------------------- runtime


@dataclass
class Runtime:
    device: torch.device
    amp_dtype: torch.dtype | None  # None = fp32
    channels_last: bool
    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)


def runtime(train_cfg) -> Runtime:
    """Pick device and precision once: cuda, then mps, then cpu; bf16 where it is supported."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    name = train_cfg.device
    if name == "auto":
        if torch.cuda.is_available():
            name = "cuda"
        elif getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            name = "mps"
        else:
            name = "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"train.device = {name!r} but no CUDA device is available")
    if name.startswith("cuda:") and int(name[5:]) >= torch.cuda.device_count():
        raise UserError(f"train.device = {name!r} but there are {torch.cuda.device_count()} CUDA device(s)")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UserError("train.device = 'mps' but this machine has no Apple GPU available to torch")
    if name == "cuda" and world > 1:
        name = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if train_cfg.threads:
        torch.set_num_threads(train_cfg.threads)
    prec = train_cfg.precision
    if prec == "auto":
        if device.type == "cuda":
            prec = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        elif device.type == "cpu" and _cpu_has_fast_bf16():
            prec = "bf16"
        else:
            prec = "fp32"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}.get(prec, "bad")
    if dtype == "bad":
        raise UserError(f"train.precision must be auto, bf16, fp16 or fp32, got {prec!r}")
    if dtype is torch.float16 and device.type == "cpu":
        dtype = torch.bfloat16
    return Runtime(device, dtype, train_cfg.channels_last, rank, world)


def _cpu_has_fast_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


# --------------------------------------------------------------------------- data per epoch


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
    elif mode == "explicit":
        from .data import canonical_class

        known = {canonical_class(k): float(v) for k, v in balance_cfg.class_weights.items()}  # aliases allowed
        w = np.array([known.get(c, 1.0) for c in class_names])
        return w
    else:
        raise UserError(f"balance.weights must be none, inverse, sqrt_inverse or explicit, got {mode!r}")
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
    elif mode in ("up", "transform"):
        target = min(balance_cfg.cap, counts.max())
        for c, k in zip(classes, counts):
            idx = np.flatnonzero(labels == c)
            extra = rng.choice(idx, size=max(0, target - k), replace=True)
            picks += [idx, extra]
            copies += [np.zeros(len(idx), dtype=bool), np.full(len(extra), mode == "transform")]
    else:
        raise UserError(f"balance.mode must be none, down, up or transform, got {mode!r}")
    return np.concatenate(picks), np.concatenate(copies)


def augment(x: torch.Tensor, copy: torch.Tensor, train_cfg, balance_cfg, gen: torch.Generator) -> torch.Tensor:
    """Random crop (scale/shift) and flip for every face, plus rotation for transform copies.

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
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos * flip, -sin, tx], 1), torch.stack([sin * flip, cos, ty], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


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


def _loader(images, idx, batch_size, rt: Runtime, shuffle_seed: int | None, workers: int):
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
    m = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s


# --------------------------------------------------------------------------- prediction


@torch.no_grad()
def predict_outputs(
    net: nn.Module,
    images,
    idx: np.ndarray,
    mean,
    std,
    rt: Runtime,
    batch_size: int = 256,
    workers: int = 0,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Raw outputs (n, n_out) float32 for faces ``idx``, and a mask of those that decoded."""
    net.eval()
    outs = []
    ok_all = np.zeros(len(idx), dtype=bool)
    loader = _loader(images, idx, batch_size, Runtime(rt.device, rt.amp_dtype, rt.channels_last), None, workers)
    for xb, jb, okb in tqdm(loader, desc="predict", leave=False, disable=not progress):
        x = normalize(to_input(xb, rt), mean, std)
        if rt.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with rt.autocast():
            y = net(x)
        outs.append(y.float().cpu().numpy())
        ok_all[jb.numpy()] = okb.numpy()
    out = np.concatenate(outs) if outs else np.zeros((0, 0), np.float32)
    return out, ok_all


# --------------------------------------------------------------------------- the loop


@dataclass
class FitResult:
    state_dict: dict
    history: list[dict]
    best_epoch: int
    best_metric: float
    n_skipped: int


def _lr_lambda(train_cfg, steps_per_epoch: int):
    total = max(1, train_cfg.epochs * steps_per_epoch)
    warm = int(train_cfg.warmup_epochs * steps_per_epoch)

    def f(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        if train_cfg.schedule == "cosine":
            t = (step - warm) / max(1, total - warm)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
        if train_cfg.schedule == "step":
            return train_cfg.gamma ** ((step // steps_per_epoch) // max(1, train_cfg.step_size))
        return 1.0

    return f


def make_optimizer(params, train_cfg, device: torch.device):
    """Adam, AdamW or SGD; fused kernels where the build has them for this device."""
    params = list(params)
    name, tc = train_cfg.optimizer, train_cfg
    if name == "adam":
        cls, kw = torch.optim.Adam, {"weight_decay": tc.weight_decay}
    elif name == "adamw":
        cls, kw = torch.optim.AdamW, {"weight_decay": tc.weight_decay}
    elif name == "sgd":
        cls, kw = (
            torch.optim.SGD,
            {"momentum": tc.momentum, "weight_decay": tc.weight_decay, "nesterov": tc.nesterov and tc.momentum > 0},
        )
    else:
        raise UserError(f"train.optimizer must be adam, adamw or sgd, got {name!r}")
    if device.type in ("cuda", "cpu"):
        try:
            return cls(params, lr=tc.lr, fused=True, **kw)
        except (RuntimeError, TypeError):
            pass  # no fused kernel in this build
    return cls(params, lr=tc.lr, **kw)


def ccc_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - CCC, averaged over the output columns."""
    pm, tm = pred.mean(0), target.mean(0)
    pv, tv = pred.var(0, unbiased=False), target.var(0, unbiased=False)
    cov = ((pred - pm) * (target - tm)).mean(0)
    return (1 - 2 * cov / (pv + tv + (pm - tm) ** 2 + 1e-8)).mean()


class _SigTerm:
    """Turns SIGTERM into KeyboardInterrupt while training, so both stop the same clean way."""

    def __enter__(self):
        self.old = None
        try:
            self.old = signal.signal(signal.SIGTERM, self._raise)
        except ValueError:  # not the main thread
            pass
        return self

    @staticmethod
    def _raise(signum, frame):
        raise KeyboardInterrupt

    def __exit__(self, *exc):
        if self.old is not None:
            signal.signal(signal.SIGTERM, self.old)


def _atomic_torch_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def fit(
    net: nn.Module,
    task: str,
    data: StageData,
    cfg,
    mean,
    std,
    rt: Runtime,
    work_dir: Path,
    resume: bool = False,
    desc: str = "train",
    log=print,
    fingerprint_extra: dict | None = None,
) -> FitResult:
    """Train ``net`` in place; keep the weights of the best validation epoch.

    ``task``: classify (cross-entropy, selection on balanced accuracy) or regress
    (MSE or MSE+CCC, selection on mean CCC). ``work_dir`` holds ``checkpoint.pt``.
    """
    tc, bc = cfg.train, cfg.balance
    torch.manual_seed(tc.seed)
    np.random.seed(tc.seed)
    net.to(rt.device)
    if rt.channels_last:
        net.to(memory_format=torch.channels_last)
    ok = data.images.ok[data.train_idx]
    n_skipped = int((~ok).sum())
    train_idx, train_y = data.train_idx[ok], data.train_y[ok]
    soft = data.train_soft[ok] if data.train_soft is not None and tc.soft_targets else None
    vok = data.images.ok[data.val_idx]
    val_idx, val_y = data.val_idx[vok], data.val_y[vok]
    if len(train_idx) == 0:
        raise UserError(f"{desc}: no training images")
    n_classes = len(data.class_names) if task == "classify" else 2

    n_frozen = getattr(net, "n_frozen_blocks", 0)
    # the frozen prefix of the trunk is computed once per (face, view); DDP trains through its wrapper
    use_cache = n_frozen > 0 and tc.feature_cache and rt.world == 1
    trainable = [p for p in net.parameters() if p.requires_grad]
    opt = make_optimizer(trainable, tc, rt.device)
    steps = max(1, math.ceil(len(epoch_plan(train_y, bc, tc.seed, 0)[0]) / (tc.batch_size * rt.world)))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(tc, steps))
    scaler = torch.amp.GradScaler(rt.device.type, enabled=rt.amp_dtype is torch.float16)
    model = net
    if rt.world > 1:
        model = nn.parallel.DistributedDataParallel(
            net, device_ids=[rt.device.index] if rt.device.type == "cuda" else None
        )
    if tc.compile:
        model = torch.compile(model)

    history: list[dict] = []
    best = {"metric": -math.inf, "epoch": -1, "state": None}
    start_epoch, bad_epochs = 0, 0
    work_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = work_dir / "checkpoint.pt"
    fingerprint = resume_fingerprint(cfg, train_idx, val_idx, fingerprint_extra)
    if resume and ckpt_path.is_file():
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        changed = [
            k
            for k in sorted(set(fingerprint) | set(ck.get("fingerprint", {})))
            if fingerprint.get(k) != ck.get("fingerprint", {}).get(k)
        ]
        if changed:
            shown = ", ".join(
                f"{k} ({ck.get('fingerprint', {}).get(k)!r} -> {fingerprint.get(k)!r})" for k in changed[:3]
            )
            raise UserError(
                f"{desc}: cannot resume {ckpt_path}: the run was started with other settings: {shown}"
                + (f" and {len(changed) - 3} more" if len(changed) > 3 else "")
                + "; resume with the same config, or start afresh without --resume"
            )
        net.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        scaler.load_state_dict(ck["scaler"])
        history, start_epoch, bad_epochs = ck["history"], ck["epoch"] + 1, ck["bad_epochs"]
        best = {"metric": ck["best_metric"], "epoch": ck["best_epoch"], "state": ck["best_state"]}
        torch.set_rng_state(ck["rng_cpu"])
        if rt.is_main:
            log(f"{desc}: resumed after epoch {ck['epoch'] + 1}")
    elif resume and rt.is_main:
        log(f"{desc}: no checkpoint in {work_dir}, starting fresh")

    features = None
    if use_cache:
        features = _feature_cache(net, data.images, train_idx, val_idx, mean, std, rt, tc, bc, desc, log)

    t0 = time.time()
    with _SigTerm():
        try:
            for epoch in range(start_epoch, tc.epochs):
                plan, copy = epoch_plan(train_y, bc, tc.seed, epoch)
                eff_counts = np.bincount(train_y[plan], minlength=n_classes) if task == "classify" else None
                weight = class_weights(eff_counts, bc, data.class_names) if task == "classify" else None
                wt = torch.tensor(weight, dtype=torch.float32, device=rt.device) if weight is not None else None
                gen = torch.Generator(device=rt.device).manual_seed(tc.seed * 100003 + epoch)
                model.train()
                tot, nb, seen = 0.0, 0, 0
                t_ep = time.time()
                stats: dict = {}
                if features is not None:
                    batches = _feature_batches(features, plan, copy, tc.batch_size, tc.seed, epoch, rt.device)
                else:
                    batches = _image_batches(
                        data.images,
                        train_idx,
                        plan,
                        copy,
                        tc,
                        bc,
                        rt,
                        gen,
                        mean,
                        std,
                        epoch,
                        cfg.data.num_workers,
                        stats,
                    )
                bar = tqdm(
                    batches,
                    total=steps,
                    desc=f"{desc} {epoch + 1}/{tc.epochs}",
                    leave=False,
                    disable=None if rt.is_main else True,
                )
                for x, pos in bar:
                    y_idx = plan[pos]
                    with rt.autocast():
                        out = (net.tail(x) if features is not None else model(x)).float()
                    if task == "classify":
                        if soft is not None:
                            tgt = torch.as_tensor(soft[y_idx], dtype=torch.float32, device=rt.device)
                        else:
                            tgt = torch.as_tensor(train_y[y_idx], dtype=torch.long, device=rt.device)
                        loss = F.cross_entropy(out, tgt, weight=wt, label_smoothing=tc.label_smoothing)
                    else:
                        tgt = torch.as_tensor(train_y[y_idx], dtype=torch.float32, device=rt.device)
                        loss = F.mse_loss(out, tgt)
                        if tc.loss == "mse+ccc":
                            loss = loss + ccc_loss(out, tgt)
                        elif tc.loss != "mse":
                            raise UserError(f"train.loss must be mse or mse+ccc, got {tc.loss!r}")
                    if not torch.isfinite(loss):
                        raise UserError(
                            f"{desc}: loss became {loss.item()} at epoch {epoch + 1}; "
                            f'lower train.lr or use train.precision = "fp32"'
                        )
                    opt.zero_grad(set_to_none=True)
                    scaler.scale(loss).backward()
                    scaler.step(opt)
                    scaler.update()
                    sched.step()
                    tot += loss.item()
                    nb += 1
                    seen += len(pos)
                    bar.set_postfix(loss=f"{tot / nb:.4f}")
                train_secs = time.time() - t_ep
                row = {
                    "epoch": epoch + 1,
                    "train_loss": tot / max(1, nb),
                    "lr": opt.param_groups[0]["lr"],
                    "images_per_s": seen * rt.world / max(1e-9, train_secs),
                }
                if stats.get("skipped"):
                    row["skipped_unreadable"] = stats["skipped"]
                    n_skipped = max(n_skipped, stats["skipped"])
                if eff_counts is not None:
                    row["class_counts"] = " ".join(f"{c}:{int(k)}" for c, k in zip(data.class_names, eff_counts))
                metric = math.nan
                if rt.is_main and len(val_idx):
                    vm = evaluate(
                        net,
                        task,
                        data.images,
                        val_idx,
                        val_y,
                        data.class_names,
                        mean,
                        std,
                        rt,
                        features["val"] if features is not None else None,
                    )
                    metric = (
                        vm["balanced_accuracy"] if task == "classify" else (vm["ccc_valence"] + vm["ccc_arousal"]) / 2
                    )
                    row.update({f"val_{k}": v for k, v in vm.items() if isinstance(v, float)})
                row["val_metric"] = metric
                if rt.world > 1:
                    t = torch.tensor([metric if rt.is_main else 0.0], dtype=torch.float64, device=rt.device)
                    torch.distributed.broadcast(t, 0)
                    metric = float(t.item())
                no_val = len(val_idx) == 0
                if no_val and epoch == start_epoch and rt.is_main:
                    log(
                        f"{desc}: no validation faces, so no model selection or early stopping: "
                        f"the last epoch's weights are kept"
                    )
                # without validation faces the newest epoch is the one to keep; a NaN metric otherwise never wins
                improved = no_val or (not math.isnan(metric) and metric > best["metric"]) or best["state"] is None
                if improved:
                    best = {
                        "metric": metric,
                        "epoch": epoch + 1,
                        "state": {k: v.detach().cpu().clone() for k, v in net.state_dict().items()},
                    }
                    bad_epochs = 0
                elif not no_val:
                    bad_epochs += 1
                history.append(row)
                if rt.is_main:
                    log(
                        f"{desc} epoch {epoch + 1}/{tc.epochs}: loss {row['train_loss']:.4f}"
                        + (
                            f", val {'bal.acc' if task == 'classify' else 'CCC'} {metric:.4f}"
                            if not math.isnan(metric)
                            else ""
                        )
                        + f", {row['images_per_s']:.0f} img/s"
                        + (f", classes {row['class_counts']}" if epoch == start_epoch and "class_counts" in row else "")
                    )
                    write_history(history, work_dir / "history.csv")
                    _atomic_torch_save(
                        {
                            "model": net.state_dict(),
                            "optimizer": opt.state_dict(),
                            "scheduler": sched.state_dict(),
                            "scaler": scaler.state_dict(),
                            "epoch": epoch,
                            "history": history,
                            "bad_epochs": bad_epochs,
                            "best_metric": best["metric"],
                            "best_epoch": best["epoch"],
                            "best_state": best["state"],
                            "rng_cpu": torch.get_rng_state(),
                            "fingerprint": fingerprint,
                        },
                        ckpt_path,
                    )
                if tc.patience and bad_epochs >= tc.patience:
                    if rt.is_main:
                        log(f"{desc}: early stop, no improvement for {tc.patience} epochs")
                    break
                if tc.max_minutes and (time.time() - t0) / 60 > tc.max_minutes:
                    if rt.is_main:
                        log(f"{desc}: stopping after {tc.max_minutes} min (train.max_minutes)")
                    break
        except KeyboardInterrupt:
            raise TrainingInterrupted(
                f"{desc} interrupted; the last complete epoch is saved in {ckpt_path}: "
                f"run the same command with --resume to continue"
            ) from None
    if best["state"] is None:
        best["state"] = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
    net.load_state_dict(best["state"])
    return FitResult(best["state"], history, best["epoch"], best["metric"], n_skipped)


# settings a run may change between an interruption and --resume; any other change is refused
_RESUMABLE = {
    "train.epochs",
    "train.max_minutes",
    "train.patience",
    "train.device",
    "train.threads",
    "train.compile",
    "data.num_workers",
    "data.cache",
    "data.cache_dir",
    "data.strict",
}


def resume_fingerprint(cfg, train_idx: np.ndarray, val_idx: np.ndarray, extra: dict | None = None) -> dict:
    """What a checkpoint (or a finished stage) must agree on with the command that resumes it:
    the settings, which faces train and validate it, and ``extra`` (e.g. the trunk it builds
    on, the neighborhoods an expert belongs to). Flat and JSON-able."""
    flat = {
        f"{sec}.{k}": v
        for sec in ("data", "model", "train", "balance")
        for k, v in dataclasses.asdict(getattr(cfg, sec)).items()
    }
    keep = {
        k: (json.dumps(v, sort_keys=True) if isinstance(v, (dict, list)) else v)
        for k, v in flat.items()
        if k not in _RESUMABLE
    }
    faces = hashlib.sha256(np.asarray(train_idx, np.int64).tobytes() + b"|" + np.asarray(val_idx, np.int64).tobytes())
    return {
        **keep,
        "training faces": int(len(train_idx)),
        "validation faces": int(len(val_idx)),
        "which faces": faces.hexdigest()[:16],
        **(extra or {}),
    }


def _image_batches(images, train_idx, plan, copy, tc, bc, rt, gen, mean, std, epoch, workers, stats=None):
    """Augmented, normalised image batches: (x, positions into plan). Faces that fail to decode
    on the fly (``data.cache = "none"``) are skipped and counted in ``stats["skipped"]``."""
    loader = _loader(images, train_idx[plan], tc.batch_size, rt, tc.seed * 1000 + epoch, workers)
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


def evaluate(net, task, images, idx, y, class_names, mean, std, rt, val_features=None) -> dict:
    if val_features is not None:
        with torch.no_grad(), rt.autocast():
            out = torch.cat(
                [net.eval().tail(v.to(rt.device)).float().cpu() for v in torch.split(val_features, 1024)]
            ).numpy()
    else:
        out, _ = predict_outputs(net, images, idx, mean, std, rt)
    if task == "classify":
        m = classification_metrics(y, out.argmax(1), class_names)
        return {k: v for k, v in m.items() if k in ("accuracy", "balanced_accuracy", "macro_f1")}
    return regression_metrics(y, out)


# --------------------------------------------------------------------------- feature cache


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


@torch.no_grad()
def feature_store(net, images, mean, std, rt: Runtime, views, log=print, desc: str = "") -> list[np.ndarray]:
    """The frozen blocks' output for every face and view, fp16, memory-mapped from disk.

    Keyed by the trunk's weights, the faces and the view, so stage 1, its out-of-fold refits
    and every expert built on one trunk share one cache. Returns one (n, C, h, w) array per view.
    """
    from stages.backbones import state_digest

    root = Path(getattr(images, "cache_dir", "artifacts/cache")) / "features"
    root.mkdir(parents=True, exist_ok=True)
    frozen = net.trunk[: net.n_frozen_blocks]
    trunk_key = f"{state_digest(frozen)[:16]}-b{net.n_frozen_blocks}"
    out = []
    net.eval()
    for name, flip, angle in views:
        path = root / f"{trunk_key}-{images.digest}-{name}.npy"
        if not path.is_file():
            t0 = time.time()
            tmp = path.with_name(path.name + f".tmp{os.getpid()}.npy")
            arr = None
            loader = _loader(
                images, np.arange(len(images)), 256, Runtime(rt.device, rt.amp_dtype, rt.channels_last), None, 0
            )
            for xb, jb, _ in loader:
                j = jb.numpy()
                x = to_input(xb, rt)
                f = torch.as_tensor(flip[j], device=rt.device, dtype=torch.float32)
                a = torch.as_tensor(np.radians(angle[j]), device=rt.device, dtype=torch.float32)
                if bool((f != 0).any() or (a != 0).any()):
                    sign = 1 - 2 * f
                    cos, sin, z = torch.cos(a), torch.sin(a), torch.zeros_like(a)
                    theta = torch.stack(
                        [torch.stack([cos * sign, -sin, z], 1), torch.stack([sin * sign, cos, z], 1)], 1
                    )
                    x = F.grid_sample(
                        x,
                        F.affine_grid(theta, list(x.shape), align_corners=False),
                        padding_mode="reflection",
                        align_corners=False,
                    )
                x = normalize(x, mean, std)
                if rt.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                with rt.autocast():
                    feat = frozen(x).to(torch.float16).cpu().numpy()  # halve the copy off the device
                if arr is None:
                    need = len(images) * feat[0].nbytes
                    free = shutil.disk_usage(root).free
                    if need > 0.95 * free:
                        raise UserError(
                            f"the feature cache view '{name}' needs {need / 1e9:.1f} GB under {root} and "
                            f"{free / 1e9:.1f} GB are free: set train.feature_cache = false, fewer "
                            f"train.transform_views, or data.cache_dir on a larger disk"
                        )
                    arr = np.lib.format.open_memmap(
                        tmp, mode="w+", dtype=np.float16, shape=(len(images),) + feat.shape[1:]
                    )
                arr[j] = feat
            arr.flush()
            del arr
            os.replace(tmp, path)
            if rt.is_main:
                log(
                    f"{desc}: feature cache '{name}' of the frozen trunk for {len(images)} faces, "
                    f"{path.stat().st_size / 1e6:.1f} MB, {time.time() - t0:.1f}s"
                )
        out.append(np.load(path, mmap_mode="r"))
    return out


def _feature_cache(net, images, train_idx, val_idx, mean, std, rt, tc, bc, desc, log) -> dict:
    views = feature_views(len(images), tc, bc)
    store = feature_store(net, images, mean, std, rt, views, log, desc)
    val = torch.from_numpy(np.asarray(store[0][val_idx], dtype=np.float32)) if len(val_idx) else None
    return {
        "views": store,
        "train_rows": train_idx,
        "val": val,
        "transform_views": np.flatnonzero([name.startswith("transform") for name, _, _ in views]),
        "n_plain": 2 if len(views) >= 2 and views[1][0] == "flip" and tc.augment else 1,
    }


def _feature_batches(features, plan, copy, batch_size, seed, epoch, device):
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


def write_history(history: list[dict], path: Path) -> None:
    keys: list[str] = []
    for row in history:
        keys += [k for k in row if k not in keys]
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(history)
    os.replace(tmp, path)
