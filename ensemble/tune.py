"""``ensemble tune``: search a stage's settings with Optuna.

Each trial is a normal run of one stage (``flat``, ``stage1`` or ``experts``) with sampled
``--set`` values, in its own run folder ``DIR/trials/NNNN``. The objective is the stage's
selection metric on the selection split (val): balanced accuracy for flat, mean CCC for
stage 1, and for the experts the balanced accuracy of the run's final output on val (router.json
``val_final``: flat mixing alpha and logit adjustment tau included). Every test split (``test``,
and FER+'s ``valid``) is hidden from every trial: their faces are relabelled before a stage
sees the manifest, so nothing is tuned on them.

The search space is the config's ``[tune.space]`` table, one entry per config key::

    [tune.space]
    train.optimizer = ["adam", "sgd"]                            # categorical
    train.lr = {log = [1e-4, 1e-1]}                              # float, log-uniform
    train.momentum = {float = [0.5, 0.99], when = {"train.optimizer" = "sgd"}}
    balance.cap = {int = [200, 2000], step = 200}                # int, stepped
    balance.class_weights.contempt = {float = [1, 8], when = {"balance.weights" = "explicit"}}

The study lives in Optuna storage (default ``sqlite:///DIR/study.db``): rerunning the
command continues it until it holds ``trials`` trials, and several processes (or machines
sharing an RDB URL) can work on one study. Per-epoch validation metrics are reported to a
pruner (median or Hyperband), which stops unpromising trials early.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import Config, load_config, save_config
from .errors import UserError

STAGES = ("flat", "stage1", "experts")
METRIC_NAME = {
    "flat": "val balanced accuracy",
    "stage1": "val mean CCC",
    "experts": "val balanced accuracy (final output)",
}


@dataclass
class TuneConfig:
    stage: str = "flat"  # flat | stage1 | experts: the stage each trial trains
    trials: int = 20  # the study's total: complete + pruned + failed by their own error (interrupted ones are redone)
    minutes: float = 0.0  # start no new trial after this many minutes; 0 = off
    pruner: str = "median"  # median | hyperband | none
    startup_trials: int = 5  # median pruner: trials that always run to the end first
    warmup_epochs: int = 1  # median pruner: epochs every trial runs before it may be pruned
    sampler_seed: int = -1  # TPE seed; -1 = random (a fixed seed in several processes repeats their first samples)
    repeats: int = 0  # re-train the top configurations with this many new seeds; the best mean wins
    top: int = 3  # configurations that repeats re-trains
    keep: str = "best"  # best | all | none: which trial run folders stay
    heartbeat: int = 60  # seconds between a trial's heartbeats; one silent for twice this is failed, redone
    space: dict = field(default_factory=dict)  # config key -> distribution (module docstring)


_TUNE_RULES = {
    "stage": lambda v: v in STAGES,
    "trials": lambda v: v >= 1,
    "minutes": lambda v: v >= 0,
    "pruner": lambda v: v in ("median", "hyperband", "none"),
    "startup_trials": lambda v: v >= 0,
    "warmup_epochs": lambda v: v >= 0,
    "repeats": lambda v: v >= 0,
    "top": lambda v: v >= 1,
    "keep": lambda v: v in ("best", "all", "none"),
    "heartbeat": lambda v: v >= 1,
}


def tune_config(table: dict) -> TuneConfig:
    """The ``[tune]`` table, typed and checked; unknown keys and bad values name the key."""
    hints = {f.name: f.type for f in dataclasses.fields(TuneConfig)}
    kwargs = {}
    for key, value in table.items():
        if key not in hints:
            raise UserError(f"unknown config key: tune.{key} (known: {', '.join(hints)})")
        want = {"str": str, "int": int, "float": (int, float), "dict": dict}[hints[key]]
        if isinstance(value, bool) or not isinstance(value, want):
            raise UserError(f"config key tune.{key}: expected {hints[key]}, got {value!r}")
        if key in _TUNE_RULES and not _TUNE_RULES[key](value):
            raise UserError(f"config key tune.{key} = {value!r} is not allowed")
        kwargs[key] = float(value) if hints[key] == "float" else value
    return TuneConfig(**kwargs)


# --------------------------------------------------------------------------- the search space

_KINDS = ("float", "int", "log", "categorical")
_OPTIONS = ("step", "log", "when")


@dataclass(frozen=True)
class Param:
    """One searched config key and its distribution."""

    key: str  # e.g. "train.lr" or "balance.class_weights.contempt"
    kind: str  # float | int | categorical
    low: float = 0.0
    high: float = 0.0
    step: float | None = None
    log: bool = False
    choices: tuple = ()
    when: tuple = ()  # ((key, (allowed values...)), ...): sampled only when all hold

    def suggest(self, trial) -> Any:
        if self.kind == "categorical":
            return trial.suggest_categorical(self.key, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(self.key, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.key, self.low, self.high, step=self.step, log=self.log)

    def examples(self) -> list:
        """Values that together exercise the config's checks on this key."""
        if self.kind == "categorical":
            return list(self.choices)
        return [int(self.low), int(self.high)] if self.kind == "int" else [self.low, self.high]


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _bounds(key: str, kind: str, v) -> tuple[float, float]:
    if not (isinstance(v, list) and len(v) == 2 and all(_number(x) for x in v)):
        raise UserError(f"tune.space.{key}: {kind} expects [low, high] numbers, got {v!r}")
    lo, hi = v
    if kind == "int" and not all(isinstance(x, int) for x in v):
        raise UserError(f"tune.space.{key}: int expects whole numbers, got {v!r}")
    if not lo < hi:
        raise UserError(f"tune.space.{key}: low {lo!r} must be below high {hi!r}")
    return lo, hi


