"""Configuration: defaults, TOML files listing only differences, --set overrides, errors."""

import json
from pathlib import Path

import pytest

from ensemble.config import Config, config_from_dict, load_config
from ensemble.errors import UserError

REPO = Path(__file__).resolve().parents[1]


def test_defaults():
    cfg = load_config()
    assert isinstance(cfg, Config)
    assert cfg.data.format == "synthetic"
    assert cfg.data.image_size == 48
    assert cfg.data.val_fraction == 0.1
    assert cfg.data.strict is False
    assert cfg.data.prototypes == {}
    assert cfg.model.backbone == "vgg16"
    assert cfg.model.trunk_from == ""
    assert cfg.train.epochs == 10
    assert cfg.train.batch_size == 64
    assert cfg.train.lr == 1e-3
    assert cfg.train.device == "auto"
    assert cfg.balance.mode == "none"
    assert cfg.balance.cap == 20000
    assert cfg.neighborhoods.method == "kmeans"
    assert cfg.experts.train_on == "true_va"
    assert cfg.experts.model == {} and cfg.stage1.train == {} and cfg.flat.balance == {}
    assert cfg.router.mode == "auto"
    # two loads do not share mutable state
    other = load_config()
    other.data.prototypes["happy"] = [1, 1]
    assert load_config().data.prototypes == {}


def test_toml_file_lists_only_differences(tmp_path):
    p = tmp_path / "exp.toml"
    p.write_text('[train]\nepochs = 3\nlr = 2\n\n[model]\nhidden = 64\nbackbone = "resnet18"\n')
    cfg = load_config(p)
    assert cfg.train.epochs == 3
    assert cfg.train.lr == 2.0 and isinstance(cfg.train.lr, float)  # int accepted for a float key
    assert cfg.model.hidden == 64
    assert cfg.model.backbone == "resnet18"
    # everything not listed keeps its default
    assert cfg.train.batch_size == 64
    assert cfg.model.head == "slim"
    assert cfg.data.format == "synthetic"


def test_set_overrides_each_type(tmp_path):
    p = tmp_path / "exp.toml"
    p.write_text("[train]\nepochs = 3\n")
    cfg = load_config(
        p,
        [
            "train.epochs=5",  # --set wins over the file
            "train.lr=0.01",
            "train.augment=false",
            "model.backbone=resnet18",  # a bare word is a string
            'data.root="my faces/set 1"',  # a quoted TOML string
            "experts.model.trunk_from=flat",  # nested override table
            "data.prototypes={happy = [0.9, 0.4]}",
        ],
    )
    assert cfg.train.epochs == 5 and type(cfg.train.epochs) is int
    assert cfg.train.lr == 0.01
    assert cfg.train.augment is False
    assert cfg.model.backbone == "resnet18"
    assert cfg.data.root == "my faces/set 1"
    assert cfg.experts.model == {"trunk_from": "flat"}
    assert cfg.model.trunk_from == ""  # the shared section is untouched
    assert cfg.data.prototypes == {"happy": [0.9, 0.4]}


@pytest.mark.parametrize(
    "item, key",
    [
        ("nosuch.key=1", "nosuch"),
        ("data.formt=folder", "data.formt"),
        ("train.epoch=1", "train.epoch"),
        ("experts.model.trunkfrom=flat", "experts.model.trunkfrom"),
        ("stage1.train.lrr=0.1", "stage1.train.lrr"),
    ],
)
def test_unknown_key_names_it(item, key):
    with pytest.raises(UserError, match=key.replace(".", r"\.")):
        load_config(None, [item])


def test_unknown_key_in_file_names_it(tmp_path):
    p = tmp_path / "exp.toml"
    p.write_text("[train]\nepochs = 2\nlearning_rate = 0.1\n")
    with pytest.raises(UserError, match=r"train\.learning_rate"):
        load_config(p)
    p.write_text("[trainer]\nepochs = 2\n")
    with pytest.raises(UserError, match="trainer"):
        load_config(p)


@pytest.mark.parametrize(
    "item, key",
    [
        ('train.epochs="ten"', "train.epochs"),
        ("train.epochs=1.5", "train.epochs"),
        ("train.epochs=true", "train.epochs"),  # a bool is not an int
        ("train.augment=1", "train.augment"),  # an int is not a bool
        ("train.lr=true", "train.lr"),
        ("data.prototypes=3", "data.prototypes"),
        ('experts.train.epochs="x"', "experts.train.epochs"),
        ("experts.model=3", "experts.model"),
    ],
)
def test_wrong_type_names_key(item, key):
    with pytest.raises(UserError, match=key.replace(".", r"\.")):
        load_config(None, [item])


