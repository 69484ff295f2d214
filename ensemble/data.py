"""Data sets in, one manifest out.

Every adapter turns a data set on disk into the same manifest, a pandas DataFrame with one
row per face:

=============  =====================================================================
path           image file (str)
x, y, w, h     face box in pixels; NaN = the whole image
label          class index in :data:`CLASSES` order (int)
valence        in [-1, 1]; measured (AffectNet) or derived from the label distribution
arousal        in [-1, 1]
va_source      "measured" | "derived"
split          "train" | "val" (the selection split: every choice a run makes is made on it;
               held out of train, seeded and stratified, where the data set has none) |
               "valid" | "test" (test splits: nothing is tuned on them; "valid" is FER+'s
               FER2013Valid, reported beside FER2013Test)
vote_<class>   the 8-class label distribution for vote-labelled data (FER+); NaN otherwise
=============  =====================================================================

Rows that cannot be used are dropped and counted by reason in a ``Counter``; nothing is
lost silently.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from .classes import (  # noqa: F401  (re-exported: the manifest speaks in these)
    CLASS_ALIASES,
    CLASS_INDEX,
    CLASSES,
    VA_PROTOTYPES,
    VOTE_COLUMNS,
    canonical_class,
    prototype_table,
)
from .config import FORMATS
from .errors import UserError
from .images import IMAGE_EXTENSIONS, ImageError, face_array, open_image  # noqa: F401  (re-exported)

SPLITS = ("train", "val", "valid", "test")
SELECTION_SPLIT = "val"
#: Splits that only report: no epoch, router mode, temperature, weight or threshold is chosen on them.
TEST_SPLITS = ("valid", "test")

# FER+ label.csv vote order (after file and box)
FERPLUS_VOTES = ("neutral", "happy", "surprise", "sad", "anger", "disgust", "fear", "contempt", "unknown", "NF")
# FER2013Valid is a test split here (the selection split is held out of FER2013Train): the
# FER+ paper tuned on it, we report on it
FERPLUS_SPLITS = {"FER2013Train": "train", "FER2013Valid": "valid", "FER2013Test": "test"}
#: Drop reasons shared by the adapters: one name per cause, so that ``data summary`` tables compare.
DROP_EXPRESSION_8_10 = "expression 8-10 (none, uncertain, no face)"
DROP_LABEL = "label outside the classes"
DROP_VA = "valence/arousal missing (-2) or out of range"
DROP_NOT_REGULAR = "not a regular file (FIFO, device, broken link)"
DROP_DUPLICATE = "duplicate row (same image and box)"
DROP_HALF_VA = "only one of valence/arousal given"
DROP_CONFLICT = "duplicate row with another label (same image and box; the first row's label is kept)"

AFFECTNET_COLUMNS = [
    "subDirectory_filePath",
    "face_x",
    "face_y",
    "face_width",
    "face_height",
    "facial_landmarks",
    "expression",
    "valence",
    "arousal",
]


@dataclass
class Dataset:
    """A loaded data set: the manifest and the count of dropped rows by reason."""

    manifest: pd.DataFrame
    dropped: Counter
    dropped_by_split: dict = field(default_factory=dict)  # split -> Counter of reasons ("unassigned": no split known)
    notes: list = field(default_factory=list)  # how the data were read where a user may wonder (a header-less CSV, …)


def _warn_dropped(reason: str, examples: list[str], n: int) -> None:
    if n:
        shown = ", ".join(examples[:3])
        warnings.warn(f"dropped {n} row(s): {reason} (e.g. {shown})", stacklevel=3)


class _Drops:
    """Counts dropped rows by reason and remembers a few offenders for the warning."""

    def __init__(self, strict: bool):
        self.strict = strict
        self.counts: Counter = Counter()
        self.by_split: dict[str, Counter] = {}
        self.split: str | None = None  # the split an adapter is reading, where it knows it
        self.examples: dict[str, list[str]] = {}
        self.notes: list[str] = []

    def add(self, reason: str, example: str, split: str | None = None) -> None:
        if self.strict:
            raise UserError(f"{reason}: {example} (data.strict is on)")
        self.counts[reason] += 1
        self.by_split.setdefault(split or self.split or "unassigned", Counter())[reason] += 1
        self.examples.setdefault(reason, [])
        if len(self.examples[reason]) < 3:
            self.examples[reason].append(str(example))

    def warn(self) -> None:
        for reason, n in self.counts.items():
            _warn_dropped(reason, self.examples[reason], n)


def _read_table(
    path: Path, drops: _Drops, reason: str, n_fields: int | None = None
) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of a CSV file. With ``n_fields`` there is no header and every row must
    have that many fields; otherwise the first row is the header and rows must match it. Rows
    of the wrong length are dropped and counted under ``reason``; blank lines are ignored."""
    import csv as csvlib

    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            lines = [row for row in csvlib.reader(f) if any(cell.strip() for cell in row)]
    except (UnicodeDecodeError, csvlib.Error) as exc:
        raise UserError(f"cannot read {path}: {exc}") from None
    header: list[str] = []
    if n_fields is None:
        if not lines:
            raise UserError(f"{path} is empty")
        header, lines = [h.strip() for h in lines[0]], lines[1:]
        n_fields = len(header)
    rows = []
    for row in lines:
        if len(row) != n_fields:
            drops.add(reason, f"{path.name}:{row[0] if row else '?'}")
        else:
            rows.append(row)
    return header, rows


