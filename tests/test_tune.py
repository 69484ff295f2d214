"""ensemble tune: the search-space parser, and tiny Optuna studies on synthetic faces (end to end,
resume, two processes on one study, pruning, interruption, the test split never read)."""

import os
import signal
import sqlite3
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest

from ensemble.cli import main
from ensemble.config import Config, load_config
from ensemble.errors import UserError
from ensemble.tune import TuneOptions, config_toml, parse_space, run_tune, sample

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread")

SPACE = """
[tune.space]
train.optimizer = ["adam", "sgd"]
train.lr = {log = [1e-3, 1e-2]}
train.momentum = {float = [0.5, 0.9], when = {"train.optimizer" = "sgd"}}
model.dropout = {float = [0.0, 0.5], step = 0.1}
"""


def _space(text: str) -> list:
    return parse_space(tomllib.loads(text)["tune"]["space"])


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("tune-cache")


def write_config(folder: Path, cache: Path, space: str = SPACE, tune: str = "", epochs: int = 2) -> Path:
    """A CPU-sized tune config: 240 synthetic faces at 32 px, tinyvgg, ``epochs`` epochs."""
    path = folder / "tune.toml"
    path.write_text(f"""
[data]
format = "synthetic"
n_synthetic = 240
synthetic_size = 32
image_size = 32
cache_dir = "{cache}"

[model]
backbone = "tinyvgg"
hidden = 32

[train]
epochs = {epochs}
batch_size = 32
device = "cpu"
precision = "fp32"
threads = 1

[tune]
startup_trials = 1
warmup_epochs = 0
{tune}
{space}
""")
    return path


def _files(folder: Path) -> dict:
    """Every file under ``folder`` (symlinks not followed) with its size and modification time."""
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()
    }


def _study(out: Path, name: str):
    return optuna.load_study(study_name=name, storage=f"sqlite:///{out / 'study.db'}")


# --------------------------------------------------------------------------- the space parser


def test_every_distribution_kind():
    params = {
        p.key: p
        for p in _space("""
[tune.space]
train.optimizer = ["adam", "sgd"]
train.schedule = {categorical = ["cosine", "none"]}
train.lr = {log = [1e-4, 1e-1]}
train.weight_decay = {float = [1e-6, 1e-2], log = true}
model.dropout = {float = [0.0, 0.5], step = 0.1}
train.label_smoothing = {float = [0.0, 0.2]}
balance.cap = {int = [200, 2000], step = 200}
model.hidden = {int = [16, 256], log = true}
train.epochs = {int = [1, 3]}
""")
    }
    study = optuna.create_study()
    trial = study.ask()
    values = sample(list(params.values()), trial)
    assert set(values) == set(params)
    d = trial.distributions
    assert isinstance(d["train.optimizer"], optuna.distributions.CategoricalDistribution)
    assert d["train.optimizer"].choices == ("adam", "sgd") and d["train.schedule"].choices == ("cosine", "none")
    assert d["train.lr"].log and (d["train.lr"].low, d["train.lr"].high) == (1e-4, 1e-1)
    assert d["train.weight_decay"].log and not d["model.dropout"].log and d["model.dropout"].step == 0.1
    assert d["train.label_smoothing"].step is None and not d["train.label_smoothing"].log
    assert isinstance(d["balance.cap"], optuna.distributions.IntDistribution) and d["balance.cap"].step == 200
    assert d["model.hidden"].log and isinstance(values["model.hidden"], int)
    assert values["balance.cap"] in range(200, 2001, 200) and 1e-4 <= values["train.lr"] <= 1e-1
    assert round(values["model.dropout"] * 10) == pytest.approx(values["model.dropout"] * 10)


