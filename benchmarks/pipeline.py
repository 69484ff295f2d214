"""Input pipeline: images/s the loader delivers vs images/s a training step consumes, and
the memory of `ensemble prepare` on a large manifest.

    python benchmarks/pipeline.py [--config configs/ferplus-cpu.toml] [--rows 300000]

1. Loader: batches from the prepared shard (memory-mapped uint8) with the on-device
   augmentation, no model — vs decoding the files on every epoch (data.cache = "none") —
   vs the flat model's training step on the same batches.
2. Memory: `prepare` run in a fresh process on a synthetic manifest of --rows rows (the same
   small images repeated) and on a tenth of it; peak RSS should not grow with the rows.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import ROOT, save


def _loader_rate(batches, n_batches: int) -> float:
    seen, t = 0, None
    for i, (x, _) in enumerate(batches):
        if i == 2:
            t, seen = time.perf_counter(), 0
        seen += len(x)
        if i >= n_batches + 1:
            break
    return seen / (time.perf_counter() - t)


PREPARE = """
import sys, time, numpy as np, pandas as pd
sys.path[:0] = [{root!r}, {root!r} + "/benchmarks"]
from common import peak_rss_mb as hwm
from ensemble.prepare import prepare_images
files = sorted(__import__('glob').glob({pattern!r}))[:500]
n = {rows}
df = pd.DataFrame({{"path": [files[i % len(files)] for i in range(n)], "x": np.nan, "y": np.nan, "w": np.nan, "h": np.nan}})
base = hwm()
t = time.time()
folder, info = prepare_images(df, 32, {cache!r}, workers=0, progress=False)
print(base, hwm(), time.time() - t, info["n"])
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "configs" / "ferplus-cpu.toml"))
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--batches", type=int, default=40)
    ap.add_argument("--rows", type=int, default=300_000)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    from ensemble.batches import epoch_plan, image_batches
    from ensemble.config import load_config
    from ensemble.engine import make_optimizer
    from ensemble.experiment import open_experiment
    from ensemble.prepare import load_images
    from stages.backbones import build_model, normalization

    cfg = load_config(args.config, args.overrides)
    tmp = Path(tempfile.mkdtemp())
    exp = open_experiment(cfg, tmp / "run")
    rt, tr = exp.rt, exp.idx("train")
    y = exp.manifest["label"].to_numpy()[tr]
    fc = cfg.for_stage("flat")
    plan, copy = epoch_plan(y, fc.balance, 0, 0)
    mean, std = normalization(fc.model.backbone)
    gen = torch.Generator(device=rt.device).manual_seed(0)
    figures = {"config": args.config, "device": str(rt.device), "batch_size": fc.train.batch_size}
    figures["loader_prepared_img_s"] = _loader_rate(
        image_batches(exp.images, tr, plan, copy, fc.train, fc.balance, rt, gen, mean, std, 0, 0), args.batches
    )
    files = load_images(exp.manifest, cfg.data.image_size, cfg.data.cache_dir, "none")
    for w in (0, 2):
        figures[f"loader_decode_workers{w}_img_s"] = _loader_rate(
            image_batches(files, tr, plan, copy, fc.train, fc.balance, rt, gen, mean, std, 0, w), args.batches // 2
        )
    net = build_model(fc.model, 8).to(rt.device)
    if rt.channels_last:
        net.to(memory_format=torch.channels_last)
    net.train()
    opt = make_optimizer([p for p in net.parameters() if p.requires_grad], fc.train, rt.device)
    seen, t = 0, None
    for i, (x, pos) in enumerate(
        image_batches(exp.images, tr, plan, copy, fc.train, fc.balance, rt, gen, mean, std, 0, 0)
    ):
        if i == 2:
            t, seen = time.perf_counter(), 0
        with rt.autocast():
            loss = torch.nn.functional.cross_entropy(net(x).float(), torch.as_tensor(y[plan[pos]], device=rt.device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        seen += len(x)
        if i >= min(args.batches, 20) + 1:
            break
    figures["train_step_img_s"] = seen / (time.perf_counter() - t)
    figures["loader_over_step"] = figures["loader_prepared_img_s"] / figures["train_step_img_s"]
    print(
        f"loader from the prepared shard: {figures['loader_prepared_img_s']:.0f} img/s; decoding files: "
        f"{figures['loader_decode_workers0_img_s']:.0f} img/s (0 workers), {figures['loader_decode_workers2_img_s']:.0f} "
        f"(2 workers); training step: {figures['train_step_img_s']:.0f} img/s -> loader/step x{figures['loader_over_step']:.1f}"
    )

    pattern = str(Path(exp.manifest["path"].iloc[0]).parent / "*.png")
    for rows in (args.rows // 10, args.rows):
        code = PREPARE.format(root=str(ROOT), pattern=pattern, rows=rows, cache=str(tmp / f"cache{rows}"))
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        if out.returncode:
            print(out.stderr[-2000:])
            raise SystemExit("prepare benchmark failed")
        base, peak, secs, n = map(float, out.stdout.split()[-4:])
        figures[f"prepare_{rows}_rows"] = {
            "peak_rss_mb": peak,
            "rss_with_manifest_mb": base,
            "growth_mb": peak - base,
            "seconds": secs,
            "img_s": n / secs,
        }
        print(
            f"prepare {rows} rows at 32 px: peak RSS {peak:.0f} MB (+{peak - base:.0f} MB over the manifest), "
            f"{secs:.0f}s, {n / secs:.0f} img/s"
        )
    save("pipeline", figures, args.out)


if __name__ == "__main__":
    main()