def _parse_param(key: str, spec) -> Param:
    if isinstance(spec, list):
        spec = {"categorical": spec}
    unknown = [k for k in spec if k not in _KINDS + _OPTIONS]
    if unknown:
        raise UserError(
            f"tune.space.{key}: unknown field {unknown[0]!r} (a distribution is one of float, int, log, "
            f"categorical, with step, log = true, when)"
        )
    log_range = isinstance(spec.get("log"), list)
    kinds = [k for k in ("float", "int", "categorical") if k in spec] + (["log"] if log_range else [])
    if len(kinds) != 1:
        raise UserError(
            f"tune.space.{key}: give exactly one of float, int, log = [low, high] or categorical"
            + (f", not {' and '.join(kinds)}" if kinds else "")
        )
    kind = kinds[0]
    when = _parse_when(key, spec.get("when", {}))
    if kind == "categorical":
        choices = spec["categorical"]
        if not isinstance(choices, list) or not choices:
            raise UserError(f"tune.space.{key}: categorical expects a non-empty list of choices, got {choices!r}")
        if not all(isinstance(c, (str, int, float, bool)) for c in choices):
            raise UserError(f"tune.space.{key}: choices must be strings, numbers or booleans, got {choices!r}")
        if len({json.dumps(c) for c in choices}) != len(choices):
            raise UserError(f"tune.space.{key}: a choice is listed twice in {choices!r}")
        if "step" in spec or "log" in spec:
            raise UserError(f"tune.space.{key}: step and log apply to float and int ranges, not to choices")
        return Param(key, "categorical", choices=tuple(choices), when=when)
    lo, hi = _bounds(key, kind, spec[kind])
    log = True if kind == "log" else spec.get("log", False)
    if not isinstance(log, bool):
        raise UserError(f"tune.space.{key}: log is true or false, got {log!r}")
    if log and lo <= 0:
        raise UserError(f"tune.space.{key}: a log range needs low > 0, got {lo!r}")
    step = spec.get("step")
    if step is not None:
        if not _number(step) or step <= 0 or (kind == "int" and not isinstance(step, int)):
            raise UserError(
                f"tune.space.{key}: step must be a {'whole ' if kind == 'int' else ''}number > 0, got {step!r}"
            )
        if log:
            raise UserError(f"tune.space.{key}: a range is either stepped or log, not both")
    ptype = "int" if kind == "int" else "float"
    return Param(
        key,
        ptype,
        float(lo),
        float(hi),
        None if step is None else (int(step) if ptype == "int" else float(step)),
        log,
        when=when,
    )


def _parse_when(key: str, when) -> tuple:
    if not isinstance(when, dict):
        raise UserError(f'tune.space.{key}: when expects a table like {{"train.optimizer" = "sgd"}}, got {when!r}')
    out = []
    for other, allowed in _flatten(when, "", leaf=lambda v: not isinstance(v, dict)):
        allowed = tuple(allowed) if isinstance(allowed, list) else (allowed,)
        out.append((other, allowed))
    return tuple(out)


def _flatten(node: dict, prefix: str, leaf) -> list[tuple[str, Any]]:
    """Dotted keys of nested tables: {"train": {"lr": x}} -> [("train.lr", x)]."""
    out = []
    for k, v in node.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if leaf(v):
            out.append((key, v))
        elif isinstance(v, dict):
            out += _flatten(v, key, leaf)
        else:
            out.append((key, v))
    return out


def _is_distribution(v) -> bool:
    return isinstance(v, list) or (isinstance(v, dict) and any(k in v for k in _KINDS))