def test_conditional_keys_only_when_their_condition_holds():
    params = _space("""
[tune.space]
train.momentum = {float = [0.5, 0.9], when = {"train.optimizer" = "sgd"}}
balance.class_weights.contempt = {float = [1.0, 8.0], when = {"balance.weights" = ["explicit"]}}
train.optimizer = ["adam", "sgd"]
balance.weights = ["none", "explicit"]
""")
    order = [p.key for p in params]
    assert order.index("train.optimizer") < order.index("train.momentum")  # conditions are sampled first
    adam = sample(params, optuna.trial.FixedTrial({"train.optimizer": "adam", "balance.weights": "none"}))
    assert adam == {"train.optimizer": "adam", "balance.weights": "none"}
    sgd = sample(
        params,
        optuna.trial.FixedTrial(
            {
                "train.optimizer": "sgd",
                "train.momentum": 0.7,
                "balance.weights": "explicit",
                "balance.class_weights.contempt": 3.0,
            }
        ),
    )
    assert sgd["train.momentum"] == 0.7 and sgd["balance.class_weights.contempt"] == 3.0
    # a per-class weight reaches the config as a --set override
    from ensemble.tune import as_overrides

    cfg = load_config(None, as_overrides(sgd))
    assert cfg.balance.class_weights == {"contempt": 3.0} and cfg.train.optimizer == "sgd"


@pytest.mark.parametrize(
    "spec, message",
    [
        ("train.lr = 0.1", "tune.space.train.lr: expected a list of choices"),
        ("train.lr = {float = [0.1, 0.01]}", "tune.space.train.lr: low 0.1 must be below high 0.01"),
        ("train.lr = {float = [0.1]}", "tune.space.train.lr: float expects [low, high]"),
        ("train.lr = {log = [0.0, 0.1]}", "tune.space.train.lr: a log range needs low > 0"),
        (
            "train.lr = {float = [0.001, 0.1], log = true, step = 0.01}",
            "tune.space.train.lr: a range is either stepped or log",
        ),
        ("train.lr = {uniform = [0.001, 0.1]}", "tune.space.train.lr: unknown field 'uniform'"),
        ("train.lr = {float = [0.001, 0.1], int = [1, 2]}", "tune.space.train.lr: give exactly one of"),
        ("train.epochs = {int = [1.5, 4]}", "tune.space.train.epochs: int expects whole numbers"),
        ("train.epochs = {int = [1, 4], step = 0.5}", "tune.space.train.epochs: step must be a whole number"),
        ("train.optimizer = []", "tune.space.train.optimizer: categorical expects a non-empty list"),
        ('train.optimizer = ["sgd", "sgd"]', "tune.space.train.optimizer: a choice is listed twice"),
        ('train.optimizer = {categorical = ["sgd"], step = 1}', "tune.space.train.optimizer: step and log apply"),
        (
            'train.momentum = {float = [0.5, 0.9], when = {"train.optimizer" = "sgd"}}',
            "tune.space.train.momentum: its condition names 'train.optimizer', which is not searched",
        ),
        (
            'train.optimizer = ["adam", "sgd"]\ntrain.momentum = {float = [0.5, 0.9], when = {"train.optimizer" = "rmsprop"}}',
            "tune.space.train.momentum: its condition wants train.optimizer = 'rmsprop'",
        ),
        (
            'train.lr = {log = [1e-3, 1e-1]}\ntrain.momentum = {float = [0.5, 0.9], when = {"train.lr" = 0.01}}',
            "conditions need a categorical key",
        ),
        (
            'a = {categorical = ["x"], when = {b = "y"}}\nb = {categorical = ["y"], when = {a = "x"}}',
            "tune.space.a: name a config key as section.key",
        ),
        (
            (
                'train.optimizer = {categorical = ["sgd"], when = {"train.schedule" = "none"}}\n'
                'train.schedule = {categorical = ["none"], when = {"train.optimizer" = "sgd"}}'
            ),
            "its conditions form a cycle",
        ),
        ("trian.lr = {log = [1e-3, 1e-1]}", "tune.space.trian.lr: unknown config key: trian.lr"),
        (
            "flat.train.lr = {log = [1e-3, 1e-1]}\nflat.train.bogus = [1, 2]",
            "tune.space.flat.train.bogus: unknown config key",
        ),
    ],
)
def test_bad_specs_are_one_line_errors_naming_the_key(spec, message):
    with pytest.raises(UserError) as err:
        _space("[tune.space]\n" + spec)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_space_values_are_checked_against_the_config(tmp_path, cache):
    from ensemble.tune import check_space

    cfg = write_config(tmp_path, cache)
    with pytest.raises(UserError, match=r"^tune.space.train.lrr: unknown config key: train.lrr$"):
        check_space(_space("[tune.space]\ntrain.lrr = {log = [1e-3, 1e-2]}"), cfg, ())
    with pytest.raises(UserError, match=r"^tune.space.model.dropout: config key model.dropout = 1.0 must be"):
        check_space(_space("[tune.space]\nmodel.dropout = {float = [0.1, 1.0]}"), cfg, ())
    with pytest.raises(UserError, match=r"^tune.space.train.optimizer: .* must be one of"):
        check_space(_space('[tune.space]\ntrain.optimizer = ["adam", "rmsprop"]'), cfg, ())
    with pytest.raises(UserError, match=r"^tune.space.balance.class_weights.boredom: .*unknown class 'boredom'"):
        check_space(_space("[tune.space]\nbalance.class_weights.boredom = {float = [1, 2]}"), cfg, ())


