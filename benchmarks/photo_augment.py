"""What each photo augmentation buys: flat FER+ models trained with one augmentation added at a time.

    python benchmarks/photo_augment.py [--train-faces 5000] [--epochs 2] [--variants base,jitter,...]
                                       [--run artifacts/photo-augment] [--set section.key=value ...]

Every variant trains the flat model of ``configs/ferplus-cpu.toml`` (vote targets, transform
up-sampling, weighted loss) on the same seeded, stratified subset of FER2013Train
(``data.max_samples``; the selection split ``val`` and FER2013Valid stay whole), with the photo
augmentations switched off except the variant's own:

    base      crop/flip jitter of +-10% and no photo augmentation (the recipe before them)
    jitter    scale/shift jitter +-15%
    lighting  brightness +-0.3, contrast x(1 +- 0.3)
    blur      Gaussian blur, sigma up to 1 px, half the faces
    jpeg      JPEG quality 30-95, half the faces
    all       all of the above (what configs/ferplus-cpu.toml trains with)
    base@1    base again with train.seed = 1: the seed-to-seed spread the differences must beat

(grayscale is not a variant: FER+ faces are gray already, and predict shows colour photos to a
FER+ model in gray.) Each model is scored on FER2013Valid (the test split ``valid``; the epoch
was chosen on ``val``) as it is, and after fixed photo-like degradations of every face — a
detector-style crop (zoomed out 10% and shifted 10%), blur (sigma 1.2 px), JPEG (quality 15),
washed-out lighting (contrast x0.6, brightness +0.15) and all four at once. The augmentations
and the degradations come from the same families, so the degraded scores measure robustness to
them, not accuracy on photos.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from common import ROOT, save

PHOTO_OFF = ["train.brightness=0", "train.contrast=0", "train.blur=0", "train.jpeg=0", "train.grayscale=0"]
VARIANTS = {
    "base": ["train.crop_scale=0.1"],
    "jitter": ["train.crop_scale=0.15"],
    "lighting": ["train.crop_scale=0.1", "train.brightness=0.3", "train.contrast=0.3"],
    "blur": ["train.crop_scale=0.1", "train.blur=1.0"],
    "jpeg": ["train.crop_scale=0.1", "train.jpeg=30"],
    "all": ["train.crop_scale=0.15", "train.brightness=0.3", "train.contrast=0.3", "train.blur=1.0", "train.jpeg=30"],
    "base@1": ["train.crop_scale=0.1", "train.seed=1"],
}


def degrade(x, kind: str):
    """Fixed photo-like degradations of faces ``x`` (n, 3, H, W) in [0, 1]."""
    import torch

    from ensemble.batches import _blur, _jpeg, warp

    n = x.shape[0]
    kinds = ("crop", "blur", "jpeg", "lighting") if kind == "all" else (kind,)
    for k in kinds:
        if k == "crop":
            one = torch.ones(n)
            x = warp(x, torch.zeros(n), one, one * 0.9, one * 0.1, one * 0.1)
        elif k == "blur":
            x = _blur(x, torch.full((n,), 1.2))
        elif k == "jpeg":
            x = _jpeg(x, torch.full((n,), 15))
        elif k == "lighting":
            mean = x.mean((1, 2, 3), keepdim=True)
            x = ((x - mean) * 0.6 + mean + 0.15).clamp(0, 1)
    return x


def score(run: Path, exp, split: str) -> dict:
    """Accuracy and balanced accuracy of the run's flat model on ``split``, clean and degraded."""
    import torch

    from ensemble.metrics import classification_metrics
    from ensemble.predictors import FlatPredictor

    fp = FlatPredictor.load(run)
    idx = exp.idx(split)
    y = exp.manifest["label"].to_numpy()[idx]
    faces = torch.from_numpy(np.stack([exp.images.get(int(i)) for i in idx])).permute(0, 3, 1, 2).float() / 255
    mean = torch.tensor(fp.mean).view(1, 3, 1, 1)
    std = torch.tensor(fp.std).view(1, 3, 1, 1)
    out = {}
    for kind in ("clean", "crop", "blur", "jpeg", "lighting", "all"):
        x = faces if kind == "clean" else degrade(faces, kind)
        p = fp.proba_from_input(((x - mean) / std).numpy())
        m = classification_metrics(y, p.argmax(1), fp.classes)
        out[kind] = {"accuracy": m["accuracy"], "balanced_accuracy": m["balanced_accuracy"]}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "configs" / "ferplus-cpu.toml"))
    ap.add_argument("--run", default=str(ROOT / "artifacts" / "photo-augment"), help="one run folder per variant")
    ap.add_argument("--train-faces", type=int, default=5000, help="data.max_samples: faces per split at most")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--cap", type=int, default=1000, help="balance.cap of the transform up-sampling")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--split", default="valid")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--name", default="photo-augment")
    args = ap.parse_args()
    names = [v for v in args.variants.split(",") if v]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        ap.error(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")

    from ensemble.config import load_config
    from ensemble.experiment import open_experiment
    from stages.flat import fit_flat

    common = [
        f"data.max_samples={args.train_faces}",
        f"train.epochs={args.epochs}",
        f"balance.cap={args.cap}",
        *PHOTO_OFF,
        *args.overrides,
    ]
    results = {}
    for name in names:
        overrides = [*common, *VARIANTS[name]]
        run = Path(args.run) / name.replace("@", "-seed")
        t = time.time()
        exp = open_experiment(load_config(args.config, overrides), run)
        fit_flat(
            exp, log=lambda msg, *a, v=name, **k: print(f"  {v}: {msg}", flush=True)
        )  # progress, for runs cut short
        results[name] = {"overrides": overrides, "minutes": (time.time() - t) / 60, **score(run, exp, args.split)}
        r = results[name]
        print(
            f"{name:<9} clean {100 * r['clean']['accuracy']:.1f} / {100 * r['clean']['balanced_accuracy']:.1f}   "
            + "  ".join(
                f"{k} {100 * r[k]['balanced_accuracy']:.1f}" for k in ("crop", "blur", "jpeg", "lighting", "all")
            )
            + f"   ({r['minutes']:.1f} min)",
            flush=True,
        )
    save(
        args.name,
        {
            "command": "python benchmarks/photo_augment.py "
            + " ".join(
                [
                    f"--train-faces {args.train_faces}",
                    f"--epochs {args.epochs}",
                    f"--cap {args.cap}",
                    f"--variants {','.join(names)}",
                    *(f"--set {o}" for o in args.overrides),
                ]
            ),
            "split": args.split,
            "what": "flat models, one photo augmentation added at a time; FER2013Valid clean and degraded "
            "(accuracy / balanced accuracy)",
            "variants": results,
        },
    )


if __name__ == "__main__":
    main()
