"""The one training loop, for every neural stage (stage 1, flat, experts).

Nothing here knows about emotions: a stage hands in a network, a task (:mod:`ensemble.tasks`),
the indices and targets of its training and validation faces. :func:`fit` runs epochs of
:func:`train_one_epoch`, :func:`evaluate` on validation, and a :class:`BestTracker` that keeps
the best epoch's weights and says when to stop; after every epoch ``history.csv`` and a
checkpoint (:mod:`ensemble.checkpoints`) from which ``resume`` continues. Device and precision
come decided (:mod:`ensemble.runtime`); the batches come from :mod:`ensemble.batches` or, when
the first blocks are frozen, from :mod:`ensemble.feature_cache`.
"""

from __future__ import annotations

import contextvars
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from .batches import StageData, epoch_plan, image_batches, make_loader, normalize, to_input
from .checkpoints import damaged_checkpoint, load_checkpoint, resume_fingerprint, save_checkpoint, write_history
from .errors import UserError
from .feature_cache import feature_batches, feature_cache
from .runtime import Runtime, StopOnSigterm
from .tasks import Task

__all__ = ["StageData", "FitResult", "TrainingInterrupted", "BestTracker", "fit", "train_one_epoch", "evaluate"]


class TrainingInterrupted(Exception):
    """Ctrl-C or SIGTERM: the last complete epoch is checkpointed; rerun with --resume."""


# an observer of every epoch's validation metric, ``hook(epoch, metric)``, called after the
# epoch is checkpointed; it may raise to stop the fit (``ensemble tune`` prunes trials this way)
ON_EPOCH: contextvars.ContextVar = contextvars.ContextVar("ON_EPOCH", default=None)


@dataclass
class FitResult:
    state_dict: dict
    history: list[dict]
    best_epoch: int
    best_metric: float
    n_skipped: int


class BestTracker:
    """Which epoch was best, and when to stop (patience epochs without improvement).

    Without validation faces there is no selection: the newest epoch is kept and nothing stops
    early. A NaN metric never wins (but the first epoch is always kept, so there is a best).
    """

    def __init__(self, patience: int, has_validation: bool):
        self.patience, self.has_validation = patience, has_validation
        self.best_metric, self.best_epoch, self.best_state, self.bad_epochs = -math.inf, -1, None, 0

    def update(self, metric: float, epoch: int, net: nn.Module) -> bool:
        """Record epoch ``epoch`` (1-based) with validation ``metric``; True when it is the new best."""
        improved = (
            not self.has_validation or (not math.isnan(metric) and metric > self.best_metric) or self.best_state is None
        )
        if improved:
            self.best_metric, self.best_epoch, self.bad_epochs = metric, epoch, 0
            self.best_state = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
        elif self.has_validation:
            self.bad_epochs += 1
        return improved

    @property
    def should_stop(self) -> bool:
        return bool(self.patience) and self.bad_epochs >= self.patience

    def state_dict(self) -> dict:
        return {
            "best_metric": self.best_metric,
            "best_epoch": self.best_epoch,
            "best_state": self.best_state,
            "bad_epochs": self.bad_epochs,
        }

    def load_state_dict(self, state: dict) -> None:
        self.best_metric, self.best_epoch = state["best_metric"], state["best_epoch"]
        self.best_state, self.bad_epochs = state["best_state"], state["bad_epochs"]


def lr_factor(train_cfg, steps_per_epoch: int):
    """The learning-rate multiplier per step: linear warm-up, then cosine, step or constant."""
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
    else:  # sgd (config._RULES allows nothing else)
        cls, kw = (
            torch.optim.SGD,
            {"momentum": tc.momentum, "weight_decay": tc.weight_decay, "nesterov": tc.nesterov and tc.momentum > 0},
        )
    if device.type in ("cuda", "cpu"):
        try:
            return cls(params, lr=tc.lr, fused=True, **kw)
        except (RuntimeError, TypeError):
            pass  # no fused kernel in this build
    return cls(params, lr=tc.lr, **kw)


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
    """Raw outputs (n, n_out) float32 for faces ``idx``, and a mask of those that decoded. The
    network runs where the runtime puts the faces (a network just loaded from disk is on the CPU)."""
    net.to(rt.device).eval()
    outs = []
    ok_all = np.zeros(len(idx), dtype=bool)
    loader = make_loader(images, idx, batch_size, rt.single_process(), None, workers)
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