def test_tune_table_is_checked(tmp_path, cache):
    cfg = write_config(tmp_path, cache, tune="trails = 3")
    with pytest.raises(SystemExit) as code:
        main(["tune", "--config", str(cfg), "--out", str(tmp_path / "t")])
    assert code.value.code == 2
    bare = tmp_path / "bare.toml"
    bare.write_text("[train]\nepochs = 1\n")
    with pytest.raises(UserError, match="no \\[tune.space\\] table"):
        run_tune(bare, (), TuneOptions(out=str(tmp_path / "t2")))
    with pytest.raises(UserError, match="trained stage1 stage"):
        run_tune(write_config(tmp_path, cache), (), TuneOptions(stage="experts", out=str(tmp_path / "t3")))


def test_config_toml_round_trips():
    cfg = load_config(
        None,
        [
            "train.lr=0.02",
            'balance.weights="explicit"',
            "balance.class_weights.fear=2.5",
            'experts.model.trunk_from="flat"',
            "stage1.train.epochs=7",
            "data.prototypes.happy=[0.5, 0.25]",
            "model.dropout=0.125",
            "tune.trials=3",
        ],
    )
    text = config_toml(cfg, "a header\ntwo lines")
    assert text.startswith("# a header\n# two lines\n") and "[tune" not in text
    back = load_config_text(text)
    assert back.to_dict() == {**cfg.to_dict(), "tune": {}}
    assert config_toml(Config()) == "\n"


def load_config_text(text: str):
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as f:
        f.write(text)
    try:
        return load_config(f.name)
    finally:
        os.unlink(f.name)


# --------------------------------------------------------------------------- tiny studies


