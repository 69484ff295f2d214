"""The honest protocol: choices are made on the selection split ``val`` held out of the training
data; FER2013Valid (``valid``) and FER2013Test (``test``) are test splits nothing is tuned on."""

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_SYNTHETIC, run_cli, write_image

from ensemble.classes import CLASS_INDEX
from ensemble.config import load_config
from ensemble.data import load_dataset

pytestmark = pytest.mark.usefixtures("one_thread")

# vote order in label.csv: neutral, happiness, surprise, sadness, anger, disgust, fear, contempt, unknown, NF
NEUTRAL, HAPPY = "8,2,0,0,0,0,0,0,0,0", "1,9,0,0,0,0,0,0,0,0"


def build_ferplus(root: Path, n_train=10) -> Path:
    """FER2013Train: n_train neutral + n_train happy; FER2013Valid and FER2013Test: 2 each."""
    folders = {"FER2013Train": n_train, "FER2013Valid": 1, "FER2013Test": 1}
    for folder, n in folders.items():
        lines = []
        for i in range(2 * n):
            name = f"fer{folder[7:11]}{i:05d}.png"
            write_image(root / folder / name, size=(48, 48), mode="L", seed=i)
            lines.append(f'{name},"(0, 0, 48, 48)",{NEUTRAL if i % 2 else HAPPY}')
        (root / folder / "label.csv").write_text("\n".join(lines) + "\n")
    return root


def _ferplus_cfg(root, *extra):
    return load_config(None, ["data.format=ferplus", f"data.root={json.dumps(str(root))}", *extra])


def test_ferplus_selection_split_is_held_out_of_train_and_valid_is_a_test_split(tmp_path):
    root = build_ferplus(tmp_path / "ferplus")
    df = load_dataset(_ferplus_cfg(root, "data.val_fraction=0.2").data, seed=0).manifest
    folder = df["path"].map(lambda p: Path(p).parent.name)
    assert (folder[df["split"] == "valid"] == "FER2013Valid").all() and (df["split"] == "valid").sum() == 2
    assert (folder[df["split"] == "test"] == "FER2013Test").all() and (df["split"] == "test").sum() == 2
    val = df[df["split"] == "val"]
    assert (folder[val.index] == "FER2013Train").all()  # the selection split comes out of train
    # stratified: 20% of each class's 10 training faces
    assert val["label"].value_counts().to_dict() == {CLASS_INDEX["neutral"]: 2, CLASS_INDEX["happy"]: 2}
    assert (df["split"] == "train").sum() == 16
    # seeded: the same seed holds out the same faces, another seed other faces
    again = load_dataset(_ferplus_cfg(root, "data.val_fraction=0.2").data, seed=0).manifest
    other = load_dataset(_ferplus_cfg(root, "data.val_fraction=0.2").data, seed=5).manifest
    assert set(again.loc[again["split"] == "val", "path"]) == set(val["path"])
    assert set(other.loc[other["split"] == "val", "path"]) != set(val["path"])


def test_the_ferplus_config_follows_the_protocol():
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "ferplus-cpu.toml")
    assert cfg.data.format == "ferplus" and cfg.data.val_fraction > 0
    assert cfg.router.alpha == -1 and cfg.router.logit_adjust == "auto"  # chosen on the selection split


TINY = [*TINY_SYNTHETIC, "experts.min_count=5"]


_cli = run_cli  # (exit code, stdout, stderr) of ensemble ARGV, in-process


