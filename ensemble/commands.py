"""Bodies of CLI commands too long for cli.py. ``ensemble predict``: files and folders in, one line
(or JSON object) per face out, through the Python API (:mod:`ensemble.api`), optionally annotated
images and a CSV table."""

from __future__ import annotations

import json
from pathlib import Path

import click

from .errors import UserError
from .paths import Protected, check_target, make_dir, shown, write_user_file


def _line(rec: dict) -> str:
    probs = sorted(rec["probabilities"].items(), key=lambda kv: -kv[1])
    box = f" [{','.join(map(str, rec['box']))}]" if rec["box"] else ""
    va = (
        f"  V {rec['valence']:+.2f} A {rec['arousal']:+.2f}  neighborhood {rec['neighborhood']}"
        if "valence" in rec
        else ""
    )
    label = (
        f"uncertain (best guess {rec['top_emotion']} {rec['confidence']:.2f})"
        if rec["uncertain"]
        else f"{rec['emotion']} {rec['confidence']:.2f}"
    )
    return (
        f"{shown(rec['file'])}{box}: {label}  "
        f"(then {probs[1][0]} {probs[1][1]:.2f}, {probs[2][0]} {probs[2][1]:.2f}){va}"
    )


def run_predict(
    paths,
    run,
    as_json: bool,
    detector: str,
    router: str | None,
    use_flat: bool,
    batch_size: int = 32,
    min_confidence: float = 0.0,
    annotate: Path | None = None,
    csv: Path | None = None,
    *,
    model=None,
    precision: str = "auto",
    device: str = "cpu",
    processes: int | str = 0,
    backend: str = "auto",
) -> int:
    """Predict every face; returns the number of files that failed (unreadable, not a regular
    file, or the detector failed on it: each named on stderr, the others still predicted).
    ``model``: an already loaded :class:`ensemble.api.Model` (the videos of the same command)."""
    from .api import face_table, flat_row, no_face_row, skipped_note, walk
    from .files import atomic_path

    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")
    from .video_cli import load_for_cli

    model = model or load_for_cli(run, use_flat, router, detector, min_confidence, precision, device, backend)
    files, skipped = walk(paths)
    if skipped:
        click.echo(skipped_note(skipped), err=True)
    if not files:
        raise UserError("no image files to predict")
    guard = Protected(files)  # no output may replace an input
    if annotate is not None:
        from .video_cli import VIDEO_SUFFIXES

        if annotate.suffix.lower() in VIDEO_SUFFIXES:
            raise UserError(f"--annotate {annotate} names a video file, but images are given: pass a folder")
        make_dir(annotate, "the --annotate folder")
        annotated = _annotated_names(files, Path(annotate), guard)
    if csv is not None:  # refused before any face is predicted: a FIFO, a device, a folder, an input
        check_target(make_dir(csv.parent, "the --csv folder") / csv.name, "--csv table", guard)
    failed, rows, written = 0, [], set()
    for src, recs, err in model.predict_many(files, batch_size=batch_size, processes=processes):
        if err is not None:
            click.echo(f"error: {shown(src)}: {err}", err=True)
            rows.append(no_face_row(src, err))  # the table has a row for every input
            failed += 1
            continue
        if not recs:
            if as_json:
                click.echo(json.dumps({"file": str(src), "box": None, "emotion": None, "note": "no face found"}))
            else:
                click.echo(f"{shown(src)}: no face found (use --detector none if the image is a face crop)")
            rows.append(no_face_row(src))
        for rec in recs:
            click.echo(json.dumps(rec) if as_json else _line(rec))
            rows.append(flat_row(rec))
        if annotate is not None:
            out = annotated[src]
            written.add(out)
            with atomic_path(out) as tmp:
                model.annotate(src, recs).save(tmp, format="JPEG", quality=90)
    if csv is not None:
        table = face_table(rows)
        write_user_file(csv, lambda tmp: table.to_csv(tmp, index=False), "--csv table", guard)
        click.echo(f"wrote {shown(csv)} ({sum(r.get('face') is not None for r in rows)} faces)", err=True)
    if annotate is not None:
        click.echo(f"wrote {len(written)} annotated image(s) to {shown(annotate)}", err=True)
    if failed:
        click.echo(f"{failed} of {len(files)} file(s) could not be read", err=True)
    return failed


def _annotated_names(files: list[Path], folder: Path, guard: Protected) -> dict[Path, Path]:
    """Where each input's annotated copy goes: ``FOLDER/STEM.jpg`` (``STEM-1.jpg``, … for inputs
    that share a name); refused before anything is predicted when one would replace an input."""
    out, taken = {}, set()
    for src in files:
        name, i = Path(src).stem, 1
        target = folder / f"{name}.jpg"
        while target in taken:  # two inputs with one name in different folders
            target = folder / f"{name}-{i}.jpg"
            i += 1
        taken.add(target)
        clash = guard.clash(target)
        if clash is not None:
            raise UserError(
                f"refusing to write the annotated {shown(src)} to {shown(target)}: it would replace {clash} "
                f"(choose another --annotate folder)"
            )
        out[src] = target
    return out