def test_study_end_to_end_then_resume(tmp_path, cache, capsys):
    cfg = write_config(tmp_path, cache, tune="top = 2")
    out = tmp_path / "tune"
    main(
        [
            "tune",
            "--config",
            str(cfg),
            "--trials",
            "4",
            "--out",
            str(out),
            "--study",
            "s",
            "--pruner",
            "none",
            "--repeats",
            "2",
        ]
    )
    shown = capsys.readouterr().out
    study = _study(out, "s")
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 4
    assert all(t.user_attrs["seed"] == 0 for t in study.trials)
    assert "study s: 4 trials, 4 complete, 0 pruned, 0 failed" in shown and "best: trial" in shown and "±" in shown
    table = pd.read_csv(out / "trials.csv")
    assert len(table) == 4 and {
        "train.lr",
        "train.optimizer",
        "model.dropout",
        "value",
        "minutes",
        "seed",
        "epoch_1",
        "epoch_2",
    } <= set(table.columns)
    assert np.allclose(table["value"], [t.value for t in study.trials])
    # the momentum column is filled only where the optimizer is sgd (absent when no trial drew sgd,
    # 1 in 16 with the unseeded sampler)
    momentum = table["train.momentum"] if "train.momentum" in table else pd.Series(np.nan, index=table.index)
    assert (momentum.notna() == (table["train.optimizer"] == "sgd")).all()
    # best.toml: the config of the winning trial (after the repeats), loadable by fit-*
    import json

    repeats = json.loads((out / "repeats.json").read_text())
    assert len(repeats) == 2 and all(len(r["values"]) == 2 and r["seeds"] == [1, 2] for r in repeats)
    assert repeats[0]["mean"] == max(r["mean"] for r in repeats)
    winner = study.trials[repeats[0]["trial"]]
    best = load_config(out / "best.toml")
    from ensemble.tune import as_overrides

    assert best.to_dict() == {**load_config(cfg, as_overrides(winner.params)).to_dict(), "tune": {}}
    for name in ("history", "slices", "importances", "epochs"):
        assert (out / "plots" / f"{name}.png").stat().st_size > 1000, name
    # --keep best: only the best trial's run folder stays, and it was never scored on test
    kept = sorted(p.name for p in (out / "trials").iterdir())
    assert kept == [f"{study.best_trial.number:04d}"]
    metrics = json.loads((out / "trials" / kept[0] / "flat" / "metrics.json").read_text())
    assert "val" in metrics and "test" not in metrics
    assert metrics["val"]["balanced_accuracy"] == pytest.approx(study.best_value)

    # rerunning continues the study up to --trials; at the total it only reports
    main(["tune", "--config", str(cfg), "--trials", "5", "--out", str(out), "--study", "s", "--pruner", "none"])
    assert [t.number for t in _study(out, "s").trials] == [0, 1, 2, 3, 4]
    main(["tune", "--config", str(cfg), "--trials", "5", "--out", str(out), "--study", "s"])
    assert len(_study(out, "s").trials) == 5
    # another space on the same study is refused
    (tmp_path / "other").mkdir()
    other = write_config(tmp_path / "other", cache, space="[tune.space]\ntrain.lr = {log = [1e-3, 1e-2]}")
    with pytest.raises(UserError, match="another stage or search space"):
        run_tune(other, (), TuneOptions(out=str(out), study="s", trials=6))


def test_pruned_trials_stop_early_and_keep_their_history(tmp_path, cache, monkeypatch):
    from ensemble import tune

    # a pruner that prunes every trial at its first report: the plumbing (engine hook -> trial.report
    # -> should_prune -> TrialPruned -> PRUNED) is what is tested, not the median's statistics
    monkeypatch.setattr(tune, "_pruner", lambda tc: optuna.pruners.ThresholdPruner(upper=-1.0))
    cfg = write_config(tmp_path, cache, epochs=4)
    out = tmp_path / "tune"
    run_tune(cfg, (), TuneOptions(trials=2, out=str(out), study="p", keep="all"))
    study = _study(out, "p")
    assert [t.state.name for t in study.trials] == ["PRUNED", "PRUNED"]
    for t in study.trials:
        assert list(t.intermediate_values) == [1]  # stopped after epoch 1 of 4
        history = pd.read_csv(out / "trials" / f"{t.number:04d}" / ".flat.work" / "history.csv")
        assert list(history["epoch"]) == [1] and history["val_metric"][0] == pytest.approx(t.intermediate_values[1])
    table = pd.read_csv(out / "trials.csv")
    assert list(table["state"]) == ["PRUNED", "PRUNED"] and table["epoch_1"].notna().all()