def _first_row(path: Path) -> list[str]:
    """The first non-blank row of a CSV file (stripped cells), without reading the rest."""
    import csv as csvlib

    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            for row in csvlib.reader(f):
                if any(cell.strip() for cell in row):
                    return [cell.strip() for cell in row]
    except (UnicodeDecodeError, csvlib.Error) as exc:
        raise UserError(f"cannot read {path}: {exc}") from None
    return []


def _empty_row(path: str, label: int, split: str) -> dict:
    return {
        "path": path,
        "x": np.nan,
        "y": np.nan,
        "w": np.nan,
        "h": np.nan,
        "label": label,
        "valence": np.nan,
        "arousal": np.nan,
        "va_source": "derived",
        "split": split,
    }


# --------------------------------------------------------------------------- adapters


def _read_ferplus(root: Path, drops: _Drops) -> list[dict]:
    rows = []
    found = False
    for folder, split in FERPLUS_SPLITS.items():
        csv = root / folder / "label.csv"
        if not csv.is_file():
            continue  # an absent split is simply absent
        found = True
        drops.split = split
        _, table = _read_table(csv, drops, "malformed label row", n_fields=12)
        for rec in table:
            name = rec[0].strip()
            if not name:
                drops.add("malformed label row", f"{csv.name}:?")
                continue
            try:
                votes = np.array([float(v) for v in rec[2:12]])
            except ValueError:
                drops.add("bad vote counts", f"{folder}/{name}")
                continue
            if not np.all(np.isfinite(votes)) or (votes < 0).any() or votes.sum() <= 0:
                drops.add("bad vote counts", f"{folder}/{name}")
                continue
            top = votes.max()
            winners = np.flatnonzero(votes == top)
            if len(winners) > 1:
                drops.add("tied top vote", f"{folder}/{name}")
                continue
            if FERPLUS_VOTES[winners[0]] in ("unknown", "NF"):
                drops.add("top vote unknown or not a face", f"{folder}/{name}")
                continue
            row = _empty_row(str(root / folder / name), CLASS_INDEX[FERPLUS_VOTES[winners[0]]], split)
            emo = votes[:8] / votes[:8].sum()
            for i, c in enumerate(FERPLUS_VOTES[:8]):
                row[f"vote_{c}"] = emo[i]
            rows.append(row)
    if not found:
        raise UserError(
            f"no FER+ split found under {root} (expected FER2013Train/label.csv, FER2013Valid/label.csv or FER2013Test/label.csv)"
        )
    return rows


def _affectnet_data_row(cells: list[str]) -> bool:
    """Whether a CSV row is an AffectNet data row of the documented 9 columns (not a header)."""
    if len(cells) != len(AFFECTNET_COLUMNS):
        return False
    rec = dict(zip(AFFECTNET_COLUMNS, cells))
    try:
        float(rec["expression"]), float(rec["valence"]), float(rec["arousal"])
        [float(rec[k]) for k in ("face_x", "face_y", "face_width", "face_height")]
    except ValueError:
        return False
    return True


