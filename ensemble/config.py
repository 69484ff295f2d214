"""Experiment configuration: typed defaults in code, a TOML file lists only what differs.

A config file has the sections ``[data] [model] [train] [balance] [neighborhoods]
[experts] [router]`` (plus ``[stage1]`` and ``[flat]`` for per-stage overrides).
``[experts]``, ``[stage1]`` and ``[flat]`` may hold ``model``, ``train`` and ``balance``
sub-tables that override the shared sections for that stage only, e.g.::

    [experts.model]
    trunk_from = "flat"      # experts build on the flat model's frozen trunk
    trainable = "block4"     # ... each with its own copy of blocks 4.. (default: "head", a head only)

An unknown key or a value of the wrong type is an error that names the key.
``--set section.key=value`` on the command line wins over the file, also over the file's
per-stage tables (``--set train.epochs=1`` shortens every stage); ``--set
stage1.train.epochs=5`` targets one stage.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import tomllib
import typing
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from .classes import CLASSES, canonical_class
from .errors import UserError

#: The data-set formats ``data.format`` accepts (one adapter each in :mod:`ensemble.data`).
DataFormat = Literal["affectnet", "affectnet-folder", "ferplus", "folder", "csv", "synthetic"]
FORMATS: tuple[str, ...] = typing.get_args(DataFormat)
#: How prepared images are read: see ``DataConfig.cache``.
CacheMode = Literal["auto", "memory", "disk", "none"]
#: Soft routing's temperature when none is fitted or set (squared V/A distance units).
DEFAULT_TEMPERATURE = 0.05
#: Old values still accepted, with a deprecation line: (key, old) -> new.
_DEPRECATED = {("experts.train_on", "true"): "true_va"}


@dataclass
class DataConfig:
    format: DataFormat = "synthetic"  # affectnet | affectnet-folder | ferplus | folder | csv | synthetic
    root: str = ""  # data-set root (for csv: the manifest file); unused by synthetic
    image_size: int = 48  # network input side in pixels (the report's recipe: 224)
    max_samples: int = 0  # cap per split (stratified, seeded; at least one face per class kept) for smoke runs; 0 = all
    val_fraction: float = 0.1  # held out of train (stratified) when the format has no val split
    prototypes: dict = field(default_factory=dict)  # class -> [valence, arousal]; overrides the derived-V/A table
    n_synthetic: int = 4000  # synthetic: images over all splits
    synthetic_size: int = 64  # synthetic: image side in pixels
    cache_dir: str = "artifacts/cache"  # decoded, resized uint8 images are kept here (ensemble prepare)
    cache: CacheMode = "auto"  # auto (memory when the prepared shard fits easily in RAM, else disk) | memory | disk | none (decode every epoch)
    strict: bool = False  # a bad row or image is an error instead of a counted skip
    num_workers: int = 0  # DataLoader workers when decoding from files


@dataclass
class ModelConfig:
    backbone: str = "vgg16"  # any torchvision classification model name, or "tinyvgg" (tests, demo)
    pretrained: str = "none"  # imagenet | none | path to a state_dict of the torchvision model
    trainable: str = "all"  # head | blockN (blocks N..last plus head) | all; a stage on a borrowed trunk (trunk_from): only its own table's value counts, default head
    head: Literal["slim", "classic"] = (
        "slim"  # classic (VGG 4096-4096 classifier) | slim (global pool -> hidden -> out)
    )
    hidden: int = 256  # slim head's hidden width
    dropout: float = 0.5  # dropout inside the head
    trunk_from: Literal["", "flat", "stage1"] = (
        ""  # "" | flat | stage1: build on that stage's trunk, frozen (shared at inference)
    )


@dataclass
class TrainConfig:
    epochs: int = 10  # maximum epochs
    batch_size: int = 64  # per process
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"  # adam | adamw | sgd
    lr: float = 1e-3  # peak learning rate
    momentum: float = 0.9  # sgd momentum
    nesterov: bool = False  # sgd Nesterov momentum
    weight_decay: float = 0.0  # L2 (adam, sgd) or decoupled (adamw)
    schedule: Literal["cosine", "step", "none"] = "cosine"  # cosine | step | none
    step_size: int = 10  # step schedule: epochs between decays
    gamma: float = 0.1  # step schedule: decay factor
    warmup_epochs: float = 0.0  # linear warm-up, in epochs (fractions allowed)
    patience: int = 0  # early stopping: epochs without improvement on the validation metric; 0 = off
    loss: Literal["mse", "mse+ccc"] = (
        "mse"  # regression loss: mse | mse+ccc  (classification always uses cross-entropy)
    )
    label_smoothing: float = 0.0  # cross-entropy label smoothing
    soft_targets: bool = False  # classification: train on vote distributions where the data has them
    teacher: str = ""  # the flat model only: distil a finished run's flat model ("bundled": the bundled default): its probabilities on each training face, mixed into the targets; "" = off
    teacher_weight: float = 0.5  # share of the teacher's probabilities in the targets (the rest: votes or labels)
    augment: bool = True  # random crop (scale/shift) and horizontal flip on every training image
    crop_scale: float = 0.1  # augmentation: +- relative scale/shift of the random crop
    brightness: float = 0.0  # photo augmentation: brightness shifted by U(-b, b) on a 0-1 scale; 0 = off
    contrast: float = 0.0  # photo augmentation: contrast scaled by U(1 - c, 1 + c) about the face's mean; 0 = off
    grayscale: float = 0.0  # photo augmentation: this share of the faces turned gray; 0 = off
    blur: float = (
        0.0  # photo augmentation: half the faces blurred, Gaussian sigma U(0, blur) pixels at the input size; 0 = off
    )
    jpeg: int = 0  # photo augmentation: half the faces JPEG-compressed at quality U(jpeg, 95); 0 = off
    device: str = "auto"  # auto (cuda, then mps, then cpu) | cpu | cuda | cuda:N | mps
    precision: Literal["auto", "bf16", "fp16", "fp32"] = (
        "auto"  # auto (bf16 where supported, fp16 on older GPUs, fp32 elsewhere) | bf16 | fp16 | fp32
    )
    channels_last: bool = True  # NHWC memory layout (faster convolutions)
    compile: bool = False  # torch.compile the model
    threads: int = 0  # torch CPU threads; 0 = library default
    seed: int = 0  # seeds data order, augmentation, initialisation
    feature_cache: bool = True  # frozen blocks run once per (face, view); the tail trains from the cache (flip and transform copies kept, random crop not)
    transform_views: int = 4  # feature cache: fixed rotated/flipped views per face that transform copies draw from
    max_minutes: float = 0.0  # stop after the epoch that crosses this wall time; 0 = off


@dataclass
class BalanceConfig:
    mode: Literal["none", "down", "up", "transform"] = (
        "none"  # none | down | up | transform  (the report's sampling remedies)
    )
    cap: int = 20000  # per-class ceiling for up / transform up-sampling (the report: 20k)
    floor: int = 0  # down-sampling: per-class target; 0 = size of the rarest class
    rotation: float = 45.0  # transform copies: random rotation within +- degrees
    flip: bool = True  # transform copies: random horizontal flip
    weights: Literal["none", "inverse", "sqrt_inverse", "explicit"] = (
        "none"  # loss weights: none | inverse | sqrt_inverse | explicit
    )
    class_weights: dict = field(default_factory=dict)  # explicit: class -> weight (missing = 1)


@dataclass
class NeighborhoodsConfig:
    method: Literal["kmeans", "gmm", "agglomerative"] = "kmeans"  # kmeans | gmm | agglomerative
    k: int = 0  # number of neighborhoods; 0 = choose within k_min..k_max
    k_min: int = 2  # automatic k: smallest tried
    k_max: int = 6  # automatic k: largest tried
    min_share: float = 0.15  # a class joins a neighborhood holding at least this share of its samples
    max_fit_samples: int = 20000  # clustering subsample (seeded) for speed; membership uses all
    route_share: float = 0.0  # a class also joins every neighborhood stage 1 routes at least this share of its selection-split faces to (HD-CNN); 0 = off


@dataclass
class StageOverrides:
    model: dict = field(default_factory=dict)  # keys of [model] for this stage only
    train: dict = field(default_factory=dict)  # keys of [train] for this stage only
    balance: dict = field(default_factory=dict)  # keys of [balance] for this stage only


@dataclass
class ExpertsConfig(StageOverrides):
    train_on: Literal["true_va", "routed", "both"] = (
        "true_va"  # which region's faces train an expert: by their true V/A, as stage 1 routes them, or both ("true" = true_va, deprecated)
    )
    oof_folds: int = 3  # routed: stage-1 V/A on training data predicted out-of-fold by this many refits
    min_count: int = 20  # a class needs this many samples in a region to be part of its expert
    keep_min_faces: int = 10  # keep rule: classes with this many selection faces decide an expert vs restricted flat


@dataclass
class RouterConfig:
    mode: Literal["auto", "hard", "soft"] = "auto"  # auto (best on the selection split) | hard | soft
    temperature: float = 0.0  # soft routing temperature; 0 = fitted on the selection split
    inputs: Literal["auto", "va", "va+flat"] = (
        "va"  # what routes: stage 1's V/A | V/A times the flat model's probability of each neighborhood's classes (HD-CNN) | auto: the better on the selection split
    )
    alpha: float = -1.0  # final p ~ p_flat^alpha * p_hier^(1-alpha): 1 = the flat model, 0 = the hierarchy alone; -1 = chosen on the selection split
    logit_adjust: Literal["auto", "off"] = (
        "auto"  # auto: subtract tau * log(class prior), tau chosen on the selection split (0 allowed), for flat and hierarchy alike | off
    )
    select: Literal["one_se", "best"] = (
        "one_se"  # how alpha and tau are chosen: the simplest within one paired standard error of the best | the best
    )


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    balance: BalanceConfig = field(default_factory=BalanceConfig)
    neighborhoods: NeighborhoodsConfig = field(default_factory=NeighborhoodsConfig)
    experts: ExpertsConfig = field(default_factory=ExpertsConfig)
    router: RouterConfig = field(default_factory=RouterConfig)
    stage1: StageOverrides = field(default_factory=StageOverrides)
    flat: StageOverrides = field(default_factory=StageOverrides)
    tune: dict = field(default_factory=dict)  # ensemble tune's search (read and checked by ensemble.tune)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def for_stage(self, stage: str) -> "Config":
        """The config a stage trains with: shared sections with its overrides applied.

        A stage built on another stage's trunk (``model.trunk_from``) does not inherit
        ``[model] trainable`` (that describes the trunk's owner): it trains its head only unless
        its own table says otherwise (``[experts.model] trainable = "block4"``: each expert owns a
        copy of blocks 4.. of the borrowed trunk)."""
        over = getattr(self, stage, None) if stage in ("stage1", "flat", "experts") else None
        cfg = dataclasses.replace(self)
        for section in ("model", "train", "balance"):
            updates = getattr(over, section) if over is not None else {}
            if updates:
                base = getattr(self, section)
                merged = _apply(type(base), dataclasses.asdict(base) | updates, f"{stage}.{section}")
                setattr(cfg, section, merged)
        own = over.model if over is not None else {}
        if cfg.model.trunk_from and "trainable" not in own and cfg.model.trainable != "head":
            cfg.model = dataclasses.replace(cfg.model, trainable="head")
        return cfg


#: more decoder processes than this is a typo, not a machine (``prepare --workers``, ``data.num_workers``)
MAX_WORKERS = 256

_SECTION_TYPES = {f.name: f.type for f in fields(Config)}


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


class _SetValue:
    """A --set value: parsed as TOML, but kept as typed text where the key expects text."""

    def __init__(self, parsed: Any, raw: str):
        self.parsed, self.raw = parsed, raw

    def __repr__(self) -> str:  # error messages show what the user typed
        return self.raw.strip()


def _check_value(value: Any, expected: Any, where: str) -> Any:
    if typing.get_origin(expected) is Literal:  # its choices are a rule (_RULES); the type is text
        expected = str
    if isinstance(value, _SetValue):
        if expected is str:
            value = value.parsed if isinstance(value.parsed, str) else value.raw.strip()
        else:
            value = value.parsed
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if expected is float and isinstance(value, float) and not math.isfinite(value):
        raise UserError(f"config key {where} = {value!r} must be a finite number")
    if expected is dict:
        if not isinstance(value, dict):
            raise UserError(f"config key {where}: expected a table, got {value!r}")
        return {k: (v.parsed if isinstance(v, _SetValue) else v) for k, v in value.items()}
    if expected in (int, str, bool, float):
        if isinstance(value, bool) and expected is not bool:
            raise UserError(f"config key {where}: expected {expected.__name__}, got {value!r}")
        if not isinstance(value, expected):
            raise UserError(f"config key {where}: expected {expected.__name__}, got {type(value).__name__} {value!r}")
        return value
    return value


def _one_of(*choices):
    def check(v):
        return None if v in choices else "must be one of " + ", ".join(repr(c) for c in choices)

    return check


def _range(lo=None, hi=None, lo_open=False, hi_open=False):
    def check(v):
        bad = (lo is not None and (v <= lo if lo_open else v < lo)) or (
            hi is not None and (v >= hi if hi_open else v > hi)
        )
        if not bad:
            return None
        left = "" if lo is None else f"{'>' if lo_open else '>='} {lo:g}"
        right = "" if hi is None else f"{'<' if hi_open else '<='} {hi:g}"
        return "must be " + " and ".join(x for x in (left, right) if x)

    return check


def _device(v):
    import re

    ok = v in ("auto", "cpu", "mps", "cuda") or re.fullmatch(r"cuda:\d+", v)
    return None if ok else "must be auto, cpu, cuda, cuda:N or mps"


def _unknown_class(name) -> str | None:
    if canonical_class(name) is None:
        return f"names an unknown class {name!r} (classes: {', '.join(CLASSES)})"
    return None


def _weights_table(v):
    for k, w in v.items():
        if problem := _unknown_class(k):
            return problem
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
            return f"gives {k} the weight {w!r}; weights are numbers >= 0"
    return None


def _prototypes_table(v):
    for k, va in v.items():
        if problem := _unknown_class(k):
            return problem
        if (
            not isinstance(va, (list, tuple))
            or len(va) != 2
            or not all(isinstance(x, (int, float)) and not isinstance(x, bool) and -1 <= x <= 1 for x in va)
        ):
            return f"gives {k} {va!r}; expected [valence, arousal] in [-1, 1]"
    return None


def _trainable(v):
    import re

    ok = v in ("head", "all") or re.fullmatch(r"block[1-9]\d*", v)
    return None if ok else "must be head, all or blockN (N >= 1: blocks N..last and the head learn)"


def _backbone(v):
    if v == "tinyvgg":
        return None
    import torchvision  # only when a config names a torchvision backbone

    if v in torchvision.models.list_models(module=torchvision.models):
        return None
    return "is not a torchvision classification model (see torchvision.models.list_models()) nor tinyvgg"


# value checks per field, so that a bad value is refused when the config is read, naming the key;
# a field typed Literal[...] gets its choices checked here too (added below), nowhere else
_RULES: dict[type, dict[str, Any]] = {
    DataConfig: {
        "image_size": _range(8, 4096),
        "max_samples": _range(0),
        "val_fraction": _range(0, 1, hi_open=True),
        "prototypes": _prototypes_table,
        "n_synthetic": _range(80),
        "synthetic_size": _range(16, 1024),
        "num_workers": _range(0, MAX_WORKERS),
    },
    ModelConfig: {
        "backbone": _backbone,
        "trainable": _trainable,
        "hidden": _range(1),
        "dropout": _range(0, 1, hi_open=True),
    },
    TrainConfig: {
        "epochs": _range(1),
        "batch_size": _range(1),
        "lr": _range(0, lo_open=True),
        "momentum": _range(0, 1, hi_open=True),
        "weight_decay": _range(0),
        "step_size": _range(1),
        "gamma": _range(0, lo_open=True),
        "warmup_epochs": _range(0, 1000),
        "patience": _range(0),
        "label_smoothing": _range(0, 1, hi_open=True),
        "teacher_weight": _range(0, 1),
        "crop_scale": _range(0, 0.5),
        "brightness": _range(0, 1),
        "contrast": _range(0, 1),
        "grayscale": _range(0, 1),
        "blur": _range(0, 8),
        "jpeg": lambda v: None if v == 0 or 5 <= v <= 95 else "must be 0 (off) or a JPEG quality in [5, 95]",
        "device": _device,
        "threads": _range(0, 4096),
        "max_minutes": _range(0),
        "transform_views": _range(1, 64),
    },
    BalanceConfig: {
        "cap": _range(1),
        "floor": _range(0),
        "rotation": _range(0, 180),
        "class_weights": _weights_table,
    },
    NeighborhoodsConfig: {
        "k": _range(0, 64),
        "k_min": _range(2, 64),
        "k_max": _range(2, 64),
        "min_share": _range(0, 1, lo_open=True),
        "max_fit_samples": _range(10),
        "route_share": _range(0, 1, hi_open=True),
    },
    ExpertsConfig: {"oof_folds": _range(2, 20), "min_count": _range(1), "keep_min_faces": _range(1)},
    RouterConfig: {
        "temperature": _range(0),
        "alpha": lambda v: (
            None if v == -1 or 0 <= v <= 1 else "must be in [0, 1], or -1 (chosen on the selection split)"
        ),
    },
}
for _cls in _RULES:
    for _name, _hint in typing.get_type_hints(_cls).items():
        if typing.get_origin(_hint) is Literal:
            _RULES[_cls].setdefault(_name, _one_of(*typing.get_args(_hint)))


def _apply(cls, values: dict, where: str):
    hints = _hints(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in hints:
            raise UserError(f"unknown config key: {where}.{key}")
        kwargs[key] = _check_value(value, hints[key], f"{where}.{key}")
        new = _DEPRECATED.get((f"{where}.{key}", kwargs[key])) if isinstance(kwargs[key], str) else None
        if new is not None:
            warnings.warn(f"{where}.{key} = {kwargs[key]!r} is deprecated; write {new!r}", stacklevel=2)
            kwargs[key] = new
        rule = _RULES.get(cls, {}).get(key)
        problem = rule(kwargs[key]) if rule else None
        if problem:
            raise UserError(f"config key {where}.{key} = {kwargs[key]!r} {problem}")
    if cls in (StageOverrides, ExpertsConfig):
        # override tables must name real keys of their sections
        for sub, target in (("model", ModelConfig), ("train", TrainConfig), ("balance", BalanceConfig)):
            if sub in kwargs:
                checked = _apply(target, kwargs[sub], f"{where}.{sub}")
                kwargs[sub] = {k: getattr(checked, k) for k in kwargs[sub]}
    obj = cls(**{**dataclasses.asdict(cls()), **kwargs})
    if cls is NeighborhoodsConfig and obj.k_min > obj.k_max:
        raise UserError(f"config keys {where}.k_min = {obj.k_min} and k_max = {obj.k_max}: k_min must not exceed k_max")
    if cls is BalanceConfig and where == "balance" and obj.class_weights and obj.weights != "explicit":
        raise UserError(
            f"config key balance.class_weights is set but balance.weights = {obj.weights!r}: "
            'per-class weights are used with balance.weights = "explicit" only'
        )
    return obj


def _parse_set(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise UserError(f"--set expects section.key=value, got {item!r}")
    key, raw = item.split("=", 1)
    parts = key.strip().split(".")
    if len(parts) < 2:
        raise UserError(f"--set expects section.key=value, got {item!r}")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # a bare word is a string
    return parts, _SetValue(value, raw)


def load_config(path: str | Path | None = None, overrides: tuple[str, ...] | list[str] = ()) -> Config:
    """Defaults, then the TOML file at ``path``, then ``section.key=value`` overrides."""
    raw: dict[str, Any] = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise UserError(f"config file not found: {p}")
        try:
            raw = tomllib.loads(p.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise UserError(f"config file {p} is not valid TOML: {exc}") from None
    parsed = [(_parse_set(item), item) for item in overrides]
    # the command line wins over the file at every level: --set train.epochs=1 also replaces
    # what the file's [stage1.train] / [flat.train] / [experts.train] say of epochs
    for (parts, _), _item in parsed:
        if len(parts) == 2 and parts[0] in ("model", "train", "balance"):
            for stage in ("stage1", "flat", "experts"):
                table = raw.get(stage, {}).get(parts[0]) if isinstance(raw.get(stage), dict) else None
                if isinstance(table, dict) and not (parts[1] == "trainable" and table.get("trunk_from")):
                    table.pop(parts[1], None)  # (a stage on a borrowed trunk keeps its own trainable: see for_stage)
    for (parts, value), item in parsed:
        node = raw
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UserError(f"--set {item}: {part} is not a section")
        node[parts[-1]] = value
    return config_from_dict(raw)


def config_from_dict(raw: dict) -> Config:
    """A Config from a dict of sections (a TOML file, a saved config.json), every key and value checked."""
    sections = {}
    for name, value in raw.items():
        if name not in _SECTION_TYPES:
            raise UserError(f"unknown config section: [{name}]")
        if not isinstance(value, dict):
            raise UserError(f"config section [{name}] must be a table")
        if name == "tune":
            sections[name] = _plain(value)
            continue
        cls = _hints(Config)[name]
        sections[name] = _apply(cls, value, name)
    cfg = Config(**sections)
    for stage in ("stage1", "flat"):  # own blocks on a borrowed trunk: experts only (the hierarchy runs them)
        mc = cfg.for_stage(stage).model
        if mc.trunk_from and mc.trainable != "head":
            raise UserError(
                f"config key {stage}.model.trainable = {mc.trainable!r}: a stage built on another stage's trunk "
                f'(model.trunk_from = "{mc.trunk_from}") trains its head only; own blocks on the shared trunk '
                f"are for the experts (experts.model.trainable)"
            )
    return cfg


def _plain(value: Any) -> Any:
    """A table as TOML would give it: --set values parsed, nested tables kept."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value.parsed if isinstance(value, _SetValue) else value


def save_config(cfg: Config, path: Path) -> None:
    """The resolved config as sorted JSON at ``path``, atomically."""
    from .files import write_json

    write_json(path, json.loads(json.dumps(cfg.to_dict(), sort_keys=True)))  # atomically


def records_config(fit):
    """A stage's fit function (``fit(exp, …)``) that, once it has published, records the run's
    config (:meth:`ensemble.experiment.Experiment.save_config`). Here, not in ``experiment``, so
    that the stages import it without pandas (predicting loads them)."""

    @functools.wraps(fit)
    def wrapper(exp, *args, **kwargs):
        out = fit(exp, *args, **kwargs)
        exp.save_config()
        return out

    return wrapper
