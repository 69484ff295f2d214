"""A first answer on a photo: wall time of one cold ``predict`` and its parts, peak memory, and
photos/s on a folder of 256-px photos after loading.

    python benchmarks/predict_photo.py [--run RUN] [--n-folder 256] [--repeats 3] [--python PYTHON]

Parts (one fresh process each repeat, medians): import (``import ensemble.api``, plus torch
where the backend is torch; torchvision is not imported: the networks and MTCNN are built here), load (``ensemble.load``: verify, read,
build the networks), detect (decode + detection +
alignment of scikit-image's astronaut saved as a JPEG, first call: includes loading MTCNN), infer
(the networks on its face), and the parts' peak memory (``peak_mb``). ``cli_wall_s`` and
``cli_peak_mb``: wall time and peak memory of ``python -m ensemble predict photo.jpg`` as a user
runs it (its detection threads and command line add to the parts' memory); ``help`` that of ``python -m ensemble --help``. The folder is generated in
a temp dir (never committed): the astronaut and the shared photos resized to 256 px, with
flips and shifts, ``--n-folder`` files (0: no folder).
``--backends onnx,torch`` measures each backend (default: auto, what a user gets).
``--python`` times the cold start with another environment's interpreter in which the project is
installed (e.g. one with torch's CPU wheel and no torchvision: predicting needs none). ``fer`` is not measured: installing it pulls TensorFlow
and opencv-contrib-python 5, which replaces the OpenCV < 5 this project uses.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

from common import ROOT, save

PARTS = r"""
import json, sys, time
t0 = time.perf_counter()
import ensemble.api as api
if sys.argv[4] == "torch":
    import torch  # what loading needs (no torchvision, pandas or scikit-learn): timed apart from our own work
t1 = time.perf_counter()
model = api.load(sys.argv[1] if sys.argv[1] != "-" else None, detector=sys.argv[3], backend=sys.argv[4])
t2 = time.perf_counter()
faces, crops = model.faces_in(sys.argv[2])
t3 = time.perf_counter()
out = model._infer(crops)
t4 = time.perf_counter()
with open("/proc/self/status") as f:
    peak = int(next(l for l in f if l.startswith("VmHWM")).split()[1]) / 1024
print(json.dumps({"import": t1 - t0, "load": t2 - t1, "detect": t3 - t2, "infer": t4 - t3, "total": t4 - t0,
                  "peak_mb": peak, "faces": len(faces), "backend": model.backend, "precision": model.net.precision,
                  "imported": sorted(m for m in ("torch", "torchvision", "torch._dynamo", "pandas", "sklearn") if m in sys.modules)}))