def _read_affectnet_csv(csv: Path, images: Path, split: str, drops: _Drops) -> list[dict]:
    first = _first_row(csv)
    if "subDirectory_filePath" not in first and _affectnet_data_row(first):
        # copies of the release ship validation.csv without training.csv's header line
        header, rows_raw = (
            list(AFFECTNET_COLUMNS),
            _read_table(csv, drops, "malformed AffectNet row", n_fields=len(AFFECTNET_COLUMNS))[1],
        )
        drops.notes.append(
            f"{csv.name} has no header line: read as the documented {len(AFFECTNET_COLUMNS)} "
            f"columns ({', '.join(AFFECTNET_COLUMNS)})"
        )
    else:
        header, rows_raw = _read_table(csv, drops, "malformed AffectNet row")
    table = pd.DataFrame(rows_raw, columns=header, dtype=str)
    missing = [c for c in AFFECTNET_COLUMNS if c not in table.columns and c != "facial_landmarks"]
    if missing:
        raise UserError(f"{csv} is missing AffectNet column(s): {', '.join(missing)}")
    rows = []
    for rec in table.to_dict("records"):
        rel = str(rec["subDirectory_filePath"]).strip()
        try:
            expr = int(float(rec["expression"]))
            box = [float(rec[k]) for k in ("face_x", "face_y", "face_width", "face_height")]
            val, aro = float(rec["valence"]), float(rec["arousal"])
        except (TypeError, ValueError, OverflowError):  # e.g. "inf" or "1e400" as an expression code
            drops.add("malformed AffectNet row", rel or "?")
            continue
        if reason := _affectnet_drop(expr, val, aro):
            drops.add(reason, rel)
            continue
        row = _empty_row(str(images / rel), expr, split)
        if all(np.isfinite(box)) and box[2] > 0 and box[3] > 0:
            row.update(x=box[0], y=box[1], w=box[2], h=box[3])
        row.update(valence=val, arousal=aro, va_source="measured")
        rows.append(row)
    return rows


def _affectnet_drop(expr: int, val: float, aro: float) -> str | None:
    """Why an AffectNet annotation cannot be used (the same reasons for both layouts), or None."""
    if expr in (8, 9, 10):
        return DROP_EXPRESSION_8_10
    if not 0 <= expr <= 7:
        return DROP_LABEL
    if val == -2 or aro == -2 or not (-1 <= val <= 1 and -1 <= aro <= 1):  # NaN fails the range too
        return DROP_VA
    return None


def _read_affectnet(root: Path, drops: _Drops) -> list[dict]:
    images = root / "Manually_Annotated_Images"
    if not images.is_dir():
        images = root
    rows = []
    for name, split in (("training.csv", "train"), ("validation.csv", "test")):
        csv = root / name
        if csv.is_file():
            drops.split = split
            rows += _read_affectnet_csv(csv, images, split, drops)
    if not rows and not (root / "training.csv").is_file() and not (root / "validation.csv").is_file():
        raise UserError(f"no AffectNet training.csv or validation.csv under {root}")
    return rows


def _read_affectnet_folder(root: Path, drops: _Drops) -> list[dict]:
    names = {
        "train": "train",
        "train_set": "train",
        "val": "test",
        "val_set": "test",
        "valid": "test",
        "validation": "test",
        "test": "test",
        "test_set": "test",
    }
    rows = []
    for sub in sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []:
        split = names.get(sub.name.lower())
        if split is None or not (sub / "images").is_dir():
            continue
        drops.split = split
        ann = sub / "annotations"
        for img in sorted((sub / "images").iterdir()):
            if img.suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            try:
                expr = int(np.load(ann / f"{img.stem}_exp.npy", allow_pickle=False).item())
                val = float(np.load(ann / f"{img.stem}_val.npy", allow_pickle=False).item())
                aro = float(np.load(ann / f"{img.stem}_aro.npy", allow_pickle=False).item())
            except (OSError, ValueError, TypeError, OverflowError):
                drops.add("missing or unreadable annotation", f"{sub.name}/{img.name}")
                continue
            if reason := _affectnet_drop(expr, val, aro):
                drops.add(reason, f"{sub.name}/{img.name}")
                continue
            row = _empty_row(str(img), expr, split)
            row.update(valence=val, arousal=aro, va_source="measured")
            rows.append(row)
    if not rows and not drops.counts:
        raise UserError(f"no AffectNet folder layout under {root} (expected <split>/images and <split>/annotations)")
    return rows


