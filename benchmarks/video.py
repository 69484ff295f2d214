"""Video: frames/s, video vs the same frames as a folder of images, --every 5, memory vs length.

    python benchmarks/video.py --run artifacts/demo [--seconds 4] [--threads 1]

Clips are generated (scikit-image's astronaut, twice, moving) into --workdir (default
/tmp/ensemble-video-bench; never in the repository): 640x360 and 1280x720 at 30 fps for
throughput, 1 and 10 minutes at 640x360 for peak memory. Every figure that is compared is
measured in this one run, alternately, because the machine may be shared: read the ratios
(the headline one is the median over repeats of the ratio within a repeat), not the
absolute times. Detection (``--detector``, default haar, the detector of the recorded
figures; ``ensemble predict`` defaults to mtcnn) runs on every analysed frame. Peak memory (VmHWM) is measured per clip in a fresh process running
``ensemble predict CLIP --no-detect --csv``: every frame is decoded and analysed (the whole
frame as one face, so the table has one row per frame), because Haar detection on every
frame of a 10-minute clip takes too long on a small CPU; ``--memory-detect-every N`` runs
the memory clips with detection on every N-th frame instead.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from common import ROOT, save


def make_clip(path: Path, width: int, height: int, seconds: float, fps: float = 30.0) -> Path:
    """Two astronauts (one mirrored) swaying left and right on a grey background."""
    import cv2
    import skimage.data

    if path.is_file():
        return path
    side = int(height * 0.8)
    face = cv2.cvtColor(
        cv2.resize(skimage.data.astronaut(), (side, side), interpolation=cv2.INTER_AREA), cv2.COLOR_RGB2BGR
    )
    faces = (face, face[:, ::-1].copy())
    half = width // 2
    span = max(0, half - side - 8)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.part{path.suffix}")
    writer = cv2.VideoWriter(str(tmp), cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height))
    bg = np.full((height, width, 3), 100, np.uint8)
    for k in range(int(round(seconds * fps))):
        f = bg.copy()
        s = 0.5 + 0.5 * np.sin(2 * np.pi * k / (4 * fps))  # a 4-s sway
        for j, im in enumerate(faces):
            x = 4 + j * half + int(round(span * (s if j == 0 else 1 - s)))
            f[height - side :, x : x + side] = im
        writer.write(f)
    writer.release()
    tmp.rename(path)
    return path


def frames_to_folder(clip: Path, folder: Path) -> int:
    """Every frame of ``clip`` as a JPEG (quality 95) in ``folder``."""
    import cv2

    if folder.is_dir() and any(folder.iterdir()):
        return len(list(folder.iterdir()))
    folder.mkdir(parents=True, exist_ok=True)
    cap = cv2.VideoCapture(str(clip))
    n = 0
    while True:
        ok, f = cap.read()
        if not ok:
            break
        cv2.imwrite(str(folder / f"frame{n:05d}.jpg"), f, [cv2.IMWRITE_JPEG_QUALITY, 95])
        n += 1
    return n


def time_video(clip: Path, run: str, every: int | None = None, detector: str = "haar") -> tuple[float, int, int]:
    """(seconds, frames decoded, faces) of load + analysis, as ``ensemble predict CLIP`` does it."""
    from ensemble import load
    from ensemble.video import FrameSelection, ModelAnalyser, analyse_video

    t = time.perf_counter()
    analyser = ModelAnalyser(load(run, detector=detector))
    res = analyse_video(clip, analyser, FrameSelection(every=every), batch_size=32, progress=False)
    return time.perf_counter() - t, res.n_decoded, len(res.table)


def time_folder(folder: Path, run: str, detector: str = "haar") -> tuple[float, int]:
    """(seconds, faces) of ``ensemble predict FOLDER`` (the image path: load, decode, detect, classify)."""
    from ensemble.commands import run_predict

    buf = io.StringIO()
    t = time.perf_counter()
    with contextlib.redirect_stdout(buf):
        run_predict([folder], run, False, detector, None, False, 32)
    seconds = time.perf_counter() - t
    return seconds, sum(1 for line in buf.getvalue().splitlines() if "no face found" not in line)


def peak_memory(clip: Path, run: str, every: int | None, csv: Path, threads: int) -> tuple[float, float]:
    """(peak RSS MB, seconds) of ``ensemble predict CLIP --csv CSV`` (``--no-detect`` when ``every``
    is None, else ``--every N`` with detection) in a fresh process."""
    opts = ["--no-detect"] if every is None else ["--every", str(every), "--detector", "haar"]
    code = f"""
import sys; sys.path.insert(0, "benchmarks")
import torch
from common import peak_rss_mb
from ensemble.cli import main
if {threads}:
    torch.set_num_threads({threads})
try:
    main(["predict", {str(clip)!r}, "--run", {run!r}, *{opts!r}, "--csv", {str(csv)!r}])
except SystemExit:
    pass
