"""Procedural synthetic faces: the built-in data set for the demo and the tests.

Each face is drawn with PIL from its class and its sampled (valence, arousal):
valence bends the mouth and tilts the brows, arousal opens eyes and mouth, and each class
adds its own action with a random intensity (contempt: a one-sided smirk; disgust: nose
wrinkle and raised upper lip; fear: raised inner brows and a stretched mouth; surprise: an
open round mouth; anger: lowered inner brows; sad: raised inner brows and a frown).
Low intensities make neighbours (contempt/disgust, fear/surprise) genuinely confusable.
Nuisances: position, scale, rotation, skin tone, lighting, noise, an occasional occluder.

Train and val are imbalanced like AffectNet (happy most, contempt least); test is balanced,
like AffectNet's official validation set. Deterministic for a seed.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from .classes import CLASSES, VA_PROTOTYPES
from .paths import make_dir

#: share of each class in train/val (AffectNet-like imbalance, about 10:1)
CLASS_SHARES = {
    "neutral": 0.22,
    "happy": 0.32,
    "sad": 0.09,
    "surprise": 0.08,
    "fear": 0.06,
    "disgust": 0.05,
    "anger": 0.10,
    "contempt": 0.035,
}
TEST_SHARE = 0.12  # of all images, split equally over the classes
VAL_SHARE = 0.12  # of the rest
GENERATOR_VERSION = 3  # bump when drawing changes, so cached sets are redrawn


def draw_face(cls: str, valence: float, arousal: float, rng: np.random.Generator, size: int = 64) -> Image.Image:
    """One synthetic face as an RGB image of ``size`` pixels."""
    s = 128  # draw at 128 px, then downsample (anti-aliasing for free)
    bg = int(rng.integers(40, 200))
    img = Image.new("RGB", (s, s), (bg, bg, bg))
    d = ImageDraw.Draw(img)
    k = float(rng.uniform(0.1, 0.9))  # intensity of the class-specific action
    cx, cy = s / 2 + rng.normal(0, 5), s / 2 + rng.normal(0, 5)
    sc = rng.uniform(0.85, 1.1)
    tone = np.array([rng.uniform(120, 240), rng.uniform(90, 200), rng.uniform(70, 170)])
    skin = tuple(int(v) for v in tone)
    dark = tuple(int(v * 0.35) for v in tone)
    fw, fh = 40 * sc, 52 * sc
    d.ellipse([cx - fw, cy - fh, cx + fw, cy + fh], fill=skin)

    def P(x, y):  # face coordinates (unit ~ face half-width/40) to pixels
        return (cx + x * sc, cy + y * sc)

    # eyes: arousal widens them, a smile narrows them; fear and surprise widen more
    open_e = (
        4
        + 3 * arousal
        - 2 * max(0.0, valence)
        + (4 * k if cls in ("fear", "surprise") else 0)
        - (2 * k if cls == "contempt" else 0)
    )
    open_e = max(1.0, open_e)
    for ex in (-15, 15):
        x0, y0 = P(ex - 7, -12 - open_e)
        x1, y1 = P(ex + 7, -12 + open_e)
        d.ellipse([x0, y0, x1, y1], fill=(245, 245, 245))
        px0, py0 = P(ex - 2.5, -14.5)
        px1, py1 = P(ex + 2.5, -9.5)
        d.ellipse([px0, py0, px1, py1], fill=(20, 20, 20))

    # brows: valence tilts (negative: inner ends down), classes add raise/frown
    for side in (-1, 1):
        inner_y = -24 - 3 * arousal + 4 * valence
        outer_y = -26
        if cls == "anger":
            inner_y += 7 * k
        if cls in ("sad", "fear"):
            inner_y -= 6 * k
        if cls == "surprise":
            inner_y -= 6 * k
            outer_y -= 6 * k
        if cls == "disgust":
            inner_y += 4 * k
        d.line([P(side * 6, inner_y), P(side * 24, outer_y)], fill=dark, width=max(1, int(3 * sc)))

    # nose, and disgust's wrinkle
    d.line([P(0, -8), P(-3, 6), P(2, 7)], fill=dark, width=2)
    if cls == "disgust":
        for dx in (-6, 6):
            d.line([P(dx - 3, -6), P(dx + 3, -2)], fill=dark, width=max(1, int(2 * k + 0.5)))

    # mouth: valence curves it, arousal opens it
    width = 16 + (4 * k if cls == "fear" else 0) - (5 * k if cls == "surprise" else 0)
    curve = 11 * valence
    left_lift = right_lift = 0.0
    if cls == "contempt":
        right_lift = 8 * k  # one-sided smirk
    if cls == "disgust":
        curve -= 2 * k
    opening = max(0.0, 2 + 5 * arousal + (8 * k if cls == "surprise" else 0) + (3 * k if cls == "fear" else 0))
    my = 24 - (3 * k if cls == "disgust" else 0)
    pts_top, pts_bot = [], []
    for i in range(11):
        t = -1 + i / 5
        lift = left_lift * max(0, -t) + right_lift * max(0, t)
        y = my - curve * (t * t) - lift
        pts_top.append(P(width * t, y - opening * 0.3 * (1 - t * t)))
        pts_bot.append(P(width * t, y + opening * (1 - t * t)))
    if opening > 1.5:
        d.polygon(pts_top + pts_bot[::-1], fill=(70, 20, 25))
    d.line(pts_top, fill=(120, 40, 40), width=max(1, int(2 * sc)))
    d.line(pts_bot, fill=(120, 40, 40), width=max(1, int(2 * sc)))

    # occluder (hand, glasses, microphone …) now and then
    if rng.random() < 0.15:
        ox, oy = rng.uniform(0, s - 30), rng.uniform(0, s - 30)
        g = int(rng.integers(0, 255))
        d.rectangle([ox, oy, ox + rng.uniform(12, 30), oy + rng.uniform(8, 24)], fill=(g, g, g))

    img = img.rotate(float(rng.uniform(-15, 15)), resample=Image.BILINEAR, fillcolor=(bg, bg, bg))
    arr = np.asarray(img, dtype=np.float32)
    gx = np.linspace(-1, 1, s)[None, :, None]
    arr = arr * (1 + rng.uniform(-0.25, 0.25) * gx) * rng.uniform(0.75, 1.2)  # lighting
    arr += rng.normal(0, rng.uniform(3, 14), arr.shape)  # sensor noise
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    if rng.random() < 0.3:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.0)))
    return img.resize((size, size), Image.BILINEAR)


def sample_plan(n: int, seed: int) -> list[tuple[str, str, float, float]]:
    """(split, class, valence, arousal) for each of ``n`` images."""
    rng = np.random.default_rng(seed)
    n_test_per = max(1, int(n * TEST_SHARE) // len(CLASSES))
    rest = n - n_test_per * len(CLASSES)
    shares = np.array([CLASS_SHARES[c] for c in CLASSES])
    counts = np.maximum(4, np.round(shares / shares.sum() * rest)).astype(int)
    plan = []
    for ci, c in enumerate(CLASSES):
        n_val = max(1, int(round(counts[ci] * VAL_SHARE)))
        splits = ["test"] * n_test_per + ["val"] * n_val + ["train"] * (counts[ci] - n_val)
        for split in splits:
            v0, a0 = VA_PROTOTYPES[c]
            v = float(np.clip(v0 + rng.normal(0, 0.2), -1, 1))
            a = float(np.clip(a0 + rng.normal(0, 0.2), -1, 1))
            plan.append((split, c, v, a))
    order = rng.permutation(len(plan))
    return [plan[i] for i in order]


def synthetic_dataset(cache_dir: Path, n: int = 4000, size: int = 64, seed: int = 0) -> list[dict]:
    """Draw (or reuse) the synthetic set under ``cache_dir``; manifest rows with measured V/A."""
    folder = Path(cache_dir) / f"synthetic-v{GENERATOR_VERSION}-s{seed}-n{n}-{size}px"
    index = folder / "index.json"
    if not index.is_file():
        make_dir(folder.parent, "data.cache_dir")
        tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        records = []
        for i, (split, c, v, a) in enumerate(sample_plan(n, seed)):
            rng = np.random.default_rng([seed, i])
            name = f"{split}_{i:05d}_{c}.png"
            draw_face(c, v, a, rng, size).save(tmp / name, optimize=False)
            records.append({"file": name, "split": split, "label": CLASSES.index(c), "valence": v, "arousal": a})
        (tmp / "index.json").write_text(json.dumps(records))
        try:
            os.replace(tmp, folder)
        except OSError:  # another process finished first
            shutil.rmtree(tmp, ignore_errors=True)
    records = json.loads(index.read_text())
    return [
        {
            "path": str(folder / r["file"]),
            "x": math.nan,
            "y": math.nan,
            "w": math.nan,
            "h": math.nan,
            "label": r["label"],
            "valence": r["valence"],
            "arousal": r["arousal"],
            "va_source": "measured",
            "split": r["split"],
        }
        for r in records
    ]