def _read_folder(root: Path, drops: _Drops) -> list[dict]:
    if not root.is_dir():
        raise UserError(f"data root is not a folder: {root}")

    def scan(class_dir: Path, split: str) -> list[dict]:
        out = []
        c = canonical_class(class_dir.name)
        for f in sorted(class_dir.rglob("*")):
            if not f.is_file():
                if not f.is_dir():  # a FIFO, a device, a broken link: named, never opened
                    drops.add(DROP_NOT_REGULAR, str(f), split)
                continue
            if any(part.startswith(".") for part in f.relative_to(class_dir).parts):
                drops.add("hidden file (e.g. macOS ._ copies)", str(f), split)
                continue
            if f.suffix.lower() not in IMAGE_EXTENSIONS:
                drops.add("not an image file name", str(f), split)
                continue
            if c is None:
                drops.add(DROP_LABEL, str(f), split)
                continue
            out.append(_empty_row(str(f), CLASS_INDEX[c], split))
        return out

    rows: list[dict] = []
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    for f in sorted(root.iterdir()):  # loose files beside the folders: counted, never silently left out
        if not f.is_dir() and f.suffix.lower() in IMAGE_EXTENSIONS:
            drops.add("image outside the class folders", str(f))
    split_dirs = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
    if any(p.name.lower() in split_dirs for p in subdirs):
        for p in subdirs:
            split = split_dirs.get(p.name.lower())
            if split is None:  # beside train/val/test: not read, and said so
                n = sum(1 for f in p.rglob("*") if f.is_file())
                drops.add(f"folder beside train/val/test folders, not read ({n} file(s) in it)", str(p))
                continue
            for class_dir in sorted(q for q in p.iterdir() if q.is_dir()):
                rows += scan(class_dir, split)
    else:
        for class_dir in subdirs:
            rows += scan(class_dir, "train")
    if not rows and not drops.counts:
        raise UserError(f"no images found under {root} (expected <class>/ or <split>/<class>/ folders)")
    return rows


def _read_csv(path: Path, drops: _Drops) -> list[dict]:
    if not path.is_file():
        raise UserError(f"CSV manifest not found: {path}")
    header, rows_raw = _read_table(path, drops, "malformed CSV row")
    folded = [h.strip().lower() for h in header]
    if len(set(folded)) != len(folded):  # "path" and "Path" would silently pick one
        repeated = sorted({h for h in header if folded.count(h.strip().lower()) > 1})
        raise UserError(f"{path}: column names repeat in the header when case is ignored ({', '.join(repeated)})")
    table = pd.DataFrame(rows_raw, columns=header, dtype=str)
    cols = {c.strip().lower(): c for c in table.columns}
    path_col = cols.get("path") or cols.get("image") or cols.get("file")
    label_col = cols.get("label") or cols.get("emotion") or cols.get("expression") or cols.get("class")
    if path_col is None or label_col is None:
        raise UserError(f"{path} needs a 'path' and a 'label' column (found: {', '.join(table.columns)})")
    base = path.parent
    rows, numeric = [], 0
    for rec in table.to_dict("records"):
        raw_label = str(rec[label_col]).strip()
        c = canonical_class(raw_label)
        if c is None and raw_label.isascii() and raw_label.isdigit() and int(raw_label) < len(CLASSES):
            c = CLASSES[int(raw_label)]  # AffectNet's codes (FER2013's differ: 0 is angry there)
            numeric += 1
        split = str(rec[cols["split"]]).strip().lower() if "split" in cols else "train"
        split = {"valid": "val", "validation": "val"}.get(split, split)
        drops.split = split if split in SPLITS else None
        if c is None:
            drops.add(DROP_LABEL, f"{rec[path_col]} ({raw_label})")
            continue
        if split not in SPLITS:
            drops.add("unknown split", f"{rec[path_col]} ({split})")
            continue
        p = Path(str(rec[path_col]).strip())
        row = _empty_row(str(p if p.is_absolute() else base / p), CLASS_INDEX[c], split)
        cells = [str(rec[cols[k]]).strip() for k in ("valence", "arousal") if k in cols]
        if len(cells) == 2 and (cells[0] == "") != (cells[1] == ""):  # one given, one empty
            drops.add(DROP_HALF_VA, row["path"])
            continue
        if len(cells) == 2 and cells[0] != "":
            try:
                v, a = float(rec[cols["valence"]]), float(rec[cols["arousal"]])
            except ValueError:
                v = a = float("nan")
            if not (np.isfinite(v) and np.isfinite(a)) or abs(v) > 1 or abs(a) > 1:
                drops.add("valence/arousal not a number in [-1, 1]", row["path"])
                continue
            row.update(valence=v, arousal=a, va_source="measured")
        rows.append(row)
    if numeric:
        codes = ", ".join(f"{i} {c}" for i, c in enumerate(CLASSES))
        warnings.warn(
            f"{path}: {numeric} label(s) given as numbers, read as AffectNet's codes ({codes}); "
            f"FER2013's numbering differs (0 is angry there): write class names to be sure",
            stacklevel=3,
        )
    if ("valence" in cols) != ("arousal" in cols):
        have, lack = ("valence", "arousal") if "valence" in cols else ("arousal", "valence")
        warnings.warn(
            f"{path} has a {have} column but no {lack} column: valence and arousal are derived "
            f"from the labels for every row",
            stacklevel=3,
        )
    return rows


