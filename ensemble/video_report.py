"""What a video's table turns into: a per-track summary, plots over time, an annotated video.

The smoothed columns are used where the table has them (``--smooth``), the raw ones otherwise.
"""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path

import numpy as np

from .classes import CLASSES
from .errors import UserError
from .paths import check_target, make_dir, write_user_file
from .video import PROBA_COLUMNS, FrameSelection, VideoError, iter_frames, open_video

# BGR colours for track ids (id 1 gets the first)
PALETTE = [
    (75, 180, 60),
    (200, 130, 0),
    (48, 130, 245),
    (180, 30, 145),
    (240, 240, 70),
    (25, 225, 255),
    (60, 20, 220),
    (128, 128, 0),
    (190, 190, 250),
    (40, 110, 170),
]
WRITER_CODECS = {".mp4": "mp4v", ".mov": "mp4v", ".mkv": "mp4v", ".avi": "MJPG", ".webm": "VP80"}


def _cols(table) -> tuple[str, list[str], str, str]:
    s = "_smooth" if "emotion_smooth" in table.columns else ""
    return f"emotion{s}", [f"{c}{s}" for c in PROBA_COLUMNS], f"valence{s}", f"arousal{s}"


def track_summary(table):
    """One row per (file, track): first/last second, analysed frames, the share of those frames
    in each emotion (smoothed labels when the table is smoothed), the dominant emotion, mean V/A."""
    import pandas as pd

    emotion, _, val, aro = _cols(table)
    rows = []
    for (f, track), g in table.groupby(["file", "track"], sort=True):
        share = g[emotion].value_counts(normalize=True)
        rows.append(
            {
                "file": f,
                "track": int(track),
                "first_s": float(g["time_s"].min()),
                "last_s": float(g["time_s"].max()),
                "n_frames": len(g),
                "emotion": share.idxmax(),
                **{f"share_{c}": float(share.get(c, 0.0)) for c in CLASSES},
                "mean_valence": float(g[val].mean()),
                "mean_arousal": float(g[aro].mean()),
            }
        )
    cols = [
        "file",
        "track",
        "first_s",
        "last_s",
        "n_frames",
        "emotion",
        *[f"share_{c}" for c in CLASSES],
        "mean_valence",
        "mean_arousal",
    ]
    return pd.DataFrame(rows, columns=cols)


def summary_line(row) -> str:
    """``clip.mp4 track 1: 0.00-9.97 s, 300 frames: happy 81%, neutral 12%; mean V +0.52 A +0.20``."""
    shares = sorted(((row[f"share_{c}"], c) for c in CLASSES), reverse=True)
    parts = ", ".join(f"{c} {s:.0%}" for s, c in shares if s >= 0.005)
    va = "" if np.isnan(row["mean_valence"]) else f"; mean V {row['mean_valence']:+.2f} A {row['mean_arousal']:+.2f}"
    return (
        f"{row['file']} track {row['track']}: {row['first_s']:.2f}-{row['last_s']:.2f} s, "
        f"{row['n_frames']} frame{'' if row['n_frames'] == 1 else 's'}: {parts}{va}"
    )