def test_objective_never_reads_the_test_split(tmp_path, cache, monkeypatch):
    import ensemble.engine
    import ensemble.experiment
    import stages.neural

    poisoned = {}
    real_load = ensemble.experiment.load_dataset

    def load_poisoned(*a, **kw):
        ds = real_load(*a, **kw)
        test = ds.manifest["split"] == "test"
        ds.manifest.loc[test, "label"] = 0  # wrong labels and V/A on every test face
        ds.manifest.loc[test, ["valence", "arousal"]] = 9.0
        poisoned["test"] = set(np.flatnonzero(test.to_numpy()))
        poisoned["val"] = set(np.flatnonzero((ds.manifest["split"] == "val").to_numpy()))
        return ds

    # every evaluation: the training loop's per-epoch validation (engine) and the stage's
    # evaluation of its best epoch on each split it has (stages.neural)
    evaluated = {"epoch": [], "stage": []}
    real_evaluate = ensemble.engine.evaluate

    def spy(where):
        def evaluate(net, task, images, idx, *a, **kw):
            evaluated[where].append({int(i) for i in idx})
            return real_evaluate(net, task, images, idx, *a, **kw)

        return evaluate

    monkeypatch.setattr(ensemble.experiment, "load_dataset", load_poisoned)
    monkeypatch.setattr(ensemble.engine, "evaluate", spy("epoch"))
    monkeypatch.setattr(stages.neural, "evaluate", spy("stage"))
    cfg = write_config(tmp_path, cache, epochs=1)
    out = tmp_path / "tune"
    # no pruner: a trial the median pruner stops after its epoch has no best-epoch evaluation,
    # and whether it does depends on the (randomly seeded) sampler's draw
    run_tune(cfg, (), TuneOptions(trials=2, out=str(out), study="t", keep="all", pruner="none"))
    # two trials of one epoch: one validation per epoch, one evaluation of the best epoch (val only)
    assert poisoned["test"] and len(evaluated["epoch"]) == 2 and len(evaluated["stage"]) == 2
    faces_seen = evaluated["epoch"] + evaluated["stage"]
    assert all(faces and faces <= poisoned["val"] and not faces & poisoned["test"] for faces in faces_seen)
    # the training loop's per-epoch validation saw only val faces too
    for t in _study(out, "t").trials:
        history = pd.read_csv(out / "trials" / f"{t.number:04d}" / "flat" / "history.csv")
        assert history["val_balanced_accuracy"].iloc[-1] == pytest.approx(t.value)


def _tune_cmd(cfg, out, *extra):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return [
        sys.executable,
        "-m",
        "ensemble",
        "tune",
        "--config",
        str(cfg),
        "--out",
        str(out),
        "--study",
        "x",
        *extra,
    ], env


@pytest.mark.slow
def test_two_processes_share_one_study(tmp_path, cache):
    cfg = write_config(tmp_path, cache, epochs=1)
    out = tmp_path / "tune"
    cmd, env = _tune_cmd(cfg, out, "--trials", "4", "--keep", "all", "--pruner", "none")
    procs = [
        subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for _ in range(2)
    ]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs
    study = _study(out, "x")
    assert sorted(t.number for t in study.trials) == [0, 1, 2, 3]
    assert all(t.state.name == "COMPLETE" for t in study.trials)
    pids = [t.user_attrs["pid"] for t in study.trials]
    assert set(pids) == {p.pid for p in procs} or len(set(pids)) == 1  # both took part (or one was faster)
    for t in study.trials:  # each trial ran exactly once: one training log, one epoch line
        text = (out / "trials" / f"{t.number:04d}" / "log.txt").read_text()
        assert text.count("flat epoch 1/1") == 1
    ran = [line for log in logs for line in log.splitlines() if line.startswith("trial ")]
    assert sorted(int(line.split()[1].rstrip(":")) for line in ran) == [0, 1, 2, 3]


@pytest.mark.slow
def test_sigterm_marks_the_trial_failed_and_the_study_continues(tmp_path, cache):
    cfg = write_config(tmp_path, cache, epochs=40)
    out = tmp_path / "tune"
    cmd, env = _tune_cmd(cfg, out, "--trials", "1", "--pruner", "none")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = out / "trials" / "0000" / "log.txt"
    deadline = time.time() + 300
    while time.time() < deadline and not (log.is_file() and "flat epoch 1/40" in log.read_text()):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    text = proc.communicate(timeout=120)[0]
    assert proc.returncode == 130, text
    assert "trial 0 is marked failed" in text and "Traceback" not in text
    with sqlite3.connect(out / "study.db") as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    study = _study(out, "x")
    assert [(t.number, t.state.name, t.user_attrs.get("interrupted")) for t in study.trials] == [(0, "FAIL", True)]
    # the interrupted trial does not count: a rerun runs one more and completes the study
    cmd, env = _tune_cmd(cfg, out, "--trials", "1", "--pruner", "none", "--set", "train.epochs=1")
    subprocess.run(cmd, cwd=REPO, env=env, check=True, capture_output=True, timeout=600)
    assert [t.state.name for t in _study(out, "x").trials] == ["FAIL", "COMPLETE"]