def _is_config_key(parts: list[str]) -> bool:
    """``parts`` names a settable config value: section.key, a stage's section.sub.key, or
    one entry of a table-valued key (balance.class_weights.fear)."""
    import typing

    from . import config as c

    sections = {f.name: f.type for f in dataclasses.fields(Config) if f.name != "tune"}
    if parts[0] not in sections:
        return False
    cls = typing.get_type_hints(Config)[parts[0]]
    rest = parts[1:]
    if parts[0] in ("flat", "stage1", "experts") and len(rest) >= 2 and rest[0] in ("model", "train", "balance"):
        cls, rest = {"model": c.ModelConfig, "train": c.TrainConfig, "balance": c.BalanceConfig}[rest[0]], rest[1:]
    hints = typing.get_type_hints(cls)
    if not rest or rest[0] not in hints:
        return False
    return len(rest) == (2 if hints[rest[0]] is dict else 1)


def parse_space(table: dict) -> list[Param]:
    """``[tune.space]`` -> parameters in an order where every condition's key comes first."""
    if not isinstance(table, dict) or not table:
        raise UserError(
            "the config has no [tune.space] table: list the keys to search, e.g. "
            "train.lr = {log = [1e-4, 1e-1]} (see configs/tune-demo.toml)"
        )
    params = {}
    for key, spec in _flatten(table, "", leaf=_is_distribution):
        if not _is_distribution(spec):
            raise UserError(
                f"tune.space.{key}: expected a list of choices or a table like {{float = [low, high]}}, got {spec!r}"
            )
        if len(key.split(".")) < 2:
            raise UserError(f"tune.space.{key}: name a config key as section.key, e.g. train.lr")
        parts = key.split(".")
        if not _is_config_key(parts):
            for n in range(2, len(parts)):
                if _is_config_key(parts[:n]):
                    raise UserError(
                        f"tune.space.{'.'.join(parts[:n])}: unknown field {parts[n]!r} (a distribution "
                        f"is one of float, int, log, categorical, with step, log = true, when)"
                    )
            raise UserError(f"tune.space.{key}: unknown config key: {key}")
        params[key] = _parse_param(key, spec)
    for p in params.values():
        for other, allowed in p.when:
            q = params.get(other)
            if q is None:
                raise UserError(f"tune.space.{p.key}: its condition names {other!r}, which is not searched")
            if q.kind != "categorical":
                raise UserError(f"tune.space.{p.key}: its condition names {other!r}; conditions need a categorical key")
            bad = [a for a in allowed if a not in q.choices]
            if bad:
                raise UserError(
                    f"tune.space.{p.key}: its condition wants {other} = {bad[0]!r}, which is not among "
                    f"its choices {list(q.choices)!r}"
                )
    ordered: list[Param] = []
    pending = list(params.values())
    while pending:
        ready = [p for p in pending if all(o in {q.key for q in ordered} for o, _ in p.when)]
        if not ready:
            raise UserError(f"tune.space.{pending[0].key}: its conditions form a cycle")
        ordered += ready
        pending = [p for p in pending if p not in ready]
    return ordered


def sample(params: list[Param], trial) -> dict[str, Any]:
    """The values of one trial: a conditional key only when its conditions hold."""
    values: dict[str, Any] = {}
    for p in params:
        if all(values.get(o, _MISSING) in allowed for o, allowed in p.when):
            values[p.key] = p.suggest(trial)
    return values


_MISSING = object()