@pytest.mark.slow
def test_the_missions_order_trains_the_flat_trunk_first_and_says_so(tmp_path, capsys):
    """fit-stage1, then fit-experts, then predict, on a fresh run whose stages build on the flat trunk."""
    cfg = tmp_path / "mission.toml"
    cfg.write_text(
        '[experts]\ntrain_on = "true_va"\n\n[experts.model]\ntrunk_from = "flat"\n\n[stage1.model]\ntrunk_from = "flat"\n'
    )
    run = tmp_path / "run"
    sets = [a for s in [*TINY, f"data.cache_dir={json.dumps(str(tmp_path / 'cache'))}"] for a in ("--set", s)]
    code, out, err = _cli(["fit-stage1", "--config", str(cfg), "--out", str(run), *sets], capsys)
    assert code == 0, err
    said = [line for line in (out + err).splitlines() if "training the flat model first" in line]
    assert len(said) == 1 and 'trunk_from = "flat"' in said[0]
    assert (run / "flat" / "meta.json").is_file() and (run / "stage1" / "meta.json").is_file()
    assert (run / "calibration" / "meta.json").is_file()  # the flat model calibrated, as fit-flat does
    code, out, err = _cli(["fit-experts", "--config", str(cfg), "--out", str(run), *sets], capsys)
    assert code == 0, err
    assert "training the flat model first" not in out + err  # it is there now
    face = write_image(tmp_path / "face.png", size=(32, 32), seed=3)
    code, out, err = _cli(["predict", str(face), "--run", str(run), "--no-detect", "--json"], capsys)
    assert code == 0, err
    rec = json.loads(out.strip().splitlines()[-1])
    assert rec["emotion"] in CLASS_INDEX and "neighborhood" in rec


def _selections(run: Path, cache: Path, poison: bool) -> dict:
    """A tiny pipeline with test splits ``valid`` and ``test``; with ``poison`` their labels and
    valence/arousal are scrambled. Returns every choice the run made, and its test figures."""
    from ensemble.experiment import open_experiment
    from ensemble.reports import compare
    from ensemble.routing import fit_experts_and_router
    from stages.flat import fit_flat
    from stages.stage1 import fit_stage1

    cfg = load_config(
        None,
        [
            *TINY,
            "data.n_synthetic=600",
            "train.epochs=4",
            "train.lr=0.003",
            "train.optimizer=adamw",
            f"data.cache_dir={json.dumps(str(cache))}",
            'experts.model.trunk_from="flat"',
            'stage1.model.trunk_from="flat"',
            'router.inputs="auto"',
            "neighborhoods.route_share=0.2",
        ],
    )
    exp = open_experiment(cfg, run, log=lambda m: None, progress=False)
    m = exp.manifest
    te = np.flatnonzero(m["split"].to_numpy() == "test")
    m.loc[te[::2], "split"] = "valid"
    if poison:
        rng = np.random.default_rng(7)
        m.loc[te, "label"] = rng.integers(0, 8, len(te))
        m.loc[te, ["valence", "arousal"]] = rng.uniform(-1, 1, (len(te), 2))
    quiet = {"log": lambda m: None}
    fit_flat(exp, **quiet)
    fit_stage1(exp, **quiet)
    fit_experts_and_router(exp, **quiet)
    report = compare(exp, "valid", **quiet)

    def read(*parts):
        return json.loads(run.joinpath(*parts).read_text())

    index = read("experts", "index.json")
    return {
        "choices": {
            "best epochs": [read(s, "meta.json")["best_epoch"] for s in ("flat", "stage1")]
            + [read("experts", str(e["region"]), "meta.json").get("best_epoch") for e in index["experts"]],
            "neighborhoods": read("neighborhoods", "neighborhoods.json"),
            "membership": index,
            "router": read("router", "router.json"),  # inputs, mode, temperature, alpha, tau, flat tau, scores
            "flat on val": read("flat", "metrics.json")["val"],
        },
        "test": (read("flat", "metrics.json")["test"], report["models"]),
    }


@pytest.mark.slow
def test_no_choice_reads_a_test_split(tmp_path):
    """Scrambling the test splits' labels and valence/arousal changes the test figures and no choice."""
    # one cache each: a run that finds features cached draws its random numbers in another order
    clean = _selections(tmp_path / "clean", tmp_path / "cache-clean", poison=False)
    poisoned = _selections(tmp_path / "poisoned", tmp_path / "cache-poisoned", poison=True)
    assert clean["test"] != poisoned["test"]
    for what in clean["choices"]:
        assert clean["choices"][what] == poisoned["choices"][what], what
