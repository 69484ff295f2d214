"""``ensemble predict``: files and folders in, one line (or JSON object) per face out."""

from __future__ import annotations

import json
from pathlib import Path

import click
import numpy as np

from .data import CLASSES, IMAGE_EXTENSIONS, ImageError, face_array, open_image
from .errors import UserError


def _walk(paths) -> tuple[list[Path], list[Path]]:
    """Files to predict, and files skipped in walked folders because of their name."""
    files, skipped = [], []
    for p in map(Path, paths):
        if p.is_dir():
            for f in sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith(".")):
                (files if f.suffix.lower() in IMAGE_EXTENSIONS else skipped).append(f)
        else:
            files.append(p)  # named explicitly: always tried
    return files, skipped


def run_predict(
    paths, run: Path, as_json: bool, detect: bool, router: str | None, use_flat: bool, batch_size: int = 32
) -> int:
    """Predict every face; returns the number of files that failed."""
    from .faces import detect_faces
    from .predictors import FlatPredictor, HierarchicalPredictor, uint8_to_input

    model = FlatPredictor.load(run) if use_flat else HierarchicalPredictor.load(run, router=router)
    files, skipped = _walk(paths)
    if skipped:
        click.echo(
            f"skipped {len(skipped)} file(s) without an image extension in folders "
            f"(e.g. {', '.join(str(f) for f in skipped[:3])})",
            err=True,
        )
    if not files:
        raise UserError("no image files to predict")
    failed = 0
    faces, where = [], []  # face crops (uint8) and (file, box)

    def flush():
        if not faces:
            return
        x = uint8_to_input(np.stack(faces), model.mean, model.std)
        if use_flat:
            proba = model.proba_from_input(x)
            extra = [{} for _ in faces]
        else:
            va, ep = model.parts_from_input(x)
            proba, w = model.route(va, ep)
            extra = [
                {
                    "valence": round(float(v[0]), 4),
                    "arousal": round(float(v[1]), 4),
                    "neighborhood": int(r),
                    "expert": int(r),
                    "expert_classes": model.expert_classes[int(r)],
                }
                for v, r in zip(va, w.argmax(1))
            ]
        for (f, box), p, e in zip(where, proba, extra):
            top = np.argsort(-p)[:3]
            rec = {
                "file": str(f),
                "box": list(box) if box else None,
                "emotion": CLASSES[top[0]],
                "probability": round(float(p[top[0]]), 4),
                "top3": [[CLASSES[i], round(float(p[i]), 4)] for i in top],
                **e,
            }
            if as_json:
                click.echo(json.dumps(rec))
            else:
                va_txt = (
                    f"  V {rec['valence']:+.2f} A {rec['arousal']:+.2f}  neighborhood {rec['neighborhood']}"
                    if e
                    else ""
                )
                box_txt = f" [{','.join(map(str, box))}]" if box else ""
                click.echo(
                    f"{f}{box_txt}: {rec['emotion']} {rec['probability']:.2f}  "
                    f"(then {CLASSES[top[1]]} {p[top[1]]:.2f}, {CLASSES[top[2]]} {p[top[2]]:.2f}){va_txt}"
                )
        faces.clear()
        where.clear()

    for f in files:
        if not f.is_file():
            click.echo(f"error: {f}: no such file", err=True)
            failed += 1
            continue
        try:
            im = open_image(f)
        except ImageError as exc:
            click.echo(f"error: {f}: {exc}", err=True)
            failed += 1
            continue
        boxes = detect_faces(im) if detect else [None]
        if not boxes:
            flush()  # results stay in file order
            if as_json:
                click.echo(json.dumps({"file": str(f), "box": None, "emotion": None, "note": "no face found"}))
            else:
                click.echo(f"{f}: no face found (use --no-detect if the image is a face crop)")
            continue
        for box in boxes:
            faces.append(face_array(im, box, model.size))
            where.append((f, box))
            if len(faces) >= batch_size:
                flush()
    flush()
    if failed:
        click.echo(f"{failed} of {len(files)} file(s) could not be read", err=True)
    return failed
