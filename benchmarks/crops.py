"""Do faces cropped from photos look like the FER+ faces the model learned from? Measure, then picture.

    OMP_NUM_THREADS=1 python benchmarks/crops.py [--n-fer 300]

Geometry: MTCNN's landmarks on FER+ training faces (upscaled 4x so it can see them) give where
the eyes and mouth sit in a FER+ crop and how far apart the eyes are, as fractions of the crop
side. The same fractions are computed for the aligned crops of the faces MTCNN finds in the
shared photos, for several margins; the margin whose eye distance matches FER+ is the default.

Picture (benchmarks/results/crops-ferplus-vs-detector.png): the mean FER+ training face (an
average of many faces, no one's image is redistributed), the mean aligned photo crop at each
margin, and scikit-image's public-domain astronaut cropped at each margin, all 96 px, gray.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from common import ROOT, save
from PIL import Image, ImageDraw

MARGINS = (-0.1, -0.05, 0.0, 0.1, 0.2)


def _geometry(lm: np.ndarray, side: float, origin: np.ndarray, angle: float) -> dict:
    """Eye distance, eye height and mouth height as fractions of a crop of ``side`` at ``origin`` turned by ``angle``."""
    c, s = np.cos(-np.radians(angle)), np.sin(-np.radians(angle))
    rot = (lm - origin) @ np.array([[c, s], [-s, c]])  # into the crop's upright frame, centre at 0
    eyes, mouth = rot[:2].mean(0), rot[3:].mean(0)
    return {
        "eye_distance": float(np.linalg.norm(rot[1] - rot[0]) / side),
        "eye_y": float(eyes[1] / side + 0.5),
        "mouth_y": float(mouth[1] / side + 0.5),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-fer", type=int, default=300)
    ap.add_argument("--ferplus", default=str(ROOT.parent / "shared" / "data" / "ferplus" / "FER2013Train"))
    ap.add_argument("--photos", default=str(ROOT.parent / "shared" / "data" / "photos"))
    args = ap.parse_args()

    from skimage import data as skdata

    from ensemble.data import open_image
    from ensemble.detect import align_crop, detect, eye_angle

    fer_files = sorted(Path(args.ferplus).glob("*.png"))
    if not fer_files:
        raise SystemExit(f"skipped: no FER+ images at {args.ferplus}")
    rng = np.random.default_rng(0)
    picked = [fer_files[i] for i in rng.choice(len(fer_files), min(args.n_fer, len(fer_files)), replace=False)]
    fer_geo, fer_mean = [], np.zeros((96, 96))
    for f in picked:
        g = Image.open(f).convert("L")
        fer_mean += np.asarray(g.resize((96, 96), Image.BILINEAR), np.float64)
        faces = detect(g.convert("RGB").resize((192, 192), Image.BICUBIC), "mtcnn")
        if faces:
            fer_geo.append(_geometry(faces[0].landmarks, 192.0, np.array([96.0, 96.0]), 0.0))
    fer_mean /= len(picked)
    fer = {k: float(np.median([g[k] for g in fer_geo])) for k in fer_geo[0]}
    print(
        f"FER+ ({len(fer_geo)} of {len(picked)} faces with landmarks): eye distance {fer['eye_distance']:.3f}, "
        f"eyes at {fer['eye_y']:.3f}, mouth at {fer['mouth_y']:.3f} of the crop side"
    )

    photo_faces = []
    for p in sorted(Path(args.photos).iterdir()):
        if p.suffix.lower() not in (".jpg", ".jpeg", ".png"):
            continue
        im = open_image(p)
        photo_faces += [(im, f) for f in detect(im, "mtcnn")]
    table, means = {}, {}
    for m in MARGINS:
        geo, acc = [], np.zeros((96, 96))
        for im, f in photo_faces:
            x, y, w, h = f.box
            geo.append(
                _geometry(
                    f.landmarks, max(w, h) * (1 + 2 * m), np.array([x + w / 2, y + h / 2]), eye_angle(f.landmarks)
                )
            )
            acc += np.asarray(Image.fromarray(align_crop(im, f.box, f.landmarks, m, 96)).convert("L"), np.float64)
        means[m] = acc / len(photo_faces)
        table[m] = {k: round(float(np.median([g[k] for g in geo])), 4) for k in geo[0]}
        print(
            f"margin {m:+.2f} ({len(geo)} photo faces): eye distance {table[m]['eye_distance']:.3f}, "
            f"eyes at {table[m]['eye_y']:.3f}, mouth at {table[m]['mouth_y']:.3f}"
        )
    best = min(MARGINS, key=lambda m: abs(table[m]["eye_distance"] - fer["eye_distance"]))
    print(f"closest to FER+ by eye distance: mtcnn margin {best:+.2f}")
    # Haar has no landmarks: match its box to MTCNN's on the same faces, so both crop alike
    ratio, shift = [], []
    for im, f in photo_faces:
        x, y, w, h = f.box
        for hx, hy, hw, hh in (g.box for g in detect(im, "haar")):
            if abs(hx + hw / 2 - x - w / 2) < w / 3 and abs(hy + hh / 2 - y - h / 2) < h / 3:
                ratio.append(max(w, h) / max(hw, hh))
                shift.append((y + h / 2 - hy - hh / 2) / max(hw, hh))
    haar_margin = (float(np.median(ratio)) * (1 + 2 * best) - 1) / 2
    print(
        f"haar: mtcnn side / haar side {np.median(ratio):.3f} on {len(ratio)} faces both found, centre shift "
        f"{np.median(shift):+.3f} of the side -> haar margin {haar_margin:+.3f} crops like mtcnn at {best:+.2f}"
    )

    astro = Image.fromarray(skdata.astronaut())
    af = detect(astro, "mtcnn")[0]
    tile, pad = 96, 4
    cols = 1 + len(MARGINS)
    sheet = Image.new("L", (cols * (tile + pad) + pad, 2 * (tile + pad) + pad + 28), 255)
    draw = ImageDraw.Draw(sheet)
    sheet.paste(Image.fromarray(fer_mean.astype(np.uint8)), (pad, pad + 14))
    draw.text((pad, 2), "FER+ mean", fill=0)
    for j, m in enumerate(MARGINS, start=1):
        x0 = pad + j * (tile + pad)
        draw.text((x0, 2), f"margin {m:+.2f}", fill=0)
        sheet.paste(Image.fromarray(means[m].astype(np.uint8)), (x0, pad + 14))
        sheet.paste(
            Image.fromarray(align_crop(astro, af.box, af.landmarks, m, tile)).convert("L"), (x0, 2 * pad + 14 + tile)
        )
    draw.text((pad, 2 * pad + 14 + tile + 40), "photos: mean", fill=0)
    draw.text((pad, 2 * pad + 14 + tile + 54), "below: astronaut", fill=0)
    out = ROOT / "benchmarks" / "results" / "crops-ferplus-vs-detector.png"
    sheet.save(out, optimize=True)
    print(f"saved {out}")
    save(
        "crops",
        {
            "ferplus": {"n": len(fer_geo), **{k: round(v, 4) for k, v in fer.items()}},
            "photos_mtcnn": {str(m): v for m, v in table.items()},
            "n_photo_faces": len(photo_faces),
            "closest_margin": best,
            "haar": {
                "mtcnn_over_haar_side": round(float(np.median(ratio)), 4),
                "n": len(ratio),
                "equivalent_margin": round(haar_margin, 4),
            },
        },
    )


if __name__ == "__main__":
    main()
