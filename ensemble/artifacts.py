"""Artifacts that describe themselves, written atomically, verified before they are read.

A stage folder (``RUN/stage1``, ``RUN/flat``, ``RUN/experts/<id>``, ``RUN/neighborhoods``)
holds its files and a ``meta.json`` that records what they are (classes in logit order,
input size, mean/std, backbone, …), the library versions, and the sha256 of every other
file. A folder is built under a temporary name and renamed into place, so a half-written
stage never looks finished; loading checks every hash before anything is deserialised,
and weights only ever load with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import subprocess
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import UserError
from .files import swap_into_place, write_json  # noqa: F401  (write_json re-exported)
from .meta_schema import check_meta

if TYPE_CHECKING:
    import torch

META = "meta.json"


def sha256_file(path: Path) -> str:
    """sha256 of a file, read in 1 MB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def versions() -> dict:
    """Library versions recorded beside every artifact (pickles and weights carry what made them)."""
    import numpy
    import sklearn
    import torch
    import torchvision

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "numpy": numpy.__version__,
        "scikit-learn": sklearn.__version__,
    }


def git_commit() -> str | None:
    """This checkout's commit, or None outside a git checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def check_output_dir(run: Path, need_mb: int = 200) -> None:
    """Fail before training, not after an hour: the run folder must be writable with room to spare."""
    try:
        run.mkdir(parents=True, exist_ok=True)
        probe = run / f".write-test-{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"cannot write to {run}: {exc.strerror or exc}") from None
    free = shutil.disk_usage(run).free / 1e6
    if free < need_mb:
        raise UserError(f"only {free:.0f} MB free under {run}; at least {need_mb} MB are needed")


class StageWriter:
    """Collects a stage's files in ``RUN/.<name>.tmp`` and publishes them with one rename."""

    def __init__(self, final: Path):
        self.final = final
        self.tmp = final.with_name(f".{final.name}.tmp{os.getpid()}")
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True)

    def path(self, name: str) -> Path:
        return self.tmp / name

    def save_weights(self, state_dict: dict, name: str = "weights.pt") -> None:
        import torch

        tmp = self.tmp / name
        with open(tmp, "wb") as f:
            torch.save({k: v.detach().cpu() for k, v in state_dict.items()}, f)
            f.flush()
            os.fsync(f.fileno())

    def json(self, name: str, obj) -> None:
        write_json(self.tmp / name, obj)

    def copy(self, src: Path, name: str | None = None) -> None:
        if src.is_file():
            shutil.copyfile(src, self.tmp / (name or src.name))

    def publish(self, meta: dict) -> Path:
        files = {p.name: sha256_file(p) for p in sorted(self.tmp.iterdir()) if p.is_file() and p.name != META}
        meta = {**meta, "versions": versions(), "git_commit": git_commit(), "files": files}
        write_json(self.tmp / META, meta)
        return swap_into_place(self.tmp, self.final)


def read_meta(folder: Path, what: str = "stage", hashes: bool = True) -> dict:
    """meta.json of a stage, after checking every listed file's sha256 (``hashes=False``: only
    that each is there, for a quick look such as ``ensemble models``; loading always hashes)."""
    meta_file = folder / META
    if not meta_file.is_file():
        raise UserError(f"{what} not found: {folder} has no {META} (train it first)")
    try:
        meta = json.loads(meta_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{meta_file} is not valid JSON; the artifact is damaged") from None
    check_meta(meta, meta_file)  # before any listed file is touched
    listed = meta.get("files", {})
    for f in sorted(folder.iterdir()):
        if f.is_file() and f.name != META and not f.name.startswith(".") and f.name not in listed:
            raise UserError(f"{f} is not recorded in {meta_file}: refusing a run with files of unknown origin")
    for name, digest in listed.items():
        f = folder / name
        if not f.is_file():
            raise UserError(f"{f} is missing; the artifact is incomplete")
        if hashes and sha256_file(f) != digest:
            raise UserError(
                f"{f} does not match the sha256 recorded in {meta_file}: refusing to load a "
                f"truncated, swapped or tampered file"
            )
    if hashes:
        _warn_versions(meta, folder)
    return meta


def _warn_versions(meta: dict, folder: Path) -> None:
    from importlib.metadata import PackageNotFoundError, version

    def installed(lib: str) -> str:  # read from the installed metadata: no import of torch or sklearn
        try:
            return version(lib)
        except PackageNotFoundError:
            return ""

    now = {"torch": installed("torch"), "scikit-learn": installed("scikit-learn")}
    run = folder.parent.parent if folder.parent.name == "experts" else folder.parent
    for lib, current in now.items():
        then = meta.get("versions", {}).get(lib)
        if then and current and then.split(".")[0] != current.split(".")[0]:
            # one message per run and library (Python shows an identical warning once), not one per stage
            warnings.warn(f"{run} was written with {lib} {then}; this is {lib} {current}", stacklevel=1)


def load_weights(folder: Path, name: str = "weights.pt") -> dict:
    """A verified state_dict (call :func:`read_meta` first); never executes code."""
    import torch

    try:
        state = torch.load(folder / name, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(f"cannot load {folder / name}: {str(exc).splitlines()[0]}") from None
    if isinstance(state, dict):  # bundled runs store float16; inference on the CPU runs in float32
        for k, v in state.items():  # one tensor at a time: never both whole copies in memory
            if isinstance(v, torch.Tensor) and v.dtype in (torch.float16, torch.bfloat16):
                state[k] = v.float()
    return state


def state_digest(module: torch.nn.Module) -> str:
    """sha256 of a module's tensors: two stages with the same digest share that module."""
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def flat_identity(meta: dict) -> dict:
    """What identifies a trained stage (the flat model, stage 1) across float16 bundling (which
    rewrites its files): its recorded trunk digest and training fingerprint. The router records
    stage 1's, and the flat model's when it mixes it in; the hierarchy refuses others; a
    distilled flat model records its teacher's."""
    return {"trunk_sha256": meta.get("trunk_sha256"), "fingerprint": meta.get("fingerprint")}
