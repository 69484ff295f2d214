"""Inference cost, flat vs hierarchical: ms per image at batch 1 and 32, peak memory, artifact size.

    python benchmarks/inference.py --run artifacts/demo [--repeats 20]

Flat and hierarchical predictors are timed alternately in one process (so both see the same
machine state) and reported as a ratio too; ONNX Runtime latency of the exported hierarchy is
added when onnxruntime is installed. Peak memory is measured in a fresh process per model.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import ROOT, save


def _dir_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e6


def _time(fn, x, repeats: int) -> float:
    fn(x)  # warm-up
    t = time.perf_counter()
    for _ in range(repeats):
        fn(x)
    return (time.perf_counter() - t) / repeats


def _peak_memory(run: str, which: str, batch: int) -> tuple[float, float]:
    """(peak RSS MB, of which after loading the model) for one predictor in a fresh process."""
    code = f"""
import sys; sys.path.insert(0, "benchmarks")
import numpy as np, torch
from common import peak_rss_mb
from ensemble import FlatPredictor, HierarchicalPredictor
p = {"FlatPredictor" if which == "flat" else "HierarchicalPredictor"}.load({run!r})
x = np.random.default_rng(0).standard_normal(({batch}, 3, p.size, p.size)).astype('float32')
loaded = peak_rss_mb()
for _ in range(3):
    {"p.proba_from_input(x)" if which == "flat" else "p.route(*p.parts_from_input(x))"}
print(loaded, peak_rss_mb())
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        return float("nan"), float("nan")
    loaded, peak = map(float, out.stdout.split()[-2:])
    return peak, loaded


def _expert_metas(run: Path) -> list[dict]:
    return [json.loads((p / "meta.json").read_text()) for p in sorted((run / "experts").glob("[0-9]*"))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default="artifacts/demo")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from ensemble import FlatPredictor, HierarchicalPredictor
    from ensemble.export import export
    from ensemble.reports import hierarchy_params

    run = Path(args.run)
    flat = FlatPredictor.load(run)
    hier = HierarchicalPredictor.load(run, router="soft")
    rng = np.random.default_rng(0)
    figures = {"run": str(run), "router": "soft", "batches": {}}
    sess = None
    try:
        import onnxruntime as ort

        with tempfile.TemporaryDirectory() as tmp:
            onnx_file = export(run, "onnx", Path(tmp) / "h.onnx", "soft")
            sess = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    except ImportError:
        pass
    for batch in (1, 32):
        x = rng.standard_normal((batch, 3, flat.size, flat.size)).astype(np.float32)
        f_t, h_t, o_t = [], [], []
        for _ in range(3):  # alternate, so drift hits both
            f_t.append(_time(flat.proba_from_input, x, args.repeats))
            h_t.append(_time(lambda z: hier.route(*hier.parts_from_input(z)), x, args.repeats))
            if sess is not None:
                o_t.append(_time(lambda z: sess.run(None, {"faces": z}), x, args.repeats))
        f_ms, h_ms = 1000 * min(f_t) / batch, 1000 * min(h_t) / batch
        row = {"flat_ms_per_image": f_ms, "hier_ms_per_image": h_ms, "hier_over_flat": h_ms / f_ms}
        if o_t:
            row["onnxruntime_hier_ms_per_image"] = 1000 * min(o_t) / batch
        row["flat_peak_rss_mb"], row["flat_rss_after_load_mb"] = _peak_memory(str(run), "flat", batch)
        row["hier_peak_rss_mb"], row["hier_rss_after_load_mb"] = _peak_memory(str(run), "hier", batch)
        row["hier_over_flat_peak_rss"] = row["hier_peak_rss_mb"] / row["flat_peak_rss_mb"]
        figures["batches"][str(batch)] = row
        print(
            f"batch {batch:>2}: flat {f_ms:.3f} ms/img, hierarchy {h_ms:.3f} ms/img (x{h_ms / f_ms:.2f})"
            + (f", onnxruntime {row['onnxruntime_hier_ms_per_image']:.3f} ms/img" if o_t else "")
            + f"; peak RSS flat {row['flat_peak_rss_mb']:.0f} MB, hierarchy {row['hier_peak_rss_mb']:.0f} MB"
            + f" (x{row['hier_over_flat_peak_rss']:.2f})"
        )
    flat_mb = _dir_mb(run / "flat")
    stages = [run / "stage1", *sorted((run / "experts").glob("[0-9]*"))]
    borrowed = {json.loads((p / "meta.json").read_text()).get("trunk_from") for p in stages} - {"", None}
    hier_mb = sum(_dir_mb(run / s) for s in ("stage1", "neighborhoods", "experts", "router")) + sum(
        (run / b / "weights.pt").stat().st_size / 1e6 for b in borrowed
    )  # a borrowed trunk, once
    figures.update(
        {
            "flat_artifact_mb": flat_mb,
            "hier_artifact_mb": hier_mb,
            "hier_over_flat_size": hier_mb / flat_mb,
            "n_distinct_trunks": len(hier.net.trunks),
            "n_experts": len(hier.net.expert_heads),
            "expert_trainable": [m.get("trainable", "head") for m in _expert_metas(run)],
            "params": hierarchy_params(hier, flat),
        }
    )
    print(
        f"artifacts: flat {flat_mb:.2f} MB, hierarchy {hier_mb:.2f} MB (x{hier_mb / flat_mb:.2f}; "
        f"{len(hier.net.trunks)} distinct trunk(s) run per face); parameters: flat "
        f"{figures['params']['flat']:,}, the hierarchy adds {figures['params']['extra_over_flat']:,}"
    )
    save("inference", figures, args.out)


if __name__ == "__main__":
    main()
