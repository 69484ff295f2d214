"""Training throughput per stage, with and without the feature cache.

    python benchmarks/training.py [--config configs/ferplus-cpu.toml] [--steps 30] [--set k=v ...]
                                  [--run RUN]   # a run whose expert sizes and flat trunk to use

Measures images/s of: the flat model's training step (as configured); a head trained on the
frozen trunk reading images (no cache); building the feature cache; a head trained from the
cache. From those and the config's epochs it projects the wall time of fit-flat + fit-experts
with and without the cache. With --run and --check-epochs N, it also trains stage 1's head on
the run's flat trunk both ways for N epochs and reports the validation CCC of each.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import ROOT, save


def _rate(net, batches, opt, loss_fn, steps: int, rt, tail: bool) -> float:
    seen, t = 0, None
    for i, (x, _) in enumerate(batches):
        if i == 2:  # after warm-up
            t, seen = time.perf_counter(), 0
        with rt.autocast():
            out = (net.tail(x) if tail else net(x)).float()
        loss = loss_fn(out, torch.zeros(len(out), dtype=torch.long, device=out.device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        seen += len(x)
        if i >= steps + 1:
            break
    return seen / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "configs" / "ferplus-cpu.toml"))
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--run", default=None)
    ap.add_argument("--check-epochs", type=int, default=0)
    ap.add_argument("--out", default=None)
    ap.add_argument("--name", default="training")
    args = ap.parse_args()

    from ensemble.batches import epoch_plan, image_batches
    from ensemble.config import load_config
    from ensemble.engine import make_optimizer
    from ensemble.experiment import open_experiment
    from ensemble.feature_cache import feature_batches, feature_cache, feature_views
    from stages.backbones import build_model, normalization

    cfg = load_config(args.config, args.overrides)
    tmp = Path(tempfile.mkdtemp())
    exp = open_experiment(cfg, tmp / "run")
    rt = exp.rt
    tr = exp.idx("train")
    y = exp.manifest["label"].to_numpy()[tr]
    figures = {
        "config": args.config,
        "overrides": args.overrides,
        "device": str(rt.device),
        "precision": str(rt.amp_dtype),
        "image_size": cfg.data.image_size,
        "backbone": cfg.model.backbone,
    }
    mean, std = normalization(cfg.model.backbone)
    loss_fn = torch.nn.CrossEntropyLoss()

    # the flat model's step, as configured
    fc = cfg.for_stage("flat")
    net = build_model(fc.model, 8).to(rt.device)
    if rt.channels_last:
        net.to(memory_format=torch.channels_last)
    net.train()
    plan, copy = epoch_plan(y, fc.balance, 0, 0)
    gen = torch.Generator(device=rt.device).manual_seed(0)
    opt = make_optimizer([p for p in net.parameters() if p.requires_grad], fc.train, rt.device)
    figures["flat_step_img_s"] = _rate(
        net,
        image_batches(exp.images, tr, plan, copy, fc.train, fc.balance, rt, gen, mean, std, 0, 0),
        opt,
        loss_fn,
        args.steps,
        rt,
        False,
    )
    print(f"flat ({fc.model.backbone}, trainable {fc.model.trainable}): {figures['flat_step_img_s']:.0f} img/s")

    # a head on the frozen trunk (stage 1 / experts with trunk_from), without and with the cache
    ec = cfg.for_stage("experts")
    net.freeze("head")
    net.train()
    opt = make_optimizer([p for p in net.parameters() if p.requires_grad], ec.train, rt.device)
    plan, copy = epoch_plan(y, ec.balance, 0, 0)
    figures["head_no_cache_img_s"] = _rate(
        net,
        image_batches(exp.images, tr, plan, copy, ec.train, ec.balance, rt, gen, mean, std, 0, 0),
        opt,
        loss_fn,
        args.steps,
        rt,
        False,
    )
    t = time.perf_counter()
    n_views = len(feature_views(len(exp.images), ec.train, ec.balance))
    feats = feature_cache(
        net, exp.images, tr, np.array([], dtype=int), mean, std, rt, ec.train, ec.balance, "benchmark", print
    )
    build_s = time.perf_counter() - t
    figures["cache_build_s"] = build_s
    figures["cache_views"] = n_views
    figures["cache_build_img_s"] = len(exp.images) * n_views / build_s
    figures["head_cached_img_s"] = _rate(
        net,
        feature_batches(feats, plan, copy, ec.train.batch_size, 0, 0, rt.device),
        opt,
        loss_fn,
        max(args.steps, 200),
        rt,
        True,
    )
    print(
        f"head on frozen trunk: {figures['head_no_cache_img_s']:.0f} img/s from images, "
        f"{figures['head_cached_img_s']:.0f} img/s from the cache (built in {build_s:.1f}s, "
        f"{figures['cache_build_img_s']:.0f} img/s)"
    )

    # projection for fit-flat + fit-experts (stage 1 and OOF refits excluded: they gain as experts do)
    flat_imgs = fc.train.epochs * len(epoch_plan(y, fc.balance, 0, 0)[0])
    expert_faces = len(tr)
    if args.run and (Path(args.run) / "experts" / "index.json").is_file():
        expert_faces = sum(
            json.loads((p / "meta.json").read_text()).get("n_train", 0)
            for p in (Path(args.run) / "experts").glob("[0-9]*")
        )
    expert_imgs = ec.train.epochs * expert_faces * max(1.0, len(plan) / len(tr))
    flat_s = flat_imgs / figures["flat_step_img_s"]
    no_cache = flat_s + expert_imgs / figures["head_no_cache_img_s"]
    cached = flat_s + build_s + expert_imgs / figures["head_cached_img_s"]
    experts_only = (expert_imgs / figures["head_no_cache_img_s"]) / (
        build_s + expert_imgs / figures["head_cached_img_s"]
    )
    figures.update(
        {
            "projected_flat_plus_experts_s_no_cache": no_cache,
            "projected_flat_plus_experts_s_cache": cached,
            "speedup_flat_plus_experts": no_cache / cached,
            "speedup_experts_only": experts_only,
            "expert_faces": expert_faces,
        }
    )
    print(
        f"projected fit-flat + fit-experts: {no_cache / 60:.1f} min without the cache, {cached / 60:.1f} min with "
        f"(x{no_cache / cached:.2f}; experts alone x{experts_only:.1f})"
    )

    if args.run and args.check_epochs:
        from ensemble.engine import StageData, fit
        from ensemble.tasks import VA_REGRESSION
        from stages.neural import build_stage_net
        from stages.stage1 import va_targets

        exp.run = Path(args.run)
        va = va_targets(exp.manifest)
        vi = exp.idx("val")
        for use in (True, False):
            c = cfg.for_stage("stage1")
            c.train = type(c.train)(**{**c.train.__dict__, "epochs": args.check_epochs, "feature_cache": use})
            n, src = build_stage_net(c, 2, exp.run)
            t = time.perf_counter()
            r = fit(
                n,
                VA_REGRESSION,
                StageData(exp.images, tr, va[tr], vi, va[vi]),
                c,
                src["mean"],
                src["std"],
                rt,
                tmp / f"check{use}",
                log=lambda m: None,
            )
            figures[f"check_stage1_val_ccc_{'cache' if use else 'no_cache'}"] = r.best_metric
            figures[f"check_stage1_s_{'cache' if use else 'no_cache'}"] = time.perf_counter() - t
        print(
            f"stage 1 head, {args.check_epochs} epochs: val mean CCC {figures['check_stage1_val_ccc_cache']:.4f} with "
            f"the cache ({figures['check_stage1_s_cache']:.0f}s), {figures['check_stage1_val_ccc_no_cache']:.4f} "
            f"without ({figures['check_stage1_s_no_cache']:.0f}s)"
        )
    save(args.name, figures, args.out)


if __name__ == "__main__":
    main()