# --------------------------------------------------------------------------- the manifest


def stratified_take(df: pd.DataFrame, n: int, seed: int) -> pd.DataFrame:
    """Up to ``n`` rows keeping class proportions (every present class keeps >= 1 row)."""
    if n <= 0 or len(df) <= n:
        return df
    rng = np.random.default_rng(seed)
    counts = df["label"].value_counts()
    quota = np.maximum(1, np.floor(counts / len(df) * n)).astype(int)
    parts = []
    for label, q in quota.items():
        idx = df.index[df["label"] == label].to_numpy()
        parts.append(rng.choice(idx, size=min(q, len(idx)), replace=False))
    return df.loc[np.sort(np.concatenate(parts))]


def _hold_out_val(df: pd.DataFrame, fraction: float, seed: int) -> pd.DataFrame:
    if (df["split"] == "val").any() or fraction <= 0:
        return df
    train = df[df["split"] == "train"]
    if len(train) < 2:
        return df
    rng = np.random.default_rng(seed + 1)
    val_idx = []
    for _, grp in train.groupby("label"):
        n = max(1, int(round(len(grp) * fraction)))  # every class with two faces or more is seen in validation
        if len(grp) > 1:
            val_idx.append(rng.choice(grp.index.to_numpy(), size=min(n, len(grp) - 1), replace=False))
    df = df.copy()
    if val_idx:
        df.loc[np.concatenate(val_idx), "split"] = "val"
    return df


def _warn_classes_without_val(df: pd.DataFrame) -> None:
    if not (df["split"] == "val").any():
        return
    have = set(df.loc[df["split"] == "val", "label"])
    train = df.loc[df["split"] == "train", "label"].value_counts()
    missing = [
        f"{CLASSES[c]} ({n} training face{'s' if n > 1 else ''})" for c, n in sorted(train.items()) if c not in have
    ]
    if missing:
        warnings.warn(
            f"no validation face of {', '.join(missing)}: model selection cannot see "
            f"{'this class' if len(missing) == 1 else 'these classes'}",
            stacklevel=3,
        )


def _drop_duplicates(df: pd.DataFrame, drops: _Drops) -> pd.DataFrame:
    """A row repeated (same image file and box) is dropped and counted; one image in two splits is an error."""
    norm = df["path"].map(lambda p: os.path.normcase(os.path.abspath(p)))
    splits = df.groupby(norm)["split"].nunique()
    if (splits > 1).any():
        leaked = splits[splits > 1].index[0]
        where = sorted(df.loc[norm == leaked, "split"].unique())
        raise UserError(
            f"{leaked} is in two splits ({' and '.join(where)}): a face must not be both trained "
            f"and tested on; fix the data set ({int((splits > 1).sum())} such file(s))"
        )
    key = pd.DataFrame({"p": norm, **{k: df[k].astype(str) for k in ("x", "y", "w", "h")}})
    dup = key.duplicated().to_numpy()
    first = df["label"].groupby([key[c].to_numpy() for c in key.columns], dropna=False).transform("first").to_numpy()
    other = dup & (df["label"].to_numpy() != first)  # the same face labelled twice, differently
    for p, split, o in zip(df.loc[dup, "path"], df.loc[dup, "split"], other[dup]):
        drops.add(DROP_CONFLICT if o else DROP_DUPLICATE, p, split)
    return df[~dup]


