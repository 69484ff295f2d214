"""``ensemble predict`` on videos: the options, and the run over the video files among the paths.

Kept apart from ``cli.py`` and ``predict.py``: the predict command adds ``@video_options``
and calls ``predict_videos`` first, which hands back the image paths for the image path.
Imports only click at module level, so ``ensemble --help`` stays light.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import click

from .errors import UserError

VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm")  # = video.VIDEO_EXTENSIONS, without importing it


def video_options(f):
    """The predict command's options for videos (they are errors when no video is given)."""
    options = [
        click.option("--every", type=int, default=None, help="Videos: analyse every N-th frame."),
        click.option("--fps", "target_fps", type=float, default=None, help="Videos: analyse about F frames a second."),
        click.option("--start", type=float, default=None, help="Videos: from this second."),
        click.option("--end", type=float, default=None, help="Videos: up to this second."),
        click.option(
            "--smooth",
            type=float,
            default=None,
            metavar="SECONDS",
            help="Videos: smooth each track's probabilities and V/A over this window (reported beside the raw).",
        ),
        click.option(
            "--smooth-method",
            type=click.Choice(["centred", "ema"]),
            default="centred",
            show_default=True,
            help="Videos: centred window, or exponential with this time constant.",
        ),
        click.option(
            "--annotate",
            type=click.Path(),
            default=None,
            help="Videos: write the annotated video here (a .mp4/.avi/.mkv/.mov/.webm file for one video, "
            "else a folder).",
        ),
        click.option(
            "--summary",
            "summary_dir",
            type=click.Path(file_okay=False),
            default=None,
            help="Videos: write per-track summary CSV and V/A + probability plots here.",
        ),
        click.option(
            "--csv",
            "csv_file",
            type=click.Path(dir_okay=False),
            default=None,
            help="Videos: write the per-frame table (one row per face per analysed frame).",
        ),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def split_paths(paths) -> tuple[list[Path], list]:
    """(video files, paths for the image path). Folders are walked here only if they hold a
    video; without any video the paths come back untouched, for the image path to walk."""
    from .data import IMAGE_EXTENSIONS

    def is_video(f: Path) -> bool:
        return f.suffix.lower() in VIDEO_SUFFIXES

    walked = {}
    for p in map(Path, paths):
        if p.is_dir():
            walked[p] = sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith("."))
    if not any(is_video(Path(p)) for p in paths) and not any(is_video(f) for fs in walked.values() for f in fs):
        return [], list(paths)
    videos, rest, skipped = [], [], []
    for p in map(Path, paths):
        for f in walked.get(p, [p]):
            if is_video(f):
                videos.append(f)
            elif p not in walked or f.suffix.lower() in IMAGE_EXTENSIONS:
                rest.append(f)  # a file named explicitly is always tried
            else:
                skipped.append(f)
    if skipped:
        click.echo(
            f"skipped {len(skipped)} file(s) without an image or video extension in folders "
            f"(e.g. {', '.join(str(f) for f in skipped[:3])})",
            err=True,
        )
    return videos, rest


def predict_videos(
    paths, options: dict, *, run, as_json: bool, detect: bool, router, use_flat: bool, batch_size: int
) -> tuple[list, int]:
    """Predict the videos among ``paths``; returns (the other paths, the number of files that failed)."""
    videos, rest = split_paths(paths)
    given = [f"--{k.replace('_', '-')}" for k, v in options.items() if v is not None and k != "smooth_method"]
    if not videos:
        if given:
            raise UserError(
                f"{', '.join(given)} appl{'ies' if len(given) == 1 else 'y'} to videos "
                f"({', '.join(VIDEO_SUFFIXES)}); none among the inputs"
            )
        return rest, 0
    return rest, run_videos(
        videos,
        options,
        run=run,
        as_json=as_json,
        detect=detect,
        router=router,
        use_flat=use_flat,
        batch_size=batch_size,
    )


def _annotate_targets(videos: list[Path], annotate: str | None) -> list[Path | None]:
    if annotate is None:
        return [None] * len(videos)
    out = Path(annotate)
    if out.suffix.lower() in VIDEO_SUFFIXES:
        if len(videos) > 1:
            raise UserError(
                f"--annotate {out} names one video file, but {len(videos)} videos are given: pass a folder instead"
            )
        return [out]
    if out.exists() and not out.is_dir():
        raise UserError(f"--annotate {out}: not a folder (and not a video file name)")
    names: dict[str, int] = {}
    targets = []
    for v in videos:  # same names from different folders get a number
        k = names[v.stem] = names.get(v.stem, 0) + 1
        targets.append(out / f"{v.stem}{'' if k == 1 else f'-{k}'}.annotated.mp4")
    return targets