def toml_value(v) -> str:
    """A value as TOML (also what ``--set`` parses)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else ("inf" if v == math.inf else "-inf" if v == -math.inf else repr(v))
    if isinstance(v, int):
        return str(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{_toml_key(k)} = {toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(f"cannot write {v!r} as TOML")


def _toml_key(k: str) -> str:
    return k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else json.dumps(k)


def as_overrides(values: dict[str, Any]) -> list[str]:
    return [f"{k}={toml_value(v)}" for k, v in values.items()]


def check_space(params: list[Param], config_file, overrides) -> None:
    """Every value a parameter can take is a valid config value (low, high, each choice), where
    its ``when`` conditions hold (balance.class_weights needs balance.weights = "explicit")."""
    for p in params:
        given = as_overrides({key: values[0] for key, values in p.when})
        for v in p.examples():
            try:
                load_config(config_file, list(overrides) + given + as_overrides({p.key: v}))
            except UserError as exc:
                raise UserError(f"tune.space.{p.key}: {exc}") from None


def config_toml(cfg: Config, header: str = "") -> str:
    """A config file that lists what differs from the defaults (``[tune]`` left out)."""
    ours, base = cfg.to_dict(), Config().to_dict()
    lines = [f"# {line}" for line in header.splitlines()]
    for section, values in ours.items():
        if section == "tune":
            continue
        subtables = {
            k: v
            for k, v in values.items()
            if k in ("model", "train", "balance") and section in ("experts", "stage1", "flat") and v
        }
        plain = {
            k: v
            for k, v in values.items()
            if v != base[section][k]
            and k not in subtables
            and not (section in ("experts", "stage1", "flat") and k in ("model", "train", "balance"))
        }
        if plain:
            lines += ["", f"[{section}]"] + [f"{_toml_key(k)} = {toml_value(v)}" for k, v in plain.items()]
        for sub, table in subtables.items():
            lines += ["", f"[{section}.{sub}]"] + [f"{_toml_key(k)} = {toml_value(v)}" for k, v in table.items()]
    return "\n".join(lines).lstrip("\n") + "\n"


# --------------------------------------------------------------------------- one trial


def _hide_test(manifest):
    """The manifest a trial sees: test faces relabelled so that no stage evaluates them."""
    from .data import TEST_SPLITS

    m = manifest.copy()
    m.loc[m["split"].isin(TEST_SPLITS), "split"] = "test-hidden"  # FER+'s "valid" too
    return m


class _Data:
    """The data set and its prepared images, opened once for all trials (unless the space
    searches ``data.*`` keys, which change the data)."""

    def __init__(self, cfg: Config, out: Path, log):
        from .experiment import open_experiment

        self.base = open_experiment(cfg, out, log, progress=False, save=False)
        self.manifest = _hide_test(self.base.manifest)

    def experiment(self, cfg: Config, folder: Path, log, per_trial: bool):
        """The trial's run in ``folder``. The folder is its own (trial numbers are unique across
        the study's processes), so it takes no run lock: a lock lives as long as its process,
        and a long study would hold one per trial."""
        from .experiment import Experiment, open_experiment
        from .runtime import runtime

        folder.mkdir(parents=True, exist_ok=True)
        save_config(cfg, folder / "config.json")
        if per_trial:
            exp = open_experiment(cfg, folder, log, progress=False, save=False)
            exp.manifest = _hide_test(exp.manifest)
            return exp
        return Experiment(cfg, folder, self.manifest, self.base.images, runtime(cfg.train))


def needed_stages(cfg: Config, stage: str) -> list[str]:
    """Trained stages a trial of ``stage`` builds on (taken from ``--run``)."""
    need = []
    if stage in ("stage1", "experts") and cfg.for_stage(stage).model.trunk_from:
        need.append(cfg.for_stage(stage).model.trunk_from)
    if stage == "experts":
        need.append("stage1")
        if cfg.for_stage("stage1").model.trunk_from:
            need.append(cfg.for_stage("stage1").model.trunk_from)
    return list(dict.fromkeys(need))


def _check_base(base: Path | None, need: list[str]) -> None:
    for name in need:
        if base is None or not (base / name / "meta.json").is_file():
            where = f"{base}/{name}" if base else "--run"
            raise UserError(
                f"a trial of this stage builds on a trained {name} stage and {where} has none: "
                f"train it (ensemble fit-{name}) and pass its run folder with --run"
            )


def _link_base(folder: Path, base: Path | None, need: list[str]) -> None:
    _check_base(base, need)
    for name in need:
        link = folder / name
        if not link.exists():
            folder.mkdir(parents=True, exist_ok=True)
            link.symlink_to((base / name).resolve(), target_is_directory=True)


def run_stage(stage: str, exp, log) -> float:
    """Train ``stage`` in ``exp.run``; its selection metric on the selection split."""
    from stages.flat import fit_flat
    from stages.stage1 import fit_stage1

    if stage == "experts":
        from .routing import fit_experts_and_router

        router = fit_experts_and_router(exp, log=log)["router"]
        if not router["val"]:
            raise UserError("tuning needs validation faces (the selection split) and this data set has none")
        return float(router.get("val_final", router["val"][router["mode"]]))  # the final output's selection score
    metrics = (fit_flat if stage == "flat" else fit_stage1)(exp, log=log)
    val = metrics.get("val")
    if not val:
        raise UserError("tuning needs validation faces (the selection split) and this data set has none")
    return float(val["balanced_accuracy"] if stage == "flat" else (val["ccc_valence"] + val["ccc_arousal"]) / 2)


def _epoch_reporter(trial, prune: bool):
    import optuna

    def report(epoch: int, metric: float) -> None:
        if math.isnan(metric):
            return
        trial.report(metric, epoch)
        if prune and trial.should_prune():
            raise optuna.TrialPruned(f"pruned after epoch {epoch}")

    return report


# --------------------------------------------------------------------------- the study


def storage_url(url: str | None, out: Path) -> str:
    return url or f"sqlite:///{(out / 'study.db').resolve()}"


def open_storage(url: str, heartbeat: int = 60, on_stale=None):
    """Optuna RDB storage; SQLite waits for a busy database instead of failing at once. A running
    trial records a heartbeat every ``heartbeat`` seconds (``_heartbeat``); one silent for twice
    that belongs to a process that was killed (SIGKILL, a lost machine): ``fail_stale`` marks it
    failed and calls ``on_stale(number)`` for each trial it failed."""
    import optuna
    import sqlalchemy.exc

    kwargs = {"connect_args": {"timeout": 120}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    try:
        with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna since 2.9
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(
                url,
                engine_kwargs=kwargs,
                heartbeat_interval=heartbeat,
                grace_period=2 * heartbeat,
                heartbeat_stale_trial_callback=(lambda study, t: on_stale(t.number)) if on_stale else None,
            )
    except (ImportError, ValueError, sqlalchemy.exc.SQLAlchemyError) as exc:  # a driver, URL or server
        raise UserError(f"--storage {url}: cannot open it: {str(exc).splitlines()[0]}") from None


def _claim_lock(url: str):
    """Counting the study's trials and creating the next is one step for the processes of
    one machine (a file lock beside a SQLite database), so that N trials means N."""
    if url.startswith("sqlite:///"):
        from filelock import FileLock

        return FileLock(url[len("sqlite:///") :] + ".lock")
    return contextlib.nullcontext()  # several machines on one server: a process may run one trial past N


def counted(study) -> list:
    """Trials that count towards ``trials``: all but those interrupted or whose process died
    (they are redone). A trial that failed by its own error has ``error`` and counts."""
    from optuna.trial import TrialState

    return [
        t
        for t in study.get_trials(deepcopy=False)
        if t.state != TrialState.WAITING
        and not t.user_attrs.get("interrupted")
        and not (t.state == TrialState.FAIL and "error" not in t.user_attrs)
    ]


STALE = "trial {}: its process stopped without a word (no heartbeat): marked failed, it will be run again"


def fail_stale(study) -> None:
    """Mark failed the running trials whose heartbeat stopped (their process was killed without
    a word): they no longer count, so the study runs them again. The storage's ``on_stale``
    hears of each (``open_storage``)."""
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


@contextlib.contextmanager
def _heartbeat(storage, trial_id: int, every: float):
    """Record the trial's heartbeat now and every ``every`` seconds until the block ends."""
    import threading

    stop = threading.Event()

    def beat():
        while not stop.wait(every):
            with contextlib.suppress(Exception):  # a busy database: the next beat comes soon enough
                storage.record_heartbeat(trial_id)

    storage.record_heartbeat(trial_id)
    thread = threading.Thread(target=beat, name=f"heartbeat-{trial_id}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def _pruner(tc: TuneConfig):
    import optuna

    if tc.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=tc.startup_trials, n_warmup_steps=tc.warmup_epochs)
    if tc.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1)
    return optuna.pruners.NopPruner()


