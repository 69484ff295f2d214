"""Train, evaluate, publish and load one neural stage (stage 1, flat, an expert).

Stages differ only in their data subset, targets, head size and config; this module is the
part they share. A stage trained with ``model.trunk_from`` builds on another stage's trunk,
frozen: its ``weights.pt`` holds the head only and its meta names the trunk it needs, so
the whole hierarchy stores (and, at inference, runs) that trunk once. An expert may also own
copies of the trunk's last blocks (``experts.model.trainable = "block4"``): they start as the
borrowed ones, learn from features cached at the boundary, and are stored with the head; at
inference the shared trunk runs up to the boundary once and each such expert runs its blocks
from there (:func:`first_own_block`).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path

import torch

from ensemble.artifacts import StageWriter, load_weights, read_meta
from ensemble.checkpoints import resume_fingerprint
from ensemble.crop import training_crop
from ensemble.engine import FitResult, StageData, evaluate, fit
from ensemble.errors import UserError
from ensemble.tasks import Task

from .backbones import (
    EmotionNet,
    build_model,
    check_input_size,
    describe_trainable,
    normalization,
    state_digest,
    trainable_counts,
)


def _trunk_source(run: Path, stage: str) -> tuple[dict, str]:
    folder = run / stage
    if not (folder / "meta.json").is_file():
        raise UserError(
            f'this stage builds on the {stage} model\'s trunk (model.trunk_from = "{stage}") and '
            f'{folder} has none: run ensemble fit-{stage} first, or set model.trunk_from = ""'
        )
    meta = read_meta(folder, f"stage {stage!r} (model.trunk_from)")
    state = load_weights(folder)
    if meta.get("trunk_from"):
        raise UserError(
            f"model.trunk_from = {stage!r}, but {stage} itself borrows its trunk; name a stage that owns one"
        )
    trunk = {k[len("trunk.") :]: v for k, v in state.items() if k.startswith("trunk.")}
    return trunk, meta


def build_stage_net(cfg, n_out: int, run: Path) -> tuple[EmotionNet, dict]:
    """The network to train, with its trunk loaded from another stage when ``trunk_from`` says so."""
    mc = cfg.model
    if not mc.trunk_from:
        return build_model(mc, n_out), {}
    trunk_state, src_meta = _trunk_source(run, mc.trunk_from)
    # the trunk's architecture is the source stage's: take its backbone, not ours
    mc = type(mc)(**{**asdict(mc), "backbone": src_meta["backbone"], "pretrained": "none"})
    net = build_model(mc, n_out)
    net.trunk.load_state_dict(trunk_state, strict=True)
    net.freeze(mc.trainable)  # "head" unless the stage owns copies of the last blocks
    return net, src_meta


def first_own_block(meta: dict) -> int:
    """Index of the first trunk block a stage stores itself: 0 for a stage that owns its trunk;
    for one built on another's (``trunk_from``), the number of blocks it borrows (``trainable``
    head: all of them; blockN: N - 1; all: none)."""
    n = int(meta["n_blocks"])
    if not meta.get("trunk_from"):
        return 0
    trainable = meta.get("trainable", "head")
    if trainable == "head":
        return n
    if trainable == "all":
        return 0
    if trainable.startswith("block") and trainable[5:].isdigit() and 1 <= int(trainable[5:]) <= n:
        return int(trainable[5:]) - 1
    raise ValueError(f"trainable {trainable!r} for a trunk of {n} blocks")


def own_params(net: EmotionNet, first_own: int) -> int:
    """Parameters a stage on a borrowed trunk adds: its own blocks and its head."""
    own = [*net.trunk[first_own:].parameters(), *net.head.parameters()]
    return sum(p.numel() for p in own)


def train_network(
    name: str,
    task: Task,
    cfg,
    data: StageData,
    out: Path,
    run: Path,
    rt,
    resume: bool,
    eval_sets: dict,
    extra_meta: dict | None = None,
    log=print,
    fingerprint_extra: dict | None = None,
    init_head: dict | None = None,
) -> dict:
    """Fit a stage, evaluate the best epoch on ``eval_sets`` ({split: (idx, y)}), publish ``out``.
    ``init_head``: the head's starting weights (a state_dict of the head), else a fresh head.

    Returns the metrics written to ``metrics.json``.
    """
    classes = task.output_names(data.class_names)
    n_out = len(classes)
    torch.manual_seed(cfg.train.seed)  # the initial weights come from train.seed, not from what ran before
    if cfg.model.trunk_from == name:
        raise UserError(
            f"{name} cannot build on its own trunk (model.trunk_from = {name!r}); set "
            f'{name}.model.trunk_from = "" or put trunk_from in the [stage1.model] / [experts.model] tables'
        )
    net, src_meta = build_stage_net(cfg, n_out, run)
    if init_head is not None:
        net.head.load_state_dict(init_head)
    check_input_size(net, cfg.data.image_size, src_meta.get("backbone", cfg.model.backbone))
    counts = trainable_counts(net)
    if rt.is_main:
        log(f"{name}: model.trainable = {cfg.model.trainable!r}: {describe_trainable(counts)}")
    backbone = src_meta.get("backbone", cfg.model.backbone)
    if src_meta:
        if src_meta["input_size"] != cfg.data.image_size:
            raise UserError(
                f"{name}: data.image_size {cfg.data.image_size} differs from trunk stage "
                f"{cfg.model.trunk_from} ({src_meta['input_size']})"
            )
        mean, std = tuple(src_meta["mean"]), tuple(src_meta["std"])
    else:
        mean, std = normalization(backbone)
    work = out.with_name(f".{out.name}.work")
    extra = {"trunk it builds on": src_meta.get("trunk_sha256", ""), **(fingerprint_extra or {})}
    fingerprint = resume_fingerprint(cfg, data.train_idx, data.val_idx, extra)
    if resume and not (work / "checkpoint.pt").is_file() and (out / "meta.json").is_file():
        done = read_meta(out, name)
        if done.get("fingerprint") == fingerprint and done.get("classes") == classes:
            log(f"{name}: already trained with these settings and data, kept ({out})")
            return json.loads((out / "metrics.json").read_text())
        raise UserError(
            f"{out} holds a finished {name} trained with other settings or data; "
            f"run the command without --resume to retrain it"
        )
    if not resume:
        if (work / "checkpoint.pt").is_file():  # an interrupted run's epochs are replaced: said first
            log(f"{name}: starting afresh over an interrupted run's checkpoint in {work} (--resume continues it)")
        shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    result: FitResult = fit(
        net, task, data, cfg, mean, std, rt, work, resume=resume, desc=name, log=log, fingerprint_extra=extra
    )
    metrics = {"best_epoch": result.best_epoch, "skipped_unreadable": result.n_skipped}
    if rt.is_main:
        for split, (idx, y) in eval_sets.items():
            if len(idx):
                metrics[split] = evaluate(net, task, data.images, idx, y, data.class_names, mean, std, rt)
        writer = StageWriter(out)
        state = net.state_dict()
        own = ("head.", *(f"trunk.{i}." for i in range(net.n_frozen_blocks, len(net.trunk))))
        if cfg.model.trunk_from:  # the head and the blocks it owns; the borrowed trunk stays in its stage
            state = {k: v for k, v in state.items() if k.startswith(own)}
        writer.save_weights(state)
        writer.json("config.json", cfg.to_dict())
        writer.json("metrics.json", metrics)
        writer.copy(work / "history.csv")
        meta = {
            "stage": name,
            "task": task.name,
            "classes": classes,
            "fingerprint": fingerprint,
            "input_size": cfg.data.image_size,
            "mean": list(mean),
            "std": list(std),
            "backbone": backbone,
            "head": cfg.model.head,
            "hidden": cfg.model.hidden,
            "dropout": cfg.model.dropout,
            "trainable": cfg.model.trainable,
            "pretrained": cfg.model.pretrained,
            "trunk_from": cfg.model.trunk_from,
            # a stage on a borrowed trunk names that trunk (its own blocks are in its weights.pt)
            "trunk_sha256": src_meta["trunk_sha256"] if src_meta else state_digest(net.trunk),
            "n_blocks": len(net.trunk),
            "seed": cfg.train.seed,
            "best_epoch": result.best_epoch,
            "n_train": int(len(data.train_idx)),
            **counts,
            **({"n_own_params": own_params(net, net.n_frozen_blocks)} if cfg.model.trunk_from else {}),
            "crop": training_crop(data.images.boxes[i] for i in data.train_idx.tolist()),
            **(extra_meta or {}),
        }
        writer.publish(meta)
        shutil.rmtree(work, ignore_errors=True)
    if rt.world > 1:
        torch.distributed.barrier()
    return metrics


def load_network(folder: Path, run: Path | None = None, sources: dict | None = None) -> tuple[EmotionNet, dict]:
    """A trained stage, verified, in eval mode on the CPU, and its meta.

    ``sources``: a dict shared by the calls that load one run, so that each stage folder is
    verified and read once, and a trunk several stages borrow (the flat model's, for stage 1 and
    every expert, and the flat model itself) is one set of tensors, not a copy per stage."""
    sources = {} if sources is None else sources

    def read(f: Path, what: str = "stage") -> tuple[dict, dict]:
        if f not in sources:
            meta = read_meta(f, what)
            sources[f] = meta, load_weights(f)
        return sources[f]

    meta, state = read(folder)
    if meta.get("trunk_from"):
        src = (run or folder.parent) / meta["trunk_from"]
        src_meta, src_state = read(src, f"trunk stage {meta['trunk_from']!r} of {folder.name}")
        if src_meta.get("trunk_sha256") != meta.get("trunk_sha256"):
            raise UserError(f"{folder} was trained on another {meta['trunk_from']} trunk than the one in {src}")
        state = {**{k: v for k, v in src_state.items() if k.startswith("trunk.")}, **state}
    from ensemble.config import ModelConfig

    mc = ModelConfig(
        backbone=meta["backbone"],
        pretrained="none",
        head=meta["head"],
        hidden=meta["hidden"],
        dropout=meta["dropout"],
        trainable="all",
    )
    # built on the meta device: no memory and no random initialisation for what the state_dict
    # replaces; assign=True takes the loaded tensors as they are (a trunk several stages borrow
    # is one set of tensors)
    with torch.device("meta"):
        net = build_model(mc, len(meta["classes"]))
    try:
        net.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        detail = lines[1] if len(lines) > 1 else lines[0] if lines else "mismatch"  # past "Error(s) in loading…:"
        raise UserError(f"{folder}/weights.pt does not fit its meta.json: {detail}") from None
    if any(t.is_meta for t in [*net.parameters(), *net.buffers()]):  # a buffer the state_dict does not hold
        net = build_model(mc, len(meta["classes"]))
        net.load_state_dict(state, strict=True)
    return net.eval(), meta