def evaluate(net, task, images, idx, y, class_names, mean, std, rt, features=None) -> dict:
    """``task``'s metrics of ``net`` on faces ``idx`` with targets ``y``; faces that do not decode
    are left out. ``features``: the faces' cached frozen-trunk output, run through the tail."""
    if features is not None:
        with torch.no_grad(), rt.autocast():
            net.to(rt.device).eval()
            out = torch.cat([net.tail(v.to(rt.device)).float().cpu() for v in torch.split(features, 1024)])
        out = out.numpy()
    else:
        out, ok = predict_outputs(net, images, idx, mean, std, rt)
        out, y = out[ok], y[ok]
    return task.metrics(y, out, class_names)


@dataclass
class Optimization:
    """Optimizer, learning-rate schedule and gradient scaler: one step per batch, one state to save."""

    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler

    def step(self, loss: torch.Tensor) -> None:
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.opt)
        self.scaler.update()
        self.sched.step()

    @property
    def lr(self) -> float:
        return self.opt.param_groups[0]["lr"]

    def state_dict(self) -> dict:
        return {
            "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(),
            "scaler": self.scaler.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])


def train_one_epoch(
    forward, task, batches, targets, weight, optim: Optimization, rt, train_cfg, bar, desc: str
) -> dict:
    """One pass over ``batches`` of (x, positions): ``forward``, ``task.loss``, one optimizer step each.

    ``forward``: the network (in train mode), or its trainable tail when ``batches`` come from the
    feature cache; ``targets[pos]``: a batch's targets; ``bar``: a tqdm bar, updated per batch;
    ``desc``: names the epoch in errors.
    Returns the mean loss and the number of faces seen.
    """
    total, n_batches, seen = 0.0, 0, 0
    for x, pos in batches:
        with rt.autocast():
            out = forward(x).float()
        loss = task.loss(out, targets[pos], weight, train_cfg)
        if not torch.isfinite(loss):
            raise UserError(f'{desc}: loss became {loss.item()}; lower train.lr or use train.precision = "fp32"')
        optim.step(loss)
        total += loss.item()
        n_batches += 1
        seen += len(pos)
        bar.set_postfix(loss=f"{total / n_batches:.4f}")
        bar.update(1)
    return {"train_loss": total / max(1, n_batches), "seen": seen}


@dataclass
class _Run:
    """What every epoch of one :func:`fit` shares."""

    net: nn.Module
    model: nn.Module  # net, or its DDP / compiled wrapper
    task: Task
    data: StageData  # the faces that decode only
    targets: np.ndarray  # training targets, row per data.train_idx
    cfg: object
    mean: tuple
    std: tuple
    rt: Runtime
    optim: Optimization
    steps: int  # batches per epoch
    desc: str
    features: dict | None  # the feature cache, when the first blocks are frozen