@dataclass
class TuneOptions:
    stage: str | None = None
    trials: int | None = None
    minutes: float | None = None
    study: str | None = None
    storage: str | None = None
    out: str | None = None
    run: str | None = None  # base run for stage1 / experts trials
    keep: str | None = None
    repeats: int | None = None
    pruner: str | None = None


def run_tune(config_file, overrides, opts: TuneOptions, log=print) -> dict:
    """Run (or continue) a study, then write the results; returns the summary as a dict."""
    import optuna

    from .runtime import StopOnSigterm

    if not config_file:
        raise UserError("ensemble tune needs --config FILE with a [tune.space] table (e.g. configs/tune-demo.toml)")
    cfg0 = load_config(config_file, overrides)
    tc = tune_config({k: v for k, v in cfg0.tune.items()})
    chosen = {
        k: getattr(opts, k)
        for k in ("stage", "trials", "minutes", "keep", "repeats", "pruner")
        if getattr(opts, k) is not None
    }
    tc = dataclasses.replace(tc, **chosen)
    params = parse_space(tc.space)
    check_space(params, config_file, overrides)
    study_name = opts.study or f"{Path(config_file).stem}-{tc.stage}"
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", study_name):
        raise UserError(f"--study {study_name!r}: use letters, digits, '.', '_' and '-'")
    out = Path(opts.out or f"artifacts/tune/{study_name}")
    out.mkdir(parents=True, exist_ok=True)
    base = Path(opts.run) if opts.run else None
    need = needed_stages(cfg0, tc.stage)
    _check_base(base, need)  # fail before anything trains

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = storage_url(opts.storage, out)
    lock = _claim_lock(url)
    space_json = json.dumps([dataclasses.asdict(p) for p in params], sort_keys=True)
    sampler = optuna.samplers.TPESampler(seed=None if tc.sampler_seed < 0 else tc.sampler_seed)
    with lock:  # two processes creating the tables of a new database at once would collide
        storage = open_storage(url, tc.heartbeat, on_stale=lambda n: log(STALE.format(n)))
        study = optuna.create_study(
            study_name=study_name,
            storage=storage,
            direction="maximize",
            sampler=sampler,
            pruner=_pruner(tc),
            load_if_exists=True,
        )
        attrs = study.user_attrs
        if not attrs:
            study.set_user_attr("stage", tc.stage)
            study.set_user_attr("space", space_json)
        elif attrs.get("stage") != tc.stage or attrs.get("space") != space_json:
            raise UserError(
                f"study {study_name!r} in {url} was started with another stage or search space; "
                f"continue it with the same [tune.space] and --stage, or name a new --study"
            )
    job = _Job(
        tc,
        params,
        config_file,
        tuple(overrides),
        out,
        url,
        base,
        need,
        _Data(cfg0, out, log),
        any(p.key.startswith("data.") for p in params),
    )
    with lock:
        fail_stale(study)  # before counting what is done
    log(
        f"tune: study {study_name!r} ({url}), stage {tc.stage}, {len(params)} parameters, "
        f"{len(counted(study))}/{tc.trials} trials done, pruner {tc.pruner}"
    )
    t_start = time.time()
    n_failed_row = 0
    with StopOnSigterm():  # SIGTERM stops a tune like Ctrl-C: the trial is marked failed, the study kept
        while True:
            if tc.minutes and (time.time() - t_start) / 60 >= tc.minutes:
                log(f"tune: {tc.minutes:g} minutes are up; no new trial started")
                break
            with lock:
                fail_stale(study)
                if len(counted(study)) >= tc.trials:
                    break
                with warnings.catch_warnings():  # ask/tell with heartbeats: _run_trial records them
                    warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")
                    trial = study.ask()
                storage.record_heartbeat(trial._trial_id)  # from the start: a kill before training is seen too
            try:
                _run_trial(study, trial, job, log)
                n_failed_row = 0
            except UserError as exc:
                n_failed_row += 1
                if n_failed_row >= 3:
                    raise UserError(f"3 trials in a row failed; the last: {exc}") from None
            if tc.keep != "all":
                _tidy(study, out, tc.keep, final=False)
    repeats = _repeats(study, job, log)
    result = write_results(study, tc, params, config_file, overrides, out, url, repeats, time.time() - t_start)
    if tc.keep != "all":
        _tidy(study, out, tc.keep, final=True)
    for line in result["summary"]:
        log(line)
    return result