"""


def _wall(cmd: list[str]) -> tuple[float, float]:
    """Wall seconds of a command and its peak resident memory in MB (the child's own maximum RSS,
    from ``wait4``: what ``/usr/bin/time -f %M`` reports). Its output goes to files, not pipes, so
    that a long output cannot block it while ``wait4`` waits."""
    with tempfile.TemporaryFile("w+") as err:
        t = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - t
        if os.waitstatus_to_exitcode(status) != 0:
            err.seek(0)
            raise SystemExit(f"{' '.join(cmd)} failed: {err.read().strip()[-400:]}")
    return seconds, usage.ru_maxrss / 1024


def _folder(dst: Path, n: int, photos: Path) -> list[Path]:
    import numpy as np
    from PIL import Image, ImageOps
    from skimage import data

    sources = [Image.fromarray(data.astronaut())]
    if photos.is_dir():
        sources += [
            ImageOps.exif_transpose(Image.open(p)).convert("RGB")
            for p in sorted(photos.iterdir())
            if p.suffix.lower() in (".jpg", ".jpeg", ".png")
        ]
    rng = np.random.default_rng(0)
    files = []
    for i in range(n):
        im = sources[i % len(sources)]
        s = 256 / max(im.size)
        im = im.resize((max(1, round(im.width * s)), max(1, round(im.height * s))), Image.BILINEAR)
        if i // len(sources) % 2:
            im = ImageOps.mirror(im)
        dx, dy = rng.integers(0, 8, 2)
        im = im.crop((dx, dy, im.width, im.height))
        files.append(dst / f"p{i:04d}.jpg")
        im.save(files[-1], quality=90)
    return files


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default=None, help="run folder (default: the bundled model)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--n-folder", type=int, default=256)
    ap.add_argument("--photos", default=str(ROOT.parent / "shared" / "data" / "photos"))
    ap.add_argument("--detectors", default="blazeface,mtcnn")
    ap.add_argument("--backends", default="auto", help="comma-separated: auto, onnx, torch")
    ap.add_argument("--python", default=sys.executable, help="interpreter for the cold-start parts and CLI")
    ap.add_argument("--out", default=None, help="result file (default benchmarks/results/predict-photo.json)")
    args = ap.parse_args()

    from PIL import Image
    from skimage import data

    tmp = Path(tempfile.mkdtemp(prefix="predict-photo-"))
    photo = tmp / "astronaut.jpg"
    Image.fromarray(data.astronaut()).save(photo, quality=90)
    run_arg = args.run or "-"
    figures = {
        "run": args.run or "bundled",
        "load_average_at_start": os.getloadavg(),
        "photo": "skimage astronaut, 512x512 JPEG",
        "cold": {},
        "folder": {},
    }
    py = args.python
    figures["python"] = py
    figures["torch_of_python"] = subprocess.run(
        [py, "-c", "import torch; print(torch.__version__)"], capture_output=True, text=True
    ).stdout.strip()
    helps = [_wall([py, "-m", "ensemble", "--help"])[0] for _ in range(5)]
    figures["help_s"] = round(statistics.median(helps), 3)
    print(f"ensemble --help: {figures['help_s']:.3f} s (median of 5)")
    backends = args.backends.split(",")
    cases = [(det, be) for det in args.detectors.split(",") for be in backends]

    def key(det: str, be: str) -> str:
        return det if len(backends) == 1 else f"{det}, {be}"

    for det, be in cases:
        parts = []
        for _ in range(args.repeats):
            out = subprocess.run(
                [py, "-c", PARTS, run_arg, str(photo), det, be], cwd=ROOT, capture_output=True, text=True
            )
            if out.returncode != 0:
                raise SystemExit(out.stderr.strip()[-600:])
            parts.append(json.loads(out.stdout.strip().splitlines()[-1]))
        cli = [
            _wall(
                [
                    py,
                    "-m",
                    "ensemble",
                    "predict",
                    str(photo),
                    "--detector",
                    det,
                    "--backend",
                    be,
                    *(["--run", args.run] if args.run else []),
                ]
            )
            for _ in range(args.repeats)
        ]
        med = {
            k: round(statistics.median(p[k] for p in parts), 3)
            for k in parts[0]
            if k not in ("imported", "backend", "precision")
        }
        med["imported"], med["backend"], med["precision"] = (parts[0][k] for k in ("imported", "backend", "precision"))
        med["cli_wall_s"] = round(statistics.median(c[0] for c in cli), 3)
        med["cli_peak_mb"] = round(statistics.median(c[1] for c in cli), 1)
        figures["cold"][key(det, be)] = med
        print(
            f"cold, {key(det, be)} ({med['backend']}): cli {med['cli_wall_s']:.2f} s wall; import {med['import']:.2f} + load {med['load']:.2f} "
            f"+ detect {med['detect']:.2f} + infer {med['infer']:.3f} s; peak {med['cli_peak_mb']:.0f} MB for the cli, "
            f"{med['peak_mb']:.0f} MB for the parts "
            f"(medians of {args.repeats})"
        )

    import numpy as np
    import torch

    from ensemble import api

    files = _folder(tmp, args.n_folder, Path(args.photos)) if args.n_folder else []
    for det, be in cases if files else []:
        model = api.load(args.run, detector=det, backend=be)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a synthetic timing run says so once; not news here
            list(model.predict_many(files[:8]))  # warm-up
        t = time.perf_counter()
        n_faces = sum(len(recs) for _, recs, _ in model.predict_many(files))
        dt = time.perf_counter() - t
        # the two halves alone: decode + detect + align on one thread, the networks on the faces
        t = time.perf_counter()
        crops = [model.faces_in(f)[1] for f in files]
        t_detect = (time.perf_counter() - t) / len(files)
        crops = np.concatenate([c for c in crops if len(c)])
        t = time.perf_counter()
        out32 = [o for i in range(0, len(crops), 32) for o in model._infer(crops[i : i + 32])]
        t_infer = (time.perf_counter() - t) / max(1, len(crops))
        figures["folder"][key(det, be)] = {
            "backend": model.backend,
            "photos": len(files),
            "faces": n_faces,
            "seconds": round(dt, 2),
            "photos_per_s": round(len(files) / dt, 1),
            "detect_ms_per_photo_one_thread": round(1000 * t_detect, 1),
            "infer_ms_per_face_batch32": round(1000 * t_infer, 1),
            "torch_threads": torch.get_num_threads(),
        }
        print(
            f"folder of {len(files)} 256-px photos, {key(det, be)} ({model.backend}): {len(files) / dt:.1f} photos/s ({n_faces} faces); "
            f"alone: decode+detect+align {1000 * t_detect:.1f} ms a photo (one thread), "
            f"networks {1000 * t_infer:.1f} ms a face (batch 32, {torch.get_num_threads()} threads)"
        )
        if (det, be) == cases[0]:  # the networks in bf16 (--precision bf16, on torch) on the same faces
            fast = api.load(args.run, detector=det, precision="bf16")
            fast._infer(crops[:32])
            t = time.perf_counter()
            out16 = [o for i in range(0, len(crops), 32) for o in fast._infer(crops[i : i + 32])]
            t16 = (time.perf_counter() - t) / max(1, len(crops))
            p16, p32 = np.array([o["proba"] for o in out16]), np.array([o["proba"] for o in out32])
            t = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                sum(len(recs) for _, recs, _ in fast.predict_many(files))
            dt16 = time.perf_counter() - t
            figures["folder"][f"{det}, bf16"] = {
                "photos_per_s": round(len(files) / dt16, 1),
                "infer_ms_per_face_batch32": round(1000 * t16, 1),
                "same_label_as_fp32": round(float((p16.argmax(1) == p32.argmax(1)).mean()), 4),
                "max_probability_difference": round(float(np.abs(p16 - p32).max()), 4),
            }
            print(
                f"  bf16: {len(files) / dt16:.1f} photos/s, networks {1000 * t16:.1f} ms a face; same label as fp32 "
                f"for {100 * (p16.argmax(1) == p32.argmax(1)).mean():.1f}% of {len(crops)} faces, "
                f"largest probability difference {np.abs(p16 - p32).max():.3f}"
            )
    figures["load_average_at_end"] = os.getloadavg()
    figures["fer"] = (
        "not measured: pip install fer pulls tensorflow 2.21 and opencv-contrib-python 5.1 (replaces OpenCV<5)"
    )
    save("predict-photo", figures, args.out)


if __name__ == "__main__":
    main()