def derive_va(df: pd.DataFrame, prototypes: np.ndarray) -> pd.DataFrame:
    """Fill valence/arousal where missing: label distribution (votes, else one-hot) x prototypes."""
    df = df.copy()
    need = df["valence"].isna() | df["arousal"].isna()
    if not need.any():
        return df
    dist = np.zeros((int(need.sum()), len(CLASSES)))
    sub = df.loc[need]
    if all(c in df.columns for c in VOTE_COLUMNS):
        votes = sub[VOTE_COLUMNS].to_numpy(dtype=float)
        has = np.isfinite(votes).all(axis=1)
        dist[has] = votes[has]
    else:
        has = np.zeros(len(sub), dtype=bool)
    dist[np.flatnonzero(~has), sub["label"].to_numpy()[~has]] = 1.0
    va = dist @ prototypes
    df.loc[need, "valence"] = va[:, 0]
    df.loc[need, "arousal"] = va[:, 1]
    df.loc[need, "va_source"] = "derived"
    return df


def load_dataset(data_cfg, seed: int = 0, check_files: bool = True) -> Dataset:
    """Read a data set into a manifest (see module doc); bad rows dropped and counted."""
    fmt = data_cfg.format
    if fmt not in FORMATS:
        raise UserError(f"unknown data format {fmt!r} (known: {', '.join(FORMATS)})")
    drops = _Drops(data_cfg.strict)
    if fmt == "synthetic":
        from .synthetic import synthetic_dataset

        rows = synthetic_dataset(
            Path(data_cfg.cache_dir), n=data_cfg.n_synthetic, size=data_cfg.synthetic_size, seed=seed
        )
    else:
        if not data_cfg.root:
            raise UserError(f"data.root is not set (the {fmt} data set's location)")
        root = Path(data_cfg.root).expanduser()
        if not root.exists():
            where = (
                "" if root.is_absolute() else f" (a relative data.root is read from the current folder, {Path.cwd()})"
            )
            raise UserError(f"data root not found: {root}{where}")
        rows = {
            "ferplus": lambda: _read_ferplus(root, drops),
            "affectnet": lambda: _read_affectnet(root, drops),
            "affectnet-folder": lambda: _read_affectnet_folder(root, drops),
            "folder": lambda: _read_folder(root, drops),
            "csv": lambda: _read_csv(root, drops),
        }[fmt]()
    df = pd.DataFrame(rows)
    if df.empty:
        drops.warn()
        raise UserError(f"no usable rows in the {fmt} data set at {data_cfg.root or data_cfg.cache_dir}")
    for c in VOTE_COLUMNS:
        if c not in df.columns:
            df[c] = np.nan
    if check_files:
        exists = np.array([os.path.isfile(p) for p in df["path"]])
        for p, split in zip(df.loc[~exists, "path"], df.loc[~exists, "split"]):
            drops.add(DROP_NOT_REGULAR if os.path.lexists(p) else "image file missing", p, split)
        df = df[exists]
        if df.empty:
            first = (drops.examples.get("image file missing") or drops.examples.get(DROP_NOT_REGULAR))[0]
            raise UserError(
                f"no usable rows in the {fmt} data set at {data_cfg.root}: no image file exists (e.g. {first})"
            )
    df = _drop_duplicates(df, drops)  # after the file check: a missing file is only missing
    df = derive_va(df, prototype_table(data_cfg.prototypes))
    df = _hold_out_val(df, data_cfg.val_fraction, seed)
    if data_cfg.max_samples:
        df = pd.concat([stratified_take(g, data_cfg.max_samples, seed) for _, g in df.groupby("split", sort=False)])
    df = df.reset_index(drop=True)
    df["label"] = df["label"].astype(int)
    drops.warn()
    _warn_classes_without_val(df)
    return Dataset(df, drops.counts, drops.by_split, drops.notes)


def manifest_digest(df: pd.DataFrame, image_size: int) -> str:
    """Identifies what a prepared shard holds: paths, boxes, the size, and each file's size and
    modification time, so that an image edited or replaced in place is prepared afresh."""
    h = hashlib.sha256(str(image_size).encode())
    h.update(pd.util.hash_pandas_object(df[["path", "x", "y", "w", "h"]], index=False).to_numpy().tobytes())
    for path in df["path"]:
        try:
            st = os.stat(path)
            h.update(b"%d:%d;" % (st.st_size, st.st_mtime_ns))
        except OSError:
            h.update(b"-;")  # a missing file stays missing in the shard: counted there
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------- images


def row_box(row) -> tuple | None:
    """A manifest row's face box (x, y, w, h), or None when the face is the whole image."""
    box = (row.x, row.y, row.w, row.h)
    return box if all(np.isfinite(box)) else None
