"""Where training runs: device, precision and the DDP process group, decided once at the edge.

:func:`runtime` picks them from ``[train]``; :func:`shutdown` ends the process group so a
``torchrun`` job exits cleanly; :class:`StopOnSigterm` makes SIGTERM stop training like Ctrl-C.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import UserError


@dataclass
class Runtime:
    device: torch.device
    amp_dtype: torch.dtype | None  # None = fp32
    channels_last: bool
    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def single_process(self) -> "Runtime":
        """The same device and precision for a single process (prediction, feature caches)."""
        return Runtime(self.device, self.amp_dtype, self.channels_last)


def resolve_device(name, what: str) -> str:
    """``auto`` -> cuda, then mps, then cpu; ``cpu``, ``cuda``, ``cuda:N`` or ``mps`` checked against
    this machine. ``what`` names the setting in the one-line error (``train.device``, ``--device``)."""
    from .config import _device as device_problem

    if not isinstance(name, str) or device_problem(name):
        raise UserError(f"{what} must be auto, cpu, cuda, cuda:N or mps, got {name!r}")
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "mps" if mps else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"{what} = {name!r} but no CUDA device is available to torch {torch.__version__}")
    if name.startswith("cuda:") and int(name[5:]) >= torch.cuda.device_count():
        raise UserError(f"{what} = {name!r} but there are {torch.cuda.device_count()} CUDA device(s)")
    if name == "mps" and not mps:
        raise UserError(f"{what} = 'mps' but this machine has no Apple GPU available to torch")
    return name


def runtime(train_cfg) -> Runtime:
    """Pick device and precision once: cuda, then mps, then cpu; bf16 where it is supported."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    name = resolve_device(train_cfg.device, "train.device")
    if name == "cuda" and world > 1:
        name = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if train_cfg.threads:
        torch.set_num_threads(train_cfg.threads)
    prec = train_cfg.precision
    if prec == "auto":
        if device.type == "cuda":
            prec = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        elif device.type == "cpu" and _cpu_has_fast_bf16():
            prec = "bf16"
        else:
            prec = "fp32"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[prec]  # checked by config._RULES
    if dtype is torch.float16 and device.type == "cpu":
        dtype = torch.bfloat16
    return Runtime(device, dtype, train_cfg.channels_last, rank, world)


def _cpu_has_fast_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def shutdown() -> None:
    """End the DDP process group if this process started one: without it a ``torchrun`` rank
    can abort at exit ("terminate called without an active exception") and fail the job."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


@contextlib.contextmanager
def signals_deferred():
    """SIGINT and SIGTERM noted while the block runs and acted on after it, by the handlers that
    were in place: an interruption lands after a checkpoint is written, not inside ``torch.save``,
    whose zip writer then fails with its own error in place of the clean stop. (Blocking the
    signals would not do: the kernel hands them to torch's worker threads, and Python still runs
    the handler in the main thread.) Outside the main thread, nothing is deferred."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    got: list[int] = []
    old = {s: signal.signal(s, lambda signum, frame: got.append(signum)) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        for s in dict.fromkeys(got):
            handler = old[s]
            if callable(handler):
                handler(s, None)
            elif handler == signal.SIG_DFL:
                os.kill(os.getpid(), s)  # its default action, now


class StopOnSigterm:
    """Turns SIGTERM into KeyboardInterrupt while training, so both stop the same clean way."""

    def __enter__(self):
        self.old = None
        try:
            self.old = signal.signal(signal.SIGTERM, self._raise)
        except ValueError:  # not the main thread
            pass
        return self

    @staticmethod
    def _raise(signum, frame):
        raise KeyboardInterrupt

    def __exit__(self, *exc):
        if self.old is not None:
            signal.signal(signal.SIGTERM, self.old)
