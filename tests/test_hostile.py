"""Issue 15, item 8: defects found by trying to break the tool as a hostile user would.
Every hostile file is built in tmp_path; no real device is ever opened or written."""

import math
import os

import pytest

from ensemble.cli import main
from ensemble.config import load_config
from ensemble.errors import UserError


def _cli(args, capsys):
    with pytest.raises(SystemExit) as exc:
        main(args)
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err


# --------------------------------------------------------------------------- config values


@pytest.mark.parametrize(
    "item",
    [
        "train.lr=nan",
        "train.lr=inf",
        "train.warmup_epochs=inf",
        "train.momentum=nan",
        "train.crop_scale=nan",
        "balance.rotation=nan",
        "train.label_smoothing=nan",
        "train.max_minutes=nan",
        "data.val_fraction=nan",
        "train.max_minutes=-inf",
        "flat.train.lr=nan",
        "balance.class_weights.contempt=nan",
    ],
)
def test_non_finite_numbers_are_refused_by_key(item):
    key = item.split("=")[0]
    with pytest.raises(UserError, match=rf"config key {key.rsplit('.', 1)[0] if 'class_weights' in key else key}"):
        load_config(None, [item])


@pytest.mark.parametrize(
    "item", ["train.threads=99999999999", "train.warmup_epochs=1e9", "data.num_workers=100000", "data.num_workers=-3"]
)
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


# --------------------------------------------------------------------------- paths the user names


def _fifo(path):
    os.mkfifo(path)
    return path


def test_write_user_file_refuses_a_fifo_a_folder_and_a_link_to_a_device(tmp_path):
    from ensemble.paths import write_user_file

    fifo = _fifo(tmp_path / "pipe")
    folder = tmp_path / "folder"
    folder.mkdir()
    link = tmp_path / "zero"
    link.symlink_to("/dev/zero")  # only stat()ed, never opened
    calls = []
    for target, kind in ((fifo, "a FIFO"), (folder, "a folder"), (link, "a device")):
        with pytest.raises(UserError, match=f"refusing to write the export to .*{kind}"):
            write_user_file(target, calls.append, "export")
    assert calls == [] and (tmp_path / "pipe").is_fifo() and folder.is_dir() and link.is_symlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder", "pipe", "zero"]  # no temporary left


def test_write_user_file_needs_an_existing_folder_and_replaces_a_regular_file(tmp_path):
    from ensemble.paths import write_user_file

    with pytest.raises(UserError, match="folder .*nonexistent.* does not exist"):
        write_user_file(tmp_path / "nonexistent" / "dir" / "x.pt", lambda p: p.write_bytes(b"x"))
    assert not (tmp_path / "nonexistent").exists()
    target = tmp_path / "model.onnx"
    target.write_bytes(b"old")
    write_user_file(target, lambda p: p.write_bytes(b"new"))
    assert target.read_bytes() == b"new" and [p.name for p in tmp_path.iterdir()] == ["model.onnx"]


@pytest.mark.parametrize("kind", ["fifo", "folder", "missing-parent"])
def test_export_refuses_a_bad_out_before_loading_anything(kind, tmp_path, capsys):
    out = {
        "fifo": lambda: _fifo(tmp_path / "p"),
        "folder": lambda: tmp_path,
        "missing-parent": lambda: tmp_path / "no" / "such" / "x.pt",
    }[kind]()
    code, _, err = _cli(["export", "--run", str(tmp_path / "norun"), "--out", str(out)], capsys)
    assert code == 2 and "Traceback" not in err
    if kind == "folder":  # click's dir_okay=False says it first
        assert "is a directory" in err
    else:
        assert err.startswith("error: ") and len(err.strip().splitlines()) == 1
        assert ("refusing" in err and "FIFO" in err) if kind == "fifo" else ("does not exist" in err)
    assert not (tmp_path / "no").exists()


