"""Issue 15, item 8: defects found by trying to break the tool as a hostile user would.
Every hostile file is built in tmp_path; no real device is ever opened or written."""

import math
import os

import numpy as np
import pytest
from PIL import Image

from ensemble.cli import main
from ensemble.config import load_config
from ensemble.errors import UserError


def _cli(args, capsys):
    with pytest.raises(SystemExit) as exc:
        main(args)
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err


# --------------------------------------------------------------------------- config values

@pytest.mark.parametrize("item", [
    "train.lr=nan", "train.lr=inf", "train.warmup_epochs=inf", "train.momentum=nan", "train.crop_scale=nan",
    "balance.rotation=nan", "train.label_smoothing=nan", "train.max_minutes=nan", "data.val_fraction=nan",
    "train.max_minutes=-inf", "flat.train.lr=nan", "balance.class_weights.contempt=nan",
])
def test_non_finite_numbers_are_refused_by_key(item):
    key = item.split("=")[0]
    with pytest.raises(UserError, match=rf"config key {key.rsplit('.', 1)[0] if 'class_weights' in key else key}"):
        load_config(None, [item])


@pytest.mark.parametrize("item", ["train.threads=99999999999", "train.warmup_epochs=1e9", "data.num_workers=100000",
                                  "data.num_workers=-3"])
def test_out_of_range_numbers_are_refused_by_key(item):
    with pytest.raises(UserError, match=rf"config key {item.split('=')[0]} = .* must be"):
        load_config(None, [item])


def test_a_set_below_a_value_shows_what_was_typed():
    with pytest.raises(UserError) as exc:
        load_config(None, ["data.image_size.x=1"])
    assert "object at 0x" not in str(exc.value) and "data.image_size" in str(exc.value)
    assert "{'x': 1}" in str(exc.value)


def test_finite_values_still_load():
    cfg = load_config(None, ["train.lr=0.01", "train.warmup_epochs=0.5", "train.threads=2", "data.num_workers=4"])
    assert math.isclose(cfg.train.lr, 0.01) and cfg.train.threads == 2


@pytest.mark.parametrize("workers", ["100000", "-3"])
def test_prepare_workers_out_of_range_is_a_usage_error(workers, capsys):
    code, _, err = _cli(["prepare", "--workers", workers], capsys)
    assert code == 2 and "--workers" in err and "Traceback" not in err