@dataclass
class _Job:
    """What every trial of one tune command shares."""

    tc: TuneConfig
    params: list
    config_file: Any
    overrides: tuple
    out: Path
    url: str
    base: Path | None  # --run: the trained stages a trial builds on
    need: list  # which of them
    data: _Data
    per_trial_data: bool  # the space searches data.* keys: open the data per trial

    def train(self, values: dict, folder: Path, extra: tuple = (), hook=None) -> float:
        """One run of the stage with ``values`` in ``folder``: its selection metric."""
        from .engine import ON_EPOCH

        cfg = load_config(self.config_file, list(self.overrides) + as_overrides(values) + list(extra))
        _link_base(folder, self.base, self.need)
        token = ON_EPOCH.set(hook) if hook is not None else None
        try:
            with open_log(folder) as tlog:
                return run_stage(self.tc.stage, self.data.experiment(cfg, folder, tlog, self.per_trial_data), tlog)
        finally:
            if token is not None:
                ON_EPOCH.reset(token)


def _run_trial(study, trial, job: _Job, log) -> None:
    """Sample, train, tell the study; a trial's own error (UserError) marks it failed and is
    raised again after logging; an interruption marks it failed and not counted. A trial that
    another process failed as stale meanwhile (this one was paused past twice the heartbeat)
    is dropped with one line: it will be run again."""
    import optuna

    try:
        _run_trial_once(study, trial, job, log)
    except (optuna.exceptions.UpdateFinishedTrialError, ValueError) as exc:
        stolen = isinstance(exc, optuna.exceptions.UpdateFinishedTrialError) or str(exc).startswith("Cannot tell a")
        if not stolen or not study._storage.get_trial(trial._trial_id).state.is_finished():
            raise
        from .engine import TrainingInterrupted

        if isinstance(exc.__context__, (KeyboardInterrupt, TrainingInterrupted)):
            raise TrainingInterrupted(
                f"tune interrupted; the study in {job.url} is intact: rerun to continue"
            ) from None
        log(
            f"trial {trial.number}: another process marked it failed while it ran (no heartbeat for "
            f"{2 * job.tc.heartbeat} s: was this process paused?); its result is dropped, it will be run again"
        )


