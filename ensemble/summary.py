"""``ensemble data summary``: what a data set holds, and what was dropped and why."""

from __future__ import annotations

import warnings
from collections import Counter

from .data import CLASSES, ImageError, load_dataset, open_image
from .errors import UserError


def summarize(cfg, verify: bool = True) -> dict:
    """Counts per split and class, V/A mean/std per class, dropped rows by reason (in all and per split)."""
    ds = load_dataset(cfg.data, seed=cfg.train.seed)
    df = ds.manifest
    dropped = Counter(ds.dropped)
    by_split = {s: Counter(c) for s, c in ds.dropped_by_split.items()}
    if verify:
        bad, examples = [], []
        for i, (path, split) in enumerate(zip(df["path"], df["split"])):
            try:
                open_image(path)
            except ImageError as exc:
                if cfg.data.strict:
                    raise UserError(f"unreadable image {exc} (data.strict is on)") from None
                bad.append(i)
                reason = f"unreadable image ({str(exc).split(':')[0].split(' (')[0]})"
                dropped[reason] += 1
                by_split.setdefault(split, Counter())[reason] += 1
                if len(examples) < 20:  # one line per bad file, the first 20
                    examples.append(f"{path}: {exc}")
        for line in examples:
            warnings.warn(f"unreadable image {line}", stacklevel=2)
        if len(bad) > len(examples):
            warnings.warn(f"... and {len(bad) - len(examples)} more unreadable image(s)", stacklevel=2)
        df = df.drop(index=bad)
    splits = {}
    for split, g in df.groupby("split", sort=False):
        per_class = {}
        for ci, c in enumerate(CLASSES):
            sub = g[g["label"] == ci]
            if len(sub):
                per_class[c] = {
                    "valence_mean": float(sub["valence"].mean()),
                    "valence_std": float(sub["valence"].std(ddof=0)),
                    "arousal_mean": float(sub["arousal"].mean()),
                    "arousal_std": float(sub["arousal"].std(ddof=0)),
                }
        splits[split] = {
            "n": int(len(g)),
            "counts": {c: int((g["label"] == i).sum()) for i, c in enumerate(CLASSES)},
            "va": per_class,
            "va_source": sorted(g["va_source"].unique().tolist()),
        }
    order = [s for s in ("train", "val", "test") if s in splits]
    for s in order:
        splits[s]["dropped"] = dict(by_split.get(s, {}))
        splits[s]["n_dropped"] = int(sum(by_split.get(s, Counter()).values()))
    return {
        "format": cfg.data.format,
        "root": cfg.data.root,
        "notes": list(ds.notes),
        "splits": {s: splits[s] for s in order},
        "dropped": dict(dropped),
        "n_dropped": int(sum(dropped.values())),
        "dropped_by_split": {s: dict(c) for s, c in by_split.items()},
    }


def render_summary(result: dict) -> str:
    """A data-set summary as plain text: faces per class and split, V/A mean ± std per class, dropped rows by reason."""
    lines = [f"data set: {result['format']} {result['root']}".rstrip()]
    lines += [f"note: {note}" for note in result.get("notes", [])]
    head = f"{'class':<10}" + "".join(f"{s:>9}" for s in result["splits"])
    lines += ["", head, "-" * len(head)]
    for c in CLASSES:
        lines.append(f"{c:<10}" + "".join(f"{result['splits'][s]['counts'][c]:>9}" for s in result["splits"]))
    lines.append(f"{'total':<10}" + "".join(f"{result['splits'][s]['n']:>9}" for s in result["splits"]))
    for s, info in result["splits"].items():
        lines += ["", f"{s}: valence/arousal mean ± std per class ({', '.join(info['va_source'])})"]
        for c, v in info["va"].items():
            lines.append(
                f"  {c:<10} V {v['valence_mean']:+.2f} ± {v['valence_std']:.2f}   "
                f"A {v['arousal_mean']:+.2f} ± {v['arousal_std']:.2f}"
            )
    per_split = ", ".join(f"{s} {n}" for s, c in result["dropped_by_split"].items() if (n := sum(c.values())))
    lines += ["", f"dropped: {result['n_dropped']}" + (f" ({per_split})" if per_split else "")]
    lines += [f"  {n:>7}  {reason}" for reason, n in sorted(result["dropped"].items(), key=lambda kv: -kv[1])]
    return "\n".join(lines)