def _tiny_folder_data(root, n=3, size=(20, 20)):
    from conftest import write_image

    for c in ("happy", "sad"):
        for i in range(n):
            write_image(root / c / f"{c}{i}.png", size=size, seed=i)
    return root


@pytest.mark.parametrize("where", ["file", "under-a-file"])
@pytest.mark.parametrize("command", ["prepare", "fit-flat"])
def test_a_cache_dir_that_cannot_be_a_folder_is_one_line(where, command, tmp_path, capsys):
    data = _tiny_folder_data(tmp_path / "faces")
    blocker = tmp_path / "blocker"
    blocker.write_text("a file")
    cache = blocker if where == "file" else blocker / "cache"
    args = [
        command,
        "--set",
        "data.format=folder",
        "--set",
        f"data.root={str(data)!r}",
        "--set",
        f"data.cache_dir={str(cache)!r}",
        "--set",
        "data.image_size=16",
        "--set",
        "model.backbone=tinyvgg",
    ]
    if command == "fit-flat":
        args += ["--out", str(tmp_path / "run")]
    code, _, err = _cli(args, capsys)
    assert code == 2 and "data.cache_dir" in err and "Traceback" not in err
    assert blocker.read_text() == "a file"


def test_synthetic_data_with_a_file_as_cache_dir_is_one_line(tmp_path, capsys):
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    code, _, err = _cli(["prepare", "--set", f"data.cache_dir={str(blocker / 'c')!r}"], capsys)
    assert code == 2 and "data.cache_dir" in err


# --------------------------------------------------------------------------- resume, compare


@pytest.mark.parametrize("payload", ["truncated", "pickled", "not-a-dict"])
def test_resume_from_a_damaged_checkpoint_is_one_line(payload, tmp_path, capsys, one_thread):
    import pickle

    import torch

    data = _tiny_folder_data(tmp_path / "faces")
    run = tmp_path / "run"
    work = run / ".flat.work"
    work.mkdir(parents=True)
    ck = work / "checkpoint.pt"
    marker = tmp_path / "payload-ran"
    if payload == "truncated":
        torch.save({"model": {"w": torch.zeros(100)}}, ck)
        ck.write_bytes(ck.read_bytes()[:60])
    elif payload == "pickled":

        class Evil:
            def __reduce__(self):
                return (open, (str(marker), "w"))

        ck.write_bytes(pickle.dumps(Evil()))
    else:
        torch.save([1, 2, 3], ck)
    code, _, err = _cli(
        [
            "fit-flat",
            "--resume",
            "--out",
            str(run),
            "--set",
            "data.format=folder",
            "--set",
            f"data.root={str(data)!r}",
            "--set",
            f"data.cache_dir={str(tmp_path / 'c')!r}",
            "--set",
            "data.image_size=16",
            "--set",
            "model.backbone=tinyvgg",
            "--set",
            "train.device=cpu",
        ],
        capsys,
    )
    assert code == 2 and "cannot resume from" in err and str(ck) in err and "without --resume" in err
    assert len(err.strip().splitlines()) == 1 and not marker.exists()


def test_compare_with_neither_val_nor_test_is_one_line(tmp_path, capsys):
    from ensemble.artifacts import write_json

    data = _tiny_folder_data(tmp_path / "faces")
    run = tmp_path / "run"
    (run / "flat").mkdir(parents=True)
    write_json(run / "flat" / "meta.json", {"stage": "flat", "input_size": 16, "files": {}})
    code, _, err = _cli(
        [
            "compare",
            "--run",
            str(run),
            "--set",
            "data.format=folder",
            "--set",
            f"data.root={str(data)!r}",
            "--set",
            "data.val_fraction=0",
            "--set",
            "data.image_size=16",
            "--set",
            f"data.cache_dir={str(tmp_path / 'c')!r}",
        ],
        capsys,
    )
    assert code == 2 and "neither a test nor a val split" in err