@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used")
def test_a_trial_whose_heartbeat_stops_is_failed_and_redone(tmp_path):
    """A process killed without a word (SIGKILL, a lost machine) leaves its trial RUNNING: once
    its heartbeat is older than twice the interval, the next process marks it failed, it stops
    counting, and the study runs another in its place; a trial still beating is left alone."""
    from ensemble.tune import STALE, _heartbeat, counted, fail_stale, open_storage

    said = []
    storage = open_storage(f"sqlite:///{tmp_path / 'study.db'}", heartbeat=1, on_stale=said.append)
    study = optuna.create_study(study_name="h", storage=storage, direction="maximize")
    alive = study.ask()
    with _heartbeat(storage, alive._trial_id, 0.3):
        time.sleep(3.5)
        fail_stale(study)
        assert not said  # beating: left alone
    dead = study.ask()  # its process "dies" at once after one beat
    storage.record_heartbeat(dead._trial_id)
    study.tell(alive, 0.5)
    time.sleep(3.5)  # SQLite's clock counts whole seconds
    fail_stale(study)
    assert said == [dead.number] and STALE.format(dead.number).startswith(f"trial {dead.number}: its process stopped")
    assert [t.number for t in counted(study)] == [alive.number]


def _bare_job(tmp_path, train):
    from types import SimpleNamespace

    from ensemble.tune import TuneConfig

    tc = TuneConfig(stage="flat", pruner="none", heartbeat=60)
    return SimpleNamespace(tc=tc, params=[], config_file=None, overrides=(), out=tmp_path, url="u", train=train)


@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used")
def test_a_nan_score_is_the_trials_own_failure_and_counts(tmp_path):
    """A metric of nan (no validation face could be scored) would make Optuna fail the trial
    without a reason, and an uncounted trial is run again and again: it is a failure of its own."""
    from ensemble.tune import _run_trial, counted, open_storage

    study = optuna.create_study(storage=open_storage(f"sqlite:///{tmp_path / 's.db'}"), direction="maximize")
    trial = study.ask()
    with pytest.raises(UserError, match="val balanced accuracy is nan"):
        _run_trial(study, trial, _bare_job(tmp_path, lambda values, folder, hook: float("nan")), print)
    (t,) = study.trials
    assert t.state.name == "FAIL" and "nan" in t.user_attrs["error"] and counted(study) == [t]


@pytest.mark.parametrize("when", ["during training", "after training"])
@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used")
def test_a_trial_failed_as_stale_by_another_process_is_dropped_in_one_line(tmp_path, when):
    """A process paused past twice the heartbeat finds its trial failed by another process: its
    next report or its tell would raise; it drops the trial with one line and goes on."""
    from ensemble.tune import _run_trial, counted, open_storage

    storage = open_storage(f"sqlite:///{tmp_path / 's.db'}")
    study = optuna.create_study(storage=storage, direction="maximize")
    trial = study.ask()

    def train(values, folder, hook):
        storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.FAIL)  # the other process
        if when == "during training":
            trial.report(0.4, 1)
        return 0.5

    said = []
    _run_trial(study, trial, _bare_job(tmp_path, train), said.append)
    assert said == [
        "trial 0: another process marked it failed while it ran (no heartbeat for 120 s: was this process "
        "paused?); its result is dropped, it will be run again"
    ]
    assert study.trials[0].state.name == "FAIL" and counted(study) == []