def fit(
    net: nn.Module,
    task: Task,
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
    """Train ``net`` in place for ``task``; keep the best validation epoch's weights.
    ``work_dir`` holds ``checkpoint.pt`` and ``history.csv``."""
    tc = cfg.train
    run = _setup(net, task, data, cfg, mean, std, rt, desc, log)
    tracker = BestTracker(tc.patience, has_validation=len(run.data.val_idx) > 0)
    ckpt_path = work_dir / "checkpoint.pt"
    fingerprint = resume_fingerprint(cfg, run.data.train_idx, run.data.val_idx, fingerprint_extra)
    work_dir.mkdir(parents=True, exist_ok=True)
    history, start_epoch = _resume(run, tracker, ckpt_path, fingerprint, log) if resume else ([], 0)
    if not tracker.has_validation and start_epoch < tc.epochs:
        _say(
            rt,
            log,
            f"{desc}: no validation faces, so no model selection or early stopping: the last epoch's weights are kept",
        )
    n_skipped, t0 = int((~data.images.ok[data.train_idx]).sum()), time.time()
    with StopOnSigterm():
        try:
            for epoch in range(start_epoch, tc.epochs):
                row = _train_epoch(run, epoch)
                n_skipped = max(n_skipped, row.get("skipped_unreadable", 0))
                row["val_metric"] = _validate(run, row)
                tracker.update(row["val_metric"], epoch + 1, net)
                history.append(row)
                if rt.is_main:
                    log(_epoch_line(desc, row, tc.epochs, task, show_counts=epoch == start_epoch))
                    write_history(history, work_dir / "history.csv")
                    save_checkpoint(
                        {
                            "model": net.state_dict(),
                            **run.optim.state_dict(),
                            **tracker.state_dict(),
                            "epoch": epoch,
                            "history": history,
                            "rng_cpu": torch.get_rng_state(),
                            "fingerprint": fingerprint,
                        },
                        ckpt_path,
                    )
                if (hook := ON_EPOCH.get()) is not None:
                    hook(epoch + 1, row["val_metric"])
                if tracker.should_stop:
                    _say(rt, log, f"{desc}: early stop, no improvement for {tc.patience} epochs")
                    break
                if tc.max_minutes and (time.time() - t0) / 60 > tc.max_minutes:
                    _say(rt, log, f"{desc}: stopping after {tc.max_minutes} min (train.max_minutes)")
                    break
        except KeyboardInterrupt:
            raise TrainingInterrupted(
                f"{desc} interrupted; the last complete epoch is saved in {ckpt_path}: "
                "run the same command with --resume to continue"
            ) from None
    if tracker.best_state is None:  # resumed after the last epoch: nothing trained, nothing recorded
        tracker.best_state = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
    net.load_state_dict(tracker.best_state)
    return FitResult(tracker.best_state, history, tracker.best_epoch, tracker.best_metric, n_skipped)


def _setup(net, task, data, cfg, mean, std, rt, desc, log) -> _Run:
    """Seed, place the network, keep the faces that decode, build the optimizer and, for a
    frozen prefix of the trunk, the feature cache."""
    tc, bc = cfg.train, cfg.balance
    torch.manual_seed(tc.seed)
    net.to(rt.device)
    if rt.channels_last:
        net.to(memory_format=torch.channels_last)
    ok, vok = data.images.ok[data.train_idx], data.images.ok[data.val_idx]
    kept = StageData(
        data.images, data.train_idx[ok], data.train_y[ok], data.val_idx[vok], data.val_y[vok], data.class_names
    )
    if len(kept.train_idx) == 0:
        raise UserError(f"{desc}: no training images")
    steps = max(1, math.ceil(len(epoch_plan(kept.train_y, bc, tc.seed, 0)[0]) / (tc.batch_size * rt.world)))
    optim = make_optimization(net, tc, rt, steps)
    model = _wrap(net, rt, tc)
    features = None
    # the frozen prefix of the trunk is computed once per (face, view); DDP trains through its wrapper
    if getattr(net, "n_frozen_blocks", 0) > 0 and tc.feature_cache and rt.world == 1:
        features = feature_cache(
            net, data.images, kept.train_idx, kept.val_idx, mean, std, rt, tc, bc, desc, log, train_y=kept.train_y
        )
        # building the cache draws from torch's generator (its loaders' seeds): training (dropout)
        # must not depend on whether this run built the cache or found it on disk
        torch.manual_seed(tc.seed)
    return _Run(net, model, task, kept, task.targets(data, ok, tc), cfg, mean, std, rt, optim, steps, desc, features)


def _resume(run: _Run, tracker: BestTracker, ckpt_path: Path, fingerprint: dict, log) -> tuple[list, int]:
    """Load the checkpoint, if any, into the network, optimizer and tracker: (history, next epoch)."""
    if not ckpt_path.is_file():
        _say(run.rt, log, f"{run.desc}: no checkpoint in {ckpt_path.parent}, starting fresh")
        return [], 0
    ck = load_checkpoint(ckpt_path, fingerprint, run.desc)
    try:
        run.net.load_state_dict(ck["model"])
        run.optim.load_state_dict(ck)
        tracker.load_state_dict(ck)
        torch.set_rng_state(ck["rng_cpu"])
        history, start = ck["history"], ck["epoch"] + 1
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise damaged_checkpoint(ckpt_path, run.desc, exc) from None
    _say(run.rt, log, f"{run.desc}: resumed after epoch {start}")
    return history, start


def _train_epoch(run: _Run, epoch: int) -> dict:
    """Plan the epoch (balance, class weights), build its batches, train; the history row."""
    tc, bc, rt, data = run.cfg.train, run.cfg.balance, run.rt, run.data
    plan, copy = epoch_plan(data.train_y, bc, tc.seed, epoch)
    counts, weight = run.task.epoch_weights(data.train_y[plan], data.class_names, bc)
    gen = torch.Generator(device=rt.device).manual_seed(tc.seed * 100003 + epoch)
    stats: dict = {}
    if run.features is not None:
        batches = feature_batches(run.features, plan, copy, tc.batch_size, tc.seed, epoch, rt.device)
        forward = run.net.tail
    else:
        batches = image_batches(
            data.images,
            data.train_idx,
            plan,
            copy,
            tc,
            bc,
            rt,
            gen,
            run.mean,
            run.std,
            epoch,
            run.cfg.data.num_workers,
            stats,
        )
        forward = run.model
    run.model.train()
    t = time.time()
    where = f"{run.desc} {epoch + 1}/{tc.epochs}"
    with tqdm(total=run.steps, desc=where, leave=False, disable=None if rt.is_main else True) as bar:
        weight = None if weight is None else torch.tensor(weight, dtype=torch.float32, device=rt.device)
        done = train_one_epoch(forward, run.task, batches, run.targets[plan], weight, run.optim, rt, tc, bar, where)
    row = {
        "epoch": epoch + 1,
        "train_loss": done["train_loss"],
        "lr": run.optim.lr,
        "images_per_s": done["seen"] * rt.world / max(1e-9, time.time() - t),
    }
    if stats.get("skipped"):
        row["skipped_unreadable"] = stats["skipped"]
    if counts is not None:
        row["class_counts"] = " ".join(f"{c}:{int(k)}" for c, k in zip(data.class_names, counts))
    return row


def _validate(run: _Run, row: dict) -> float:
    """Rank 0 evaluates on validation (metrics go into ``row``); every rank gets the selection metric."""
    metric, data, rt = math.nan, run.data, run.rt
    if rt.is_main and len(data.val_idx):
        features = run.features["val"] if run.features is not None else None
        vm = evaluate(
            run.net, run.task, data.images, data.val_idx, data.val_y, data.class_names, run.mean, run.std, rt, features
        )
        metric = run.task.selection(vm)
        keep = run.task.history_metrics
        row.update({f"val_{k}": v for k, v in vm.items() if isinstance(v, float) and (keep is None or k in keep)})
    if rt.world > 1:  # so that every rank selects and stops alike
        t = torch.tensor([metric if rt.is_main else 0.0], dtype=torch.float64, device=rt.device)
        torch.distributed.broadcast(t, 0)
        metric = float(t.item())
    return metric


def make_optimization(net: nn.Module, train_cfg, rt: Runtime, steps_per_epoch: int) -> Optimization:
    """Optimizer over the trainable parameters, its schedule, and a gradient scaler (fp16 only)."""
    opt = make_optimizer([p for p in net.parameters() if p.requires_grad], train_cfg, rt.device)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(train_cfg, steps_per_epoch))
    return Optimization(opt, sched, torch.amp.GradScaler(rt.device.type, enabled=rt.amp_dtype is torch.float16))


def _wrap(net: nn.Module, rt: Runtime, train_cfg) -> nn.Module:
    """The module the batches go through: DDP under torchrun, compiled with ``train.compile``."""
    model = net
    if rt.world > 1:
        model = nn.parallel.DistributedDataParallel(
            net, device_ids=[rt.device.index] if rt.device.type == "cuda" else None
        )
    return torch.compile(model) if train_cfg.compile else model


def _say(rt: Runtime, log, message: str) -> None:
    if rt.is_main:
        log(message)


def _epoch_line(desc: str, row: dict, epochs: int, task, show_counts: bool) -> str:
    metric = row["val_metric"]
    return (
        f"{desc} epoch {row['epoch']}/{epochs}: loss {row['train_loss']:.4f}"
        + (f", val {task.metric_label} {metric:.4f}" if not math.isnan(metric) else "")
        + f", {row['images_per_s']:.0f} img/s"
        + (f", classes {row['class_counts']}" if show_counts and "class_counts" in row else "")
    )