def _run_trial_once(study, trial, job: _Job, log) -> None:
    import optuna
    from optuna.trial import TrialState

    from .engine import TrainingInterrupted

    t0 = time.time()
    values: dict = {}
    try:
        folder = job.out / "trials" / f"{trial.number:04d}"
        trial.set_user_attr("run", str(folder))
        trial.set_user_attr("pid", os.getpid())
        values = sample(job.params, trial)
        trial.set_user_attr("seed", load_config(job.config_file, list(job.overrides) + as_overrides(values)).train.seed)
        # the experts are several fits: no single per-epoch curve to prune on
        hook = _epoch_reporter(trial, job.tc.pruner != "none") if job.tc.stage != "experts" else None
        with _heartbeat(study._storage, trial._trial_id, job.tc.heartbeat):
            value = job.train(values, folder, hook=hook)
        if not math.isfinite(value):
            raise UserError(f"{METRIC_NAME[job.tc.stage]} is {value}: no validation face could be scored")
    except optuna.TrialPruned as exc:
        study.tell(trial, state=TrialState.PRUNED)
        log(f"trial {trial.number}: {exc} ({_shown(values)}), {(time.time() - t0) / 60:.2f} min")
    except (KeyboardInterrupt, TrainingInterrupted):
        trial.set_user_attr("interrupted", True)
        study.tell(trial, state=TrialState.FAIL)
        raise TrainingInterrupted(
            f"tune interrupted: trial {trial.number} is marked failed and will be run again; "
            f"the study in {job.url} is intact: rerun the same command to continue"
        ) from None
    except UserError as exc:
        trial.set_user_attr("error", str(exc))
        study.tell(trial, state=TrialState.FAIL)
        log(f"trial {trial.number}: failed: {exc}")
        raise
    except BaseException as exc:
        trial.set_user_attr("error", f"{type(exc).__name__}: {exc}")
        study.tell(trial, state=TrialState.FAIL)
        raise
    else:
        study.tell(trial, value)
        log(
            f"trial {trial.number}: {METRIC_NAME[job.tc.stage]} {value:.4f} ({_shown(values)}), "
            f"{(time.time() - t0) / 60:.2f} min"
        )