@pytest.mark.slow
def test_sigkill_leaves_no_trial_running_forever(tmp_path, cache):
    cfg = write_config(tmp_path, cache, epochs=40, tune="heartbeat = 1")
    out = tmp_path / "tune"
    cmd, env = _tune_cmd(cfg, out, "--trials", "1", "--pruner", "none")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = out / "trials" / "0000" / "log.txt"
    deadline = time.time() + 300
    while time.time() < deadline and not (log.is_file() and "flat epoch 1/40" in log.read_text()):
        time.sleep(0.2)
    proc.kill()
    proc.wait(timeout=60)
    assert [t.state.name for t in _study(out, "x").trials] == ["RUNNING"]
    time.sleep(3.5)  # twice the heartbeat, on SQLite's clock of whole seconds
    cmd, env = _tune_cmd(cfg, out, "--trials", "1", "--pruner", "none", "--set", "train.epochs=1")
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "trial 0: its process stopped without a word" in done.stdout + done.stderr
    assert "Warning" not in done.stdout + done.stderr
    assert [t.state.name for t in _study(out, "x").trials] == ["FAIL", "COMPLETE"]


@pytest.mark.parametrize("name", ["tune-demo.toml", "tune-ferplus-cpu.toml"])
def test_shipped_tune_configs_are_valid(name):
    from ensemble.tune import check_space, tune_config

    path = REPO / "configs" / name
    cfg = load_config(path)
    tc = tune_config(cfg.tune)
    params = parse_space(tc.space)
    check_space(params, path, ())
    keys = {p.key for p in params}
    assert {
        "train.optimizer",
        "train.lr",
        "train.momentum",
        "train.weight_decay",
        "balance.cap",
        "balance.weights",
        "model.dropout",
    } <= keys
    momentum = next(p for p in params if p.key == "train.momentum")
    assert momentum.when == (("train.optimizer", ("sgd",)),)


@pytest.mark.slow
def test_stage1_and_experts_trials_build_on_a_trained_run(tmp_path, cache):
    import json

    cfg = write_config(
        tmp_path,
        cache,
        epochs=1,
        space="""
[experts]
min_count = 5
[experts.model]
trunk_from = "flat"
[stage1.model]
trunk_from = "flat"
[tune.space]
train.lr = {log = [1e-3, 1e-2]}
""",
    )
    base = tmp_path / "base"
    main(["fit-flat", "--config", str(cfg), "--out", str(base)])
    with pytest.raises(UserError, match="trained flat stage and --run has none"):
        run_tune(cfg, (), TuneOptions(stage="stage1", trials=1, out=str(tmp_path / "s1")))
    before = _files(base)  # (the fit-* commands hold base's run lock in this process: tune only reads it)
    run_tune(cfg, (), TuneOptions(stage="stage1", trials=1, out=str(tmp_path / "s1"), run=str(base)))
    assert _files(base) == before
    trial = _study(tmp_path / "s1", "tune-stage1").trials[0]
    folder = tmp_path / "s1" / "trials" / "0000"
    assert (folder / "flat").is_symlink() and (folder / "flat").resolve() == (base / "flat").resolve()
    val = json.loads((folder / "stage1" / "metrics.json").read_text())["val"]
    assert trial.value == pytest.approx((val["ccc_valence"] + val["ccc_arousal"]) / 2)
    main(["fit-stage1", "--config", str(cfg), "--out", str(base)])
    before = _files(base)
    run_tune(cfg, (), TuneOptions(stage="experts", trials=1, out=str(tmp_path / "ex"), run=str(base)))
    trial = _study(tmp_path / "ex", "tune-experts").trials[0]
    router = json.loads((tmp_path / "ex" / "trials" / "0000" / "router" / "router.json").read_text())
    assert trial.state.name == "COMPLETE" and trial.value == pytest.approx(router["val"][router["mode"]])
    assert _files(base) == before  # the base is only read: nothing in it added, removed or rewritten
    assert not (tmp_path / "ex" / "trials" / "0000" / ".lock").exists()  # a trial takes no run lock