def run_videos(
    videos: list[Path], options: dict, *, run, as_json: bool, detect: bool, router, use_flat: bool, batch_size: int
) -> int:
    """Analyse each video, print its summary lines (and JSON rows), write the outputs; returns failures."""
    from .video import FrameSelection, RunAnalyser, VideoError, add_smoothing, analyse_video
    from .video_report import annotate_video, plot_tracks, summary_line, track_summary

    selection = FrameSelection(
        options.get("every"), options.get("target_fps"), options.get("start"), options.get("end")
    )
    smooth, method = options.get("smooth"), options.get("smooth_method") or "centred"
    if smooth is not None and not (math.isfinite(smooth) and smooth > 0):
        raise UserError(f"--smooth must be > 0 seconds, got {smooth}")
    targets = _annotate_targets(videos, options.get("annotate"))
    csv_file = Path(options["csv_file"]) if options.get("csv_file") else None
    summary_dir = Path(options["summary_dir"]) if options.get("summary_dir") else None
    _check_writable(csv_file, summary_dir, *(t.parent for t in targets if t is not None))
    analyser = RunAnalyser(run, router=router, use_flat=use_flat, detect=detect)
    say = click.echo if not as_json else (lambda m: click.echo(m, err=True))  # stdout holds the JSON rows
    failed, wrote_csv, summaries, stems = 0, False, [], {}
    for video, target in zip(videos, targets):
        try:
            res = analyse_video(video, analyser, selection, batch_size)
        except VideoError as exc:
            click.echo(f"error: {video}: {exc}", err=True)
            failed += 1
            continue
        table = add_smoothing(res.table, smooth, method) if smooth else res.table
        info = res.info
        rate = res.n_decoded / res.seconds if res.seconds > 0 else float("nan")
        head = (
            f"{video}: {res.n_decoded} frames ({info.width}x{info.height}, {info.fps:g} fps), "
            f"{res.n_analysed} analysed in {res.seconds:.1f} s ({rate:.1f} frames/s)"
        )
        if res.truncated:
            click.echo(f"error: {video}: {res.truncated} (the frames before it are reported)", err=True)
            failed += 1
        if as_json:
            for rec in _json_rows(table):
                click.echo(json.dumps(rec))
        if table.empty:
            say(f"{head}; no face found (use --no-detect if the frames are face crops)")
        else:
            summary = track_summary(table)
            say(f"{head}; {len(summary)} track(s)")
            for _, row in summary.iterrows():
                say(summary_line(row))
            summaries.append(summary)
        if csv_file is not None:
            table.to_csv(
                csv_file, mode="a" if wrote_csv else "w", header=not wrote_csv, index=False, float_format="%.4f"
            )
            wrote_csv = True
        if summary_dir is not None and not table.empty:
            k = stems[video.stem] = stems.get(video.stem, 0) + 1
            stem = video.stem if k == 1 else f"{video.stem}-{k}"
            for p in plot_tracks(table, summary_dir, stem):
                say(f"wrote {p}")
        if target is not None:
            n = annotate_video(video, table, target, selection)
            say(f"wrote {target} ({n} frames)")
    if summary_dir is not None and summaries:
        import pandas as pd

        path = summary_dir / "summary.csv"
        pd.concat(summaries).to_csv(path, index=False, float_format="%.4f")
        say(f"wrote {path}")
    if csv_file is not None and wrote_csv:
        say(f"wrote {csv_file}")
    if failed:
        click.echo(f"{failed} of {len(videos)} video(s) could not be (fully) read", err=True)
    return failed


def _check_writable(csv_file: Path | None, *folders: Path | None) -> None:
    """Output places that cannot be written are one line now, not a traceback after the analysis."""
    try:
        for folder in folders:
            if folder is not None:
                folder.mkdir(parents=True, exist_ok=True)
        if csv_file is not None:
            csv_file.parent.mkdir(parents=True, exist_ok=True)
            csv_file.open("a").close()
    except OSError as exc:
        raise UserError(f"cannot write {exc.filename or csv_file}: {exc.strerror or exc}") from None


def _json_rows(table):
    from .video import PROBA_COLUMNS

    for r in table.to_dict("records"):
        rec = {
            "file": r["file"],
            "frame": int(r["frame"]),
            "time_s": r["time_s"],
            "track": int(r["track"]),
            "box": [int(r[k]) for k in ("box_x", "box_y", "box_w", "box_h")],
            "emotion": r["emotion"],
            "probabilities": {c[2:]: round(float(r[c]), 4) for c in PROBA_COLUMNS},
            "valence": _num(r["valence"]),
            "arousal": _num(r["arousal"]),
            "neighborhood": int(r["neighborhood"]),
        }
        if "emotion_smooth" in r:
            rec.update(
                emotion_smooth=r["emotion_smooth"],
                probabilities_smooth={c[2:]: round(float(r[f"{c}_smooth"]), 4) for c in PROBA_COLUMNS},
                valence_smooth=_num(r["valence_smooth"]),
                arousal_smooth=_num(r["arousal_smooth"]),
            )
        yield rec


def _num(v):
    return None if v is None or not math.isfinite(v) else round(float(v), 4)
