"""Batch inference on a folder: photos/s of ``predict_many`` with detection in threads or in worker
processes, on the machine it runs on.

    python benchmarks/batch.py [--run RUN] [--device cpu|cuda] [--precision fp32|bf16|int8] [--backend auto|onnx|torch]
                               [--n 1024] [--modes threads:4,processes:2,auto]
    python benchmarks/batch.py --alternate fp32,int8 [--rounds 3] [--modes auto]

The folder is built as in ``benchmarks/predict_photo.py`` (scikit-image's astronaut and the shared
photos resized to 256 px, flips and shifts; generated in a temp dir, never committed). Each mode
runs once over the whole folder after a warm-up on 16 photos (one run each: repeat the command
for the spread), the time includes starting the worker processes (each imports torch), and every
mode must give the same boxes, emotions and errors as the first mode (the run stops otherwise).
``auto`` is the CLI's default (``--processes auto``: :func:`ensemble.api.auto_processes`).
``detect_ms_per_photo_one_thread``: the default detector alone, decoded photos, one torch thread,
the first 64 photos; ``detect_only_photos_per_s``: decode and detect the whole folder in one thread per
usable core with no emotion model, the detector's ceiling on the machine. The temporary folder is
deleted at the end.

``--alternate P1,P2``: one model per precision, loaded once; the first mode over the folder with
each in turn, ``--rounds`` times (photos/s of every round: a busy host shows as a spread, and
only runs of one alternation are compared), and the share of faces given the same emotion.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, save
from predict_photo import _folder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default=None, help="run folder (default: the bundled model)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--backend", default="auto", help="auto (what a user gets), onnx or torch")
    ap.add_argument("--n", type=int, default=1024, help="photos in the folder")
    ap.add_argument("--photos", default=str(ROOT.parent / "shared" / "data" / "photos"))
    ap.add_argument(
        "--modes", default="threads:4,processes:2,auto", help="comma-separated threads:N, processes:N, auto"
    )
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--alternate", default=None, help="comma-separated precisions to alternate, e.g. fp32,int8")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--name", default="batch")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    modes = []
    for m in args.modes.split(","):
        kind, _, n = m.partition(":")
        if m == "auto":
            modes.append(("auto", 0))
        elif kind not in ("threads", "processes") or not n.isdigit() or int(n) < 1:
            sys.exit(f"mode must be threads:N, processes:N or auto, got {m!r}")
        else:
            modes.append((kind, int(n)))
    tmp = Path(tempfile.mkdtemp(prefix="batch-"))
    try:
        figures = alternate(args, modes[0], tmp) if args.alternate else measure(args, modes, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    save(args.name, figures, args.out)


def alternate(args, mode, tmp: Path) -> dict:
    import statistics

    import ensemble

    files = _folder(tmp, args.n, Path(args.photos))
    kind, n = mode
    kw = {"processes": n} if kind == "processes" else {"processes": "auto"} if kind == "auto" else {"workers": n}
    models = {
        p: ensemble.load(args.run, device=args.device, precision=p, backend=args.backend)
        for p in args.alternate.split(",")
    }
    rounds, labels = {p: [] for p in models}, {}
    for m in models.values():
        list(m.predict_many(files[:16]))  # warm-up
    for _ in range(args.rounds):
        for p, m in models.items():
            t = time.perf_counter()
            results = list(m.predict_many(files, batch_size=args.batch_size, **kw))
            dt = time.perf_counter() - t
            rounds[p].append(round(len(files) / dt, 1))
            labels[p] = [(f["box"], f["emotion"]) for _, recs, _ in results for f in recs]
            print(f"{p}: {rounds[p][-1]} photos/s", flush=True)
    first, *others = models
    same = {
        p: round(sum(a == b for a, b in zip(labels[first], labels[p])) / max(1, len(labels[first])), 4)
        for p in others
        if len(labels[p]) == len(labels[first])
    }
    return {
        "command": "python benchmarks/batch.py " + " ".join(sys.argv[1:]),
        "run": args.run or "bundled",
        "mode": "auto" if kind == "auto" else f"{kind}:{n}",
        "batch_size": args.batch_size,
        "photos": f"{len(files)} JPEGs, long side 256 px (astronaut + shared photos, flips, shifts)",
        "faces": len(labels[first]),
        "backends": {p: m.backend for p, m in models.items()},
        "photos_per_s_by_round": rounds,
        "median_photos_per_s": {p: statistics.median(r) for p, r in rounds.items()},
        f"same_box_and_emotion_as_{first}": same,
        "load_average_at_end": os.getloadavg(),
    }


def measure(args, modes, tmp: Path) -> dict:
    import torch
    from PIL import Image

    import ensemble
    from ensemble.api import auto_processes, usable_cores
    from ensemble.detect import DEFAULT_DETECTOR, detect

    files = _folder(tmp, args.n, Path(args.photos))
    model = ensemble.load(args.run, device=args.device, precision=args.precision, backend=args.backend)
    list(model.predict_many(files[:16]))  # warm-up: MTCNN and the networks loaded, kernels chosen
    figures = {
        "usable_cores": usable_cores(),
        "torch_threads_main_process": torch.get_num_threads(),
        "auto_processes": auto_processes(len(files)),
        "batch_size": args.batch_size,
        "command": "python benchmarks/batch.py " + " ".join(sys.argv[1:]),
        "run": args.run or "bundled",
        "device": args.device,
        "precision": args.precision,
        "backend": model.backend,
        "photos": f"{len(files)} JPEGs, long side 256 px (astronaut + shared photos, flips, shifts)",
        "load_average_at_start": os.getloadavg(),
        "modes": {},
    }
    reference = None
    for kind, n in modes:
        kw = {"processes": n} if kind == "processes" else {"processes": "auto"} if kind == "auto" else {"workers": n}
        key = "auto" if kind == "auto" else f"{kind}:{n}"
        t = time.perf_counter()
        results = list(model.predict_many(files, batch_size=args.batch_size, **kw))
        dt = time.perf_counter() - t
        labels = [f["emotion"] for _, recs, _ in results for f in recs]
        errors = sum(err is not None for _, _, err in results)
        answer = [(err, [(f["box"], f["emotion"]) for f in recs]) for _, recs, err in results]
        if reference is None:
            reference = answer
        elif answer != reference:
            sys.exit(f"{key} gave other boxes, emotions or errors than the first mode")
        figures["modes"][key] = {
            "photos_per_s": round(len(files) / dt, 1),
            "seconds": round(dt, 2),
            "faces": len(labels),
            "errors": errors,
        }
        print(f"{key}: {len(files) / dt:.1f} photos/s ({len(labels)} faces, {dt:.1f} s)", flush=True)
    torch.set_num_threads(1)
    images = [Image.open(f).convert("RGB") for f in files[:64]]
    t = time.perf_counter()
    for im in images:
        detect(im)
    figures["detector"] = DEFAULT_DETECTOR
    figures["detect_ms_per_photo_one_thread"] = round(1000 * (time.perf_counter() - t) / len(images), 1)
    print(f"{DEFAULT_DETECTOR} alone: {figures['detect_ms_per_photo_one_thread']} ms a photo on one thread")
    # the detector's ceiling here: decode + detect of the whole folder in one thread per core and
    # no emotion model (the threads share the torch pool of one thread, as predict_many's do)
    from concurrent.futures import ThreadPoolExecutor

    def decode_detect(f):
        with Image.open(f) as im:
            return len(detect(im.convert("RGB")))

    t = time.perf_counter()
    with ThreadPoolExecutor(usable_cores()) as pool:
        n_faces = sum(pool.map(decode_detect, files))
    dt = time.perf_counter() - t
    figures["detect_only_photos_per_s"] = {
        "threads": usable_cores(),
        "photos_per_s": round(len(files) / dt, 1),
        "faces": n_faces,
    }
    print(f"decode + detect alone, {usable_cores()} threads: {len(files) / dt:.1f} photos/s ({n_faces} faces)")
    figures["load_average_at_end"] = os.getloadavg()
    return figures


if __name__ == "__main__":  # the worker processes import this module again
    main()