@contextlib.contextmanager
def open_log(folder: Path):
    """A trial's own log (its training lines), so that the console shows one line per trial."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "log.txt", "a", encoding="utf-8") as f:

        def log(msg: str) -> None:
            f.write(f"{msg}\n")
            f.flush()

        yield log


def _shown(values: dict) -> str:
    return ", ".join(f"{k.split('.', 1)[1]}={_fmt(v)}" for k, v in values.items())


def _fmt(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def _tidy(study, out: Path, keep: str, final: bool) -> None:
    """Remove the run folders of finished trials that --keep does not keep."""
    from optuna.trial import TrialState

    best = _best(study)
    for t in study.get_trials(deepcopy=False):
        if t.state in (TrialState.RUNNING, TrialState.WAITING):
            continue
        if keep == "best" and best is not None and t.number == best.number:
            continue
        if keep == "none" and not final and best is not None and t.number == best.number:
            continue  # best.toml is written from the study; the folder goes at the end
        shutil.rmtree(out / "trials" / f"{t.number:04d}", ignore_errors=True)
    if final and keep == "none":
        shutil.rmtree(out / "repeats", ignore_errors=True)


def _best(study):
    from optuna.trial import TrialState

    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.value is not None]
    return max(done, key=lambda t: t.value) if done else None


def _repeats(study, job: _Job, log) -> list[dict]:
    """The top configurations re-trained with ``repeats`` new seeds each: mean and spread."""
    tc = job.tc
    if not tc.repeats:
        return []
    import numpy as np
    from optuna.trial import TrialState

    done = sorted(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)), key=lambda t: -t.value)[: tc.top]
    rows = []
    for t in done:
        seed0 = load_config(job.config_file, list(job.overrides) + as_overrides(t.params)).train.seed
        seeds = [seed0 + r for r in range(1, tc.repeats + 1)]
        scores = []
        for seed in seeds:
            folder = job.out / "repeats" / f"{t.number:04d}-seed{seed}"
            scores.append(job.train(t.params, folder, extra=(f"train.seed={seed}",)))
            log(f"repeat: trial {t.number} with seed {seed}: {METRIC_NAME[tc.stage]} {scores[-1]:.4f}")
        rows.append(
            {
                "trial": t.number,
                "search_value": t.value,
                "seeds": seeds,
                "values": scores,
                "mean": float(np.mean(scores)),
                "std": float(np.std(scores, ddof=1)) if len(scores) > 1 else 0.0,
            }
        )
    return sorted(rows, key=lambda d: -d["mean"])


# --------------------------------------------------------------------------- results


def write_results(
    study, tc, params, config_file, overrides, out: Path, url: str, repeats: list[dict], seconds: float
) -> dict:
    """trials.csv, best.toml, plots/*.png, repeats.json and the summary lines."""
    from optuna.trial import TrialState

    from .files import write_json

    trials = study.get_trials(deepcopy=False)
    states = {s: sum(t.state == s for t in trials) for s in TrialState}
    _write_csv(study, out / "trials.csv")
    metric = METRIC_NAME[tc.stage]
    lines = [
        (
            f"study {study.study_name}: {len(trials)} trials, {states[TrialState.COMPLETE]} complete, "
            f"{states[TrialState.PRUNED]} pruned, {states[TrialState.FAIL]} failed, "
            f"{states[TrialState.RUNNING]} running; this process {seconds / 60:.1f} min"
        )
    ]
    best = _best(study)
    if best is None:
        lines.append("no complete trial yet: no best configuration")
        return {"summary": lines, "best": None}
    chosen_trial, chosen = best, {"trial": best.number, "value": best.value}
    if repeats:
        top = repeats[0]
        chosen_trial = next(t for t in trials if t.number == top["trial"])
        chosen = {"trial": top["trial"], "value": top["mean"], "std": top["std"]}
        write_json(out / "repeats.json", repeats)
    cfg = load_config(config_file, list(overrides) + as_overrides(chosen_trial.params))
    header = (
        f"best of study {study.study_name} ({url}): trial {chosen_trial.number}, {metric} "
        f"{chosen['value']:.4f}"
        + (f" (mean of {tc.repeats} seeds)" if repeats else "")
        + f"\nfrom {config_file}"
        + (f" with --set {' '.join(overrides)}" if overrides else "")
        + f"\ntrain it: python -m ensemble fit-{tc.stage} --config {out / 'best.toml'}"
    )
    best_toml = out / "best.toml"
    tmp = best_toml.with_name(f".best.toml.tmp{os.getpid()}")
    tmp.write_text(config_toml(cfg, header), encoding="utf-8")
    os.replace(tmp, best_toml)
    plots = _plots(study, params, out / "plots")
    lines.append(
        f"best: trial {chosen_trial.number}, {metric} {chosen['value']:.4f}"
        + (f" ± {chosen['std']:.4f} over {tc.repeats} new seeds (search: {chosen_trial.value:.4f})" if repeats else "")
    )
    for k, v in chosen_trial.params.items():
        lines.append(f"  {k} = {toml_value(v)}")
    done = sorted((t for t in trials if t.state == TrialState.COMPLETE), key=lambda t: -t.value)[:5]
    lines.append("top trials: " + ", ".join(f"#{t.number} {t.value:.4f}" for t in done))
    if repeats:
        lines.append("repeats: " + ", ".join(f"#{r['trial']} {r['mean']:.4f} ± {r['std']:.4f}" for r in repeats))
    lines.append(
        f"wrote {out / 'trials.csv'}, {best_toml}" + (f", {len(plots)} plots in {out / 'plots'}" if plots else "")
    )
    lines.append(f"next: python -m ensemble fit-{tc.stage} --config {best_toml} --out artifacts/best")
    summary = {
        "summary": lines,
        "best": {**chosen, "params": chosen_trial.params},
        "plots": plots,
        "states": {s.name: n for s, n in states.items()},
    }
    (out / "summary.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return summary


def _write_csv(study, path: Path) -> None:
    df = study.trials_dataframe(
        attrs=("number", "value", "state", "duration", "params", "user_attrs", "intermediate_values")
    )
    if "duration" in df:
        df["minutes"] = df["duration"].dt.total_seconds() / 60
        df = df.drop(columns=["duration"])
    # params_train.lr -> train.lr, user_attrs_seed -> seed, intermediate_values_3 -> epoch_3 (the
    # per-epoch history, also of pruned trials)
    df.columns = [
        re.sub(r"^(params_|user_attrs_)", "", c).replace("intermediate_values_", "epoch_") for c in df.columns
    ]
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    df.to_csv(tmp, index=False)
    os.replace(tmp, path)


def _plots(study, params, folder: Path) -> list[str]:
    """Optimisation history, intermediate values, importances, slices (as the trials allow)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna.visualization.matplotlib as vis
    from optuna.trial import TrialState

    folder.mkdir(parents=True, exist_ok=True)
    n_complete = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    jobs = {"history": lambda: vis.plot_optimization_history(study), "slices": lambda: vis.plot_slice(study)}
    if any(t.intermediate_values for t in study.get_trials(deepcopy=False)):  # per-epoch curves (not experts)
        jobs["epochs"] = lambda: vis.plot_intermediate_values(study)
    if len(params) >= 2 and n_complete >= 4:
        jobs["importances"] = lambda: vis.plot_param_importances(study)
    written = []
    for name, make in jobs.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ax = make()
            fig = (ax.flat[0] if hasattr(ax, "flat") else ax).figure
            fig.set_size_inches(max(6.4, fig.get_size_inches()[0]), 4.8)
            path = folder / f"{name}.png"
            fig.savefig(path, dpi=100, bbox_inches="tight")
            plt.close(fig)
            written.append(str(path))
        except (ValueError, RuntimeError, ZeroDivisionError):
            plt.close("all")  # not enough trials for this plot yet
    return written


__all__ = ["Param", "TuneConfig", "TuneOptions", "config_toml", "parse_space", "run_tune", "sample", "tune_config"]
