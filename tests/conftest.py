"""Shared fixtures: small images on disk, fixture data-set trees, a tiny synthetic config."""

import matplotlib

matplotlib.use("Agg")

import io  # noqa: E402
import struct  # noqa: E402
import zlib  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from ensemble.config import load_config  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED_FERPLUS = REPO.parent / "shared" / "data" / "ferplus"


def write_image(path, size=(16, 16), color=None, mode="RGB", seed=0, fmt=None, **save_kw) -> Path:
    """Write a small image (random RGB unless ``color`` is given); creates parent folders.

    ``size`` is (width, height); ``fmt`` defaults to the suffix (.jpg -> JPEG, .png -> PNG).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if color is not None:
        im = Image.new(mode, size, color)
    else:
        rng = np.random.default_rng(seed)
        arr = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
        im = Image.fromarray(arr, "RGB")
        if mode != "RGB":
            im = im.convert(mode)
    im.save(path, format=fmt, **save_kw)
    return path


def write_broken_files(folder) -> dict[str, Path]:
    """A 0-byte .jpg, a text file named .jpg and a truncated PNG in ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    empty = folder / "empty.jpg"
    empty.write_bytes(b"")
    text = folder / "text.jpg"
    text.write_text("this is not a JPEG, just some text\n")
    good = write_image(folder / "_full.png", size=(64, 64), seed=7)
    data = good.read_bytes()
    good.unlink()
    truncated = folder / "truncated.png"
    truncated.write_bytes(data[: len(data) // 2])
    return {"empty": empty, "text": text, "truncated": truncated}


def png_with_declared_size(path, width: int, height: int) -> Path:
    """A tiny PNG whose header claims ``width`` x ``height`` pixels (a decompression bomb's
    header, without spending memory or seconds on the pixels)."""
    buf = io.BytesIO()
    Image.new("1", (1, 1)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bytes(data))
    return path


@pytest.fixture
def image_writer(tmp_path):
    """``image_writer("a/b.png", size=(16, 16), color=None, ...)`` writes under tmp_path."""

    def _write(rel, **kw):
        return write_image(tmp_path / rel, **kw)

    return _write


@pytest.fixture
def folder_tree(tmp_path):
    """root/<class>/ layout: 3 happy (folder 'happiness'), 2 anger ('angry'), 1 surprise
    ('surprised'), a notes.txt, and an unknown class folder 'bored' with one image."""
    root = tmp_path / "faces"
    for i in range(3):
        write_image(root / "happiness" / f"h{i}.png", seed=i)
    for i in range(2):
        write_image(root / "angry" / f"a{i}.jpg", seed=10 + i)
    write_image(root / "surprised" / "s0.png", seed=20)
    (root / "happiness" / "notes.txt").write_text("not an image")
    write_image(root / "bored" / "b0.png", seed=30)
    return root


@pytest.fixture
def synthetic_cfg(tmp_path):
    """A CPU-sized synthetic-data config: 240 faces at 32 px, tinyvgg, one epoch."""
    return load_config(
        None,
        [
            "data.format=synthetic",
            "data.n_synthetic=240",
            "data.synthetic_size=32",
            "data.image_size=32",
            f"data.cache_dir={str(tmp_path / 'cache')!r}",
            "model.backbone=tinyvgg",
            "train.epochs=1",
            "train.batch_size=32",
            "train.device=cpu",
        ],
    )


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module's tiny fits: on a small, busy machine two spinning
    threads make them many times slower. Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


#: A tiny synthetic run: 240 faces at 32 px, tinyvgg, one epoch, CPU, fp32 (add data.cache_dir).
TINY_SYNTHETIC = [
    "data.format=synthetic",
    "data.n_synthetic=240",
    "data.synthetic_size=32",
    "data.image_size=32",
    "model.backbone=tinyvgg",
    "model.hidden=32",
    "train.epochs=1",
    "train.batch_size=32",
    "train.device=cpu",
    "train.precision=fp32",
]
#: ... and its hierarchy: three neighborhoods, stage 1 and the experts heads on the flat trunk.
TINY_HIERARCHY = [
    *TINY_SYNTHETIC,
    "experts.min_count=5",
    "neighborhoods.k=3",
    "stage1.model.trunk_from=flat",
    "experts.model.trunk_from=flat",
]


def train_tiny_hierarchy(root, extra=(), log=None):
    """Train a tiny hierarchy (flat, stage 1, neighborhoods, experts, router, calibration) into
    ``root/run`` on one thread; returns (experiment, fit_experts_and_router's result)."""
    from ensemble.experiment import open_experiment
    from ensemble.routing import fit_experts_and_router
    from stages.flat import fit_flat
    from stages.stage1 import fit_stage1

    log = log or (lambda m: None)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = load_config(None, [*TINY_HIERARCHY, f"data.cache_dir={root / 'cache'}", *extra])
        exp = open_experiment(cfg, root / "run", log=log, progress=False)
        fit_flat(exp, log=log)
        fit_stage1(exp, log=log)
        return exp, fit_experts_and_router(exp, False, log)
    finally:
        torch.set_num_threads(before)


def run_cli(argv, capsys) -> tuple[int, str, str]:
    """Run ``ensemble ARGV`` in-process; (exit code, stdout, stderr). Restores what main() changes."""
    import warnings

    import torch

    from ensemble.cli import main

    show, threads = warnings.showwarning, torch.get_num_threads()
    code = 0
    try:
        main(argv)
    except SystemExit as exc:
        code = exc.code
    finally:
        warnings.showwarning = show
        torch.set_num_threads(threads)
    out, err = capsys.readouterr()
    return code, out, err
