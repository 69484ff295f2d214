"""How often a 2-process CPU DDP run exits 0 (issue 10: it must be every time).

    python benchmarks/ddp_exit.py [--runs 10]

Runs the issue's command, ``torchrun --nproc_per_node=2 -m ensemble fit-flat --config
configs/demo.toml --set train.epochs=1 --set data.max_samples=64``, ``--runs`` times, each into a
fresh run folder, and prints (and saves) how many exited 0, with the tail of any failure.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

from common import ROOT, save


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    codes, failures, seconds = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.runs):
            cmd = [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                "--nproc_per_node=2",
                "-m",
                "ensemble",
                "fit-flat",
                "--config",
                "configs/demo.toml",
                "--out",
                f"{tmp}/run{i}",
                "--set",
                "train.epochs=1",
                "--set",
                "data.max_samples=64",
                "--set",
                "train.device=cpu",
            ]
            t = time.perf_counter()
            proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
            seconds.append(time.perf_counter() - t)
            codes.append(proc.returncode)
            if proc.returncode != 0:
                failures.append((proc.stdout + proc.stderr)[-1500:])
            print(f"run {i + 1}/{args.runs}: exit {proc.returncode} ({seconds[-1]:.0f}s)", flush=True)
    ok = sum(c == 0 for c in codes)
    print(f"{ok}/{args.runs} DDP runs exited 0")
    for f in failures[:3]:
        print("---- failure tail ----\n" + f)
    figures = {"runs": args.runs, "exit_0": ok, "exit_codes": codes, "seconds": seconds, "failures": failures[:3]}
    save("ddp-exit", figures, args.out)


if __name__ == "__main__":
    main()