def plot_tracks(table, out_dir, stem: str) -> list[Path]:
    """Per track, ``OUT_DIR/<stem>.track<id>.png``: V/A over time (raw, and smoothed when
    present) above the emotion probabilities over time (stacked)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _, pcols, val, aro = _cols(table)
    smoothed = val.endswith("_smooth")
    paths = []
    for track, g in table.groupby("track", sort=True):
        g = g.sort_values("frame")
        t = g["time_s"].to_numpy()
        fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(8, 5), sharex=True, height_ratios=[1, 1.3])
        for col, colour, label in (("valence", "tab:blue", "valence"), ("arousal", "tab:red", "arousal")):
            ax1.plot(
                t,
                g[col],
                color=colour,
                lw=0.8,
                alpha=0.45 if smoothed else 1.0,
                label=f"{label} (raw)" if smoothed else label,
            )
            if smoothed:
                ax1.plot(t, g[f"{col}_smooth"], color=colour, lw=2, label=f"{label} (smoothed)")
        ax1.axhline(0, color="grey", lw=0.5)
        ax1.set_ylim(-1.05, 1.05)
        ax1.set_ylabel("V / A")
        ax1.legend(loc="upper right", fontsize=7, ncol=2)
        ax1.set_title(f"{stem}, track {track}")
        ax2.stackplot(t, g[pcols].to_numpy().T, labels=list(CLASSES), alpha=0.85)
        ax2.set_ylim(0, 1)
        ax2.set_xlabel("time (s)")
        ax2.set_ylabel("probability" + (" (smoothed)" if smoothed else ""))
        ax2.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=7)
        fig.tight_layout()
        path = write_user_file(
            out_dir / f"{stem}.track{track}.png", partial(fig.savefig, dpi=90, format="png"), "--summary plot"
        )
        plt.close(fig)
        paths.append(path)
    return paths


def draw_faces(frame: np.ndarray, faces) -> np.ndarray:
    """Draw on a BGR frame, in place: per face a box in its track's colour, ``#id emotion p``
    and a small V/A square (valence right, arousal up) beside the box. ``faces``: table rows."""
    import cv2

    h_img, w_img = frame.shape[:2]
    emotion, pcols, val, aro = None, None, None, None
    scale = max(0.35, min(1.0, h_img / 720))
    for r in faces:
        if emotion is None:
            emotion, pcols, val, aro = (
                ("emotion_smooth", [f"{c}_smooth" for c in PROBA_COLUMNS], "valence_smooth", "arousal_smooth")
                if "emotion_smooth" in r
                else ("emotion", PROBA_COLUMNS, "valence", "arousal")
            )
        colour = PALETTE[(int(r["track"]) - 1) % len(PALETTE)]
        x, y, w, h = (int(r[k]) for k in ("box_x", "box_y", "box_w", "box_h"))
        cv2.rectangle(frame, (x, y), (x + w, y + h), colour, max(1, int(2 * scale)))
        p = float(r[f"p_{r[emotion]}{'_smooth' if emotion.endswith('smooth') else ''}"])
        label = f"#{int(r['track'])} {r[emotion]} {p:.2f}"
        (tw, th), base = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, 0.5 * scale, 1)
        ty = y - 4 if y - th - 6 >= 0 else y + h + th + 4
        cv2.rectangle(frame, (x, ty - th - 3), (x + tw + 2, ty + base - 1), colour, -1)
        cv2.putText(frame, label, (x + 1, ty - 1), cv2.FONT_HERSHEY_SIMPLEX, 0.5 * scale, (0, 0, 0), 1, cv2.LINE_AA)
        v, a = float(r[val]), float(r[aro])
        if np.isfinite(v) and np.isfinite(a):
            s = int(np.clip(w / 3, 32, 72))
            sx = x + w + 4 if x + w + 4 + s <= w_img else max(0, x - s - 4)
            sy = min(max(0, y), max(0, h_img - s))
            cv2.rectangle(frame, (sx, sy), (sx + s, sy + s), (40, 40, 40), -1)
            cv2.rectangle(frame, (sx, sy), (sx + s, sy + s), colour, 1)
            cv2.line(frame, (sx + s // 2, sy), (sx + s // 2, sy + s), (120, 120, 120), 1)
            cv2.line(frame, (sx, sy + s // 2), (sx + s, sy + s // 2), (120, 120, 120), 1)
            px = sx + int(round((np.clip(v, -1, 1) + 1) / 2 * s))
            py = sy + int(round((1 - np.clip(a, -1, 1)) / 2 * s))
            cv2.circle(frame, (px, py), max(2, s // 10), colour, -1)
    return frame


def annotate_video(path, table, out, selection: FrameSelection | None = None) -> int:
    """Write ``out``: the frames of ``selection``'s range (the whole video by default) at the
    source frame rate and size, each with the faces of the last analysed frame at or before it.
    Written beside ``out`` and renamed into place when complete. Returns the frames written."""
    import cv2

    out = Path(out)
    codec = WRITER_CODECS.get(out.suffix.lower())
    if codec is None:
        raise UserError(f"--annotate {out}: the annotated video must end in {', '.join(sorted(WRITER_CODECS))}")
    make_dir(out.parent, "the --annotate folder")
    check_target(out, "--annotate video", (path,))  # a folder, FIFO, device or the video itself is refused
    selection = selection or FrameSelection()
    cap, info = open_video(path)
    part = out.with_name(f".{out.stem}.part{out.suffix}")  # FFmpeg picks the container by the suffix
    writer = cv2.VideoWriter(str(part), cv2.VideoWriter_fourcc(*codec), info.fps, (info.width, info.height))
    if not writer.isOpened():
        cap.release()
        raise UserError(f"cannot write {out} (OpenCV/FFmpeg has no {codec} encoder for {out.suffix})")
    by_frame = {int(f): g.to_dict("records") for f, g in table.groupby("frame")} if len(table) else {}
    current: list = []
    n = 0
    try:
        for item in iter_frames(cap, info, selection, all_frames=True, rgb=False):
            if not isinstance(item, tuple):
                break
            i, _, frame = item
            current = by_frame.get(i, current) if i in by_frame or not _analysed(i, selection, info) else []
            writer.write(draw_faces(frame, current))
            n += 1
    except VideoError as exc:
        raise UserError(f"{path}: {exc}") from None
    except BaseException:
        writer.release()
        part.unlink(missing_ok=True)  # no half-written video is left beside the target
        raise
    finally:
        writer.release()
        cap.release()
    check_target(out, "--annotate video")  # nothing was put in its place meanwhile
    os.replace(part, out)
    return n


def _analysed(i: int, selection: FrameSelection, info) -> bool:
    first, _ = selection.frame_range(info.fps)
    return selection.keep(i, first, info.fps)