def test_set_keeps_text_for_text_keys():
    # a value that reads as a TOML number stays text where the key expects text
    cfg = load_config(None, ["data.root=2024", "model.pretrained=3"])
    assert cfg.data.root == "2024"
    assert cfg.model.pretrained == "3"  # (model.backbone now has a rule: a real model name)


def test_file_value_of_wrong_type_names_key(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text("[model]\nbackbone = 3\n")
    with pytest.raises(UserError, match=r"model\.backbone"):
        load_config(f)


def test_section_must_be_table():
    with pytest.raises(UserError, match=r"\[train\]"):
        config_from_dict({"train": 3})


def test_malformed_toml(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_text("[train\nepochs = = 3\n")
    with pytest.raises(UserError, match="not valid TOML"):
        load_config(p)


def test_non_utf8_toml(tmp_path):
    p = tmp_path / "latin1.toml"
    p.write_bytes('[data]\nroot = "caf\xe9"\n'.encode("latin-1"))
    with pytest.raises(UserError, match="not valid TOML"):
        load_config(p)


def test_missing_config_file(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_config(tmp_path / "nope.toml")


@pytest.mark.parametrize("item", ["train.epochs", "epochs=3", "=3"])
def test_malformed_set(item):
    with pytest.raises(UserError, match="--set"):
        load_config(None, [item])


def test_set_into_a_value_is_an_error():
    with pytest.raises(UserError, match="not a section"):
        load_config(None, ["data.root=x", "data.root.deeper=1"])


def test_for_stage_applies_overrides():
    cfg = load_config(
        None,
        [
            "train.epochs=4",
            "train.batch_size=16",
            "model.hidden=32",
            "experts.train.epochs=7",
            "experts.train.lr=1",
            "experts.model.trunk_from=flat",
            "experts.balance.mode=up",
            "stage1.train.loss=mse+ccc",
        ],
    )
    ex = cfg.for_stage("experts")
    assert ex.train.epochs == 7
    assert ex.train.lr == 1.0 and isinstance(ex.train.lr, float)
    assert ex.train.batch_size == 16  # shared value kept where not overridden
    assert ex.model.trunk_from == "flat"
    assert ex.model.hidden == 32
    assert ex.balance.mode == "up"
    # the shared sections of the original are not modified
    assert cfg.train.epochs == 4 and cfg.train.lr == 1e-3
    assert cfg.model.trunk_from == "" and cfg.balance.mode == "none"

    s1 = cfg.for_stage("stage1")
    assert s1.train.loss == "mse+ccc" and s1.train.epochs == 4 and s1.model.trunk_from == ""
    assert cfg.train.loss == "mse"

    flat = cfg.for_stage("flat")  # no overrides: the shared sections
    assert flat.train == cfg.train and flat.model == cfg.model and flat.balance == cfg.balance
    assert cfg.for_stage("router").train == cfg.train


def test_for_stage_wrong_type_in_override_from_dict():
    # config_from_dict validates override tables too (a run's config.json goes through it)
    with pytest.raises(UserError, match=r"flat\.train\.epochs"):
        config_from_dict({"flat": {"train": {"epochs": "many"}}})


def test_to_dict_round_trip():
    cfg = load_config(None, ["train.epochs=2", "experts.model.trunk_from=flat", "data.format=folder"])
    again = config_from_dict(cfg.to_dict())
    assert again == cfg


CONFIG_FILES = sorted((REPO / "configs").glob("*.toml"))


def test_repo_has_configs():
    names = {p.name for p in CONFIG_FILES}
    assert {"demo.toml", "ferplus-cpu.toml"} <= names


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.name)
def test_repo_configs_load(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    for stage in ("stage1", "flat", "experts"):
        cfg.for_stage(stage)  # override tables are valid


def test_ferplus_cpu_config_values():
    cfg = load_config(REPO / "configs" / "ferplus-cpu.toml")
    assert cfg.data.format == "ferplus"
    assert cfg.model.backbone == "vgg16_bn"
    assert cfg.for_stage("experts").model.trunk_from == "flat"
    assert cfg.for_stage("stage1").train.loss == "mse+ccc"
    assert cfg.for_stage("experts").train.max_minutes == 0.0


def test_demo_toml_matches_package_copy():
    from ensemble.demo import DEMO_TOML

    assert (REPO / "configs" / "demo.toml").read_text(encoding="utf-8") == DEMO_TOML
    cfg = load_config(REPO / "configs" / "demo.toml")
    assert cfg.model.backbone == "tinyvgg"
    assert cfg.for_stage("experts").train.epochs == 10


@pytest.mark.parametrize(
    "item, key, says",
    [
        ("train.device=tpu", "train.device", "cuda:N"),
        ("data.image_size=0", "data.image_size", ">= 8"),
        ("train.batch_size=0", "train.batch_size", ">= 1"),
        ("train.lr=-1", "train.lr", "> 0"),
        ("train.epochs=0", "train.epochs", ">= 1"),
        ("model.dropout=2.0", "model.dropout", "< 1"),
        ("train.schedule=linear", "train.schedule", "'cosine'"),
        ("data.cache=bogus", "data.cache", "'disk'"),
        ("data.max_samples=-5", "data.max_samples", ">= 0"),
        ("balance.cap=0", "balance.cap", ">= 1"),
        ("router.mode=oracle", "router.mode", "'soft'"),
        ("experts.train_on=all", "experts.train_on", "'routed'"),
        ("neighborhoods.method=dbscan", "neighborhoods.method", "'gmm'"),
        ("experts.train.lr=0", "experts.train.lr", "> 0"),
        ("balance.class_weights={contemp=3.0}", "balance.class_weights", "unknown class 'contemp'"),
        ("balance.class_weights.contempt=-1", "balance.class_weights", ">= 0"),
        ("balance.class_weights.contempt=3", "balance.class_weights", 'weights = "explicit" only'),
        ("data.prototypes.contempt=[-0.5]", "data.prototypes", "[valence, arousal]"),
        ("model.trainable=block0", "model.trainable", "blockN"),
        ("model.trainable=trunk", "model.trainable", "head, all or blockN"),
        ("model.backbone=no_such_net_42", "model.backbone", "torchvision"),
        ("train.optimizer=lion", "train.optimizer", "'sgd'"),
        ("train.loss=l1", "train.loss", "'mse+ccc'"),
        ("flat.model.trainable=blocks", "flat.model.trainable", "blockN"),
    ],
)
def test_bad_values_are_refused_naming_the_key(item, key, says):
    with pytest.raises(UserError) as exc:
        load_config(None, [item])
    msg = str(exc.value)
    assert f"config key {key}" in msg and says in msg, msg


def test_set_into_a_table_by_dotted_key():
    cfg = load_config(
        None,
        [
            "balance.weights=explicit",
            "balance.class_weights.contempt=8",
            "balance.class_weights.angry=2.5",
            "data.prototypes.contempt=[-0.5, 0.3]",
        ],
    )
    assert cfg.balance.class_weights == {"contempt": 8, "angry": 2.5}
    assert cfg.data.prototypes == {"contempt": [-0.5, 0.3]}
    json.dumps(cfg.to_dict())  # the resolved config is written next to every output


def test_command_line_wins_over_the_files_stage_tables(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text("[train]\nepochs = 5\n[stage1.train]\nepochs = 30\nlr = 0.01\n[experts.train]\nepochs = 20\n")
    cfg = load_config(f, ["train.epochs=1"])
    assert [cfg.for_stage(s).train.epochs for s in ("flat", "stage1", "experts")] == [1, 1, 1]
    assert cfg.for_stage("stage1").train.lr == 0.01  # keys the command line did not name stay
    cfg = load_config(f, ["train.epochs=1", "stage1.train.epochs=3"])
    assert [cfg.for_stage(s).train.epochs for s in ("flat", "stage1", "experts")] == [1, 3, 1]
    assert load_config(f).for_stage("stage1").train.epochs == 30


def test_choices_are_literal_types_and_each_is_one_rule():
    import typing

    from ensemble.config import _RULES, BalanceConfig, TrainConfig

    hint = typing.get_type_hints(BalanceConfig)["mode"]
    assert typing.get_origin(hint) is typing.Literal
    assert _RULES[BalanceConfig]["mode"]("transform") is None and _RULES[BalanceConfig]["mode"]("sideways")
    assert _RULES[TrainConfig]["precision"]("fp8")


def test_good_backbones_and_trainable_values_pass():
    cfg = load_config(None, ["model.backbone=resnet18", "model.trainable=block3", "stage1.model.trainable=head"])
    assert cfg.model.backbone == "resnet18" and cfg.model.trainable == "block3"


def test_old_train_on_value_is_an_alias_with_a_deprecation_line():
    with pytest.warns(UserWarning, match="experts.train_on = 'true' is deprecated; write 'true_va'"):
        cfg = load_config(None, ["experts.train_on=true"])
    assert cfg.experts.train_on == "true_va"
