"""``ensemble data summary``: what a data set holds, and what was dropped and why."""

from __future__ import annotations

from collections import Counter


from .data import CLASSES, ImageError, load_dataset, open_image


def summarize(cfg, verify: bool = True) -> dict:
    """Counts per split and class, V/A mean/std per class, dropped rows by reason."""
    ds = load_dataset(cfg.data, seed=cfg.train.seed)
    df = ds.manifest
    dropped = Counter(ds.dropped)
    if verify:
        bad = []
        for i, path in enumerate(df["path"]):
            try:
                open_image(path)
            except ImageError as exc:
                bad.append(i)
                dropped[f"unreadable image ({str(exc).split(':')[0].split(' (')[0]})"] += 1
        df = df.drop(index=bad)
    splits = {}
    for split, g in df.groupby("split", sort=False):
        per_class = {}
        for ci, c in enumerate(CLASSES):
            sub = g[g["label"] == ci]
            if len(sub):
                per_class[c] = {"valence_mean": float(sub["valence"].mean()), "valence_std": float(sub["valence"].std(ddof=0)),
                                "arousal_mean": float(sub["arousal"].mean()), "arousal_std": float(sub["arousal"].std(ddof=0))}
        splits[split] = {"n": int(len(g)), "counts": {c: int((g["label"] == i).sum()) for i, c in enumerate(CLASSES)},
                         "va": per_class, "va_source": sorted(g["va_source"].unique().tolist())}
    order = [s for s in ("train", "val", "test") if s in splits]
    return {"format": cfg.data.format, "root": cfg.data.root, "splits": {s: splits[s] for s in order},
            "dropped": dict(dropped), "n_dropped": int(sum(dropped.values()))}


def render_summary(result: dict) -> str:
    lines = [f"data set: {result['format']} {result['root']}".rstrip()]
    head = f"{'class':<10}" + "".join(f"{s:>9}" for s in result["splits"])
    lines += ["", head, "-" * len(head)]
    for c in CLASSES:
        lines.append(f"{c:<10}" + "".join(f"{result['splits'][s]['counts'][c]:>9}" for s in result["splits"]))
    lines.append(f"{'total':<10}" + "".join(f"{result['splits'][s]['n']:>9}" for s in result["splits"]))
    for s, info in result["splits"].items():
        lines += ["", f"{s}: valence/arousal mean ± std per class ({', '.join(info['va_source'])})"]
        for c, v in info["va"].items():
            lines.append(f"  {c:<10} V {v['valence_mean']:+.2f} ± {v['valence_std']:.2f}   "
                         f"A {v['arousal_mean']:+.2f} ± {v['arousal_std']:.2f}")
    lines += ["", f"dropped: {result['n_dropped']}"]
    lines += [f"  {n:>7}  {reason}" for reason, n in sorted(result["dropped"].items(), key=lambda kv: -kv[1])]
    return "\n".join(lines)