print("PEAK", peak_rss_mb())
"""
    t = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    seconds = time.perf_counter() - t
    peak = [line for line in out.stdout.splitlines() if line.startswith("PEAK")]
    if not peak:
        raise SystemExit(f"memory run failed: {out.stderr[-2000:]}")
    return float(peak[-1].split()[1]), seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default="artifacts/demo")
    ap.add_argument("--detector", default="haar", choices=["mtcnn", "haar"])
    ap.add_argument("--seconds", type=float, default=4.0, help="Length of the 640x360 clip (1280x720: half).")
    ap.add_argument(
        "--memory-detect-every",
        type=int,
        default=None,
        help="Memory runs: detect on every N-th frame instead of --no-detect on every frame.",
    )
    ap.add_argument("--threads", type=int, default=0, help="torch and OpenCV threads (0: their defaults).")
    ap.add_argument(
        "--repeats",
        type=int,
        default=2,
        help="Alternating repeats; throughputs are the fastest repeat's, ratios the median of per-repeat ratios.",
    )
    ap.add_argument("--workdir", default="/tmp/ensemble-video-bench")
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.threads:
        import cv2
        import torch

        torch.set_num_threads(args.threads)
        cv2.setNumThreads(args.threads)
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    figures: dict = {
        "run": args.run,
        "detector": args.detector,
        "fps": 30,
        "threads": args.threads or "default",
        "load_average_at_start": _load(),
        "clip_seconds": {"640x360": args.seconds, "1280x720": args.seconds / 2},
        "throughput": {},
    }
    for w, h, seconds in ((640, 360, args.seconds), (1280, 720, args.seconds / 2)):  # 720p: 4x the pixels
        clip = make_clip(work / f"clip-{w}x{h}-{seconds:g}s.mp4", w, h, seconds)
        folder = work / f"frames-{w}x{h}-{seconds:g}s"
        n_images = frames_to_folder(clip, folder)
        video_t, folder_t, every5_t = [], [], []
        for _ in range(args.repeats):  # alternate, so drift in machine load hits all three
            sv, n, faces_v = time_video(clip, args.run, detector=args.detector)
            sf, faces_f = time_folder(folder, args.run, args.detector)
            s5, _, faces_5 = time_video(clip, args.run, every=5, detector=args.detector)
            video_t.append(sv)
            folder_t.append(sf)
            every5_t.append(s5)
        sv, sf, s5 = min(video_t), min(folder_t), min(every5_t)
        # each repeat measures the three back to back: the median of its ratios shrugs off a
        # repeat during which other jobs came or went (the minima may come from different repeats)
        paired_vf = float(np.median([(n / v) / (n_images / f) for v, f in zip(video_t, folder_t)]))
        paired_e5 = float(np.median([v / e for v, e in zip(video_t, every5_t)]))
        row = {
            "frames": n,
            "images": n_images,
            "video_frames_per_s": n / sv,
            "folder_images_per_s": n_images / sf,
            "video_over_folder": (n / sv) / (n_images / sf),
            "every5_frames_per_s": n / s5,
            "every5_speedup": sv / s5,
            "video_over_folder_paired_median": paired_vf,
            "every5_speedup_paired_median": paired_e5,
            "faces_video": faces_v,
            "faces_folder": faces_f,
            "faces_every5": faces_5,
            "seconds_video": video_t,
            "seconds_folder": folder_t,
            "seconds_every5": every5_t,
        }
        figures["throughput"][f"{w}x{h}"] = row
        print(
            f"{w}x{h}: video every frame {row['video_frames_per_s']:.1f} frames/s, same frames as a folder of JPEGs "
            f"{row['folder_images_per_s']:.1f} images/s (video/folder x{row['video_over_folder']:.2f}, "
            f"median of paired repeats x{paired_vf:.2f}); "
            f"--every 5 {row['every5_frames_per_s']:.1f} frames/s (x{row['every5_speedup']:.2f}, paired x{paired_e5:.2f}); "
            f"faces {faces_v} / {faces_f} / {faces_5}"
        )
    if not args.skip_memory:
        mem = {}
        mode = (
            "--no-detect, every frame"
            if args.memory_detect_every is None
            else f"detection, --every {args.memory_detect_every}"
        )
        for minutes in (1, 10):
            clip = make_clip(work / f"clip-640x360-{minutes}min.mp4", 640, 360, 60 * minutes)
            csv = work / f"table-{minutes}min.csv"
            peak, seconds = peak_memory(clip, args.run, args.memory_detect_every, csv, args.threads)
            rows = sum(1 for _ in csv.open()) - 1
            mem[f"{minutes}min"] = {
                "peak_rss_mb": peak,
                "seconds": seconds,
                "frames": int(60 * minutes * 30),
                "table_rows": rows,
            }
            print(
                f"{minutes}-minute 640x360 clip ({mode}): peak RSS {peak:.0f} MB, {rows} table rows ({seconds:.0f} s)"
            )
        mem["mode"] = mode
        mem["ten_over_one"] = mem["10min"]["peak_rss_mb"] / mem["1min"]["peak_rss_mb"]
        figures["memory"] = mem
        print(f"peak memory, 10 min / 1 min: x{mem['ten_over_one']:.3f}")
    figures["load_average_at_end"] = _load()
    save("video", figures, args.out)


def _load() -> list[float] | None:
    try:
        return [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return None


if __name__ == "__main__":
    main()
