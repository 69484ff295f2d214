"""The hierarchy on ONNX Runtime, without torch: ``RUN/onnx``.

``RUN/onnx/hierarchy.onnx`` is the run's whole hierarchy (stage 1, router, experts, the flat
model's share and logit adjustment where the run chose them) exported from the torch module
itself by :func:`ensemble.export.write_onnx_stage`, so the two cannot drift. It holds the graph
and the small constants only: each weight is named ``<stage>/weights.pt::<key>`` and read at
load from the run's own (sha256-checked) weights files by :mod:`ensemble.statefile`, so a
bundled model carries its weights once. ``meta.json`` records the sha256 of every stage
description the graph was made from: a stage refit since then is refused, not mixed in.
``hierarchy-int8.onnx``, where the stage has one, is the same hierarchy with its trunk's
convolutions in 8-bit integers (:mod:`ensemble.quantize`), for ``precision="int8"``.

Why: importing torch holds about 480 MB with its CUDA build (the build ``pip install torch``
gives on Linux) before any network is read; ONNX Runtime answers the same photo in about a third
of that. Outputs match the torch path to float precision (tests/test_onnx_runtime.py).
"""

from __future__ import annotations

import importlib.util
import json
import warnings
from pathlib import Path, PurePosixPath

import numpy as np

from .artifacts import read_meta, sha256_file
from .classes import CLASSES
from .errors import UserError

STAGE = "onnx"
GRAPH = "hierarchy.onnx"
GRAPH_INT8 = "hierarchy-int8.onnx"  # the trunk in 8-bit integers (ensemble.quantize)
SEP = "::"
INPUT = "faces"
OUTPUTS = ("probabilities", "valence_arousal", "region_weights")
BACKENDS = ("auto", "torch", "onnx")


def has_stage(run) -> bool:
    return (Path(run) / STAGE / "meta.json").is_file()


def runtime_installed() -> bool:
    return importlib.util.find_spec("onnxruntime") is not None


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise UserError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    return backend


def choose_backend(backend: str, run, *, flat: bool, router: str | None, device: str, precision: str) -> str:
    """``auto``: ONNX Runtime where the run has an up-to-date ``onnx`` stage for what is asked
    (the hierarchy under its own router, fp32 on the CPU) and onnxruntime is installed; else
    torch (a stage the run's stages have outgrown says so in a warning). ``onnx`` insists, and
    says in one line why it cannot."""
    check_backend(backend)
    int8 = precision == "int8"
    if backend == "torch":
        if int8:
            raise UserError("precision int8 runs on ONNX Runtime only: pass --backend auto or onnx")
        return "torch"
    why = None
    if flat:
        why = "the ONNX stage holds the hierarchy; the flat model runs on torch"
    elif device != "cpu" and not (int8 and device == "auto"):  # int8 is a CPU path: auto means the CPU
        why = f"ONNX Runtime runs here on the CPU only (device {device!r} asked)"
    elif precision not in ("fp32", "int8"):
        why = f"the ONNX stage runs in fp32 or int8 (precision {precision!r} asked)"
    elif not has_stage(run):
        why = f"{run} has no {STAGE}/ stage (write it: ensemble export --run {run} --format onnx-run)"
    elif router is not None and router != (mode := _stage_meta(run).get("mode")):
        why = f"{run}/{STAGE} routes {mode!r}, not {router!r}"
    elif int8 and not has_int8(run):
        why = (
            f"{run}/{STAGE} has no int8 graph (it is written where the run's training faces can be read: "
            f"ensemble export --run {run} --format onnx-run)"
        )
    elif not runtime_installed():
        why = "onnxruntime is not installed (pip install onnxruntime)"
    elif stale := stale_reason(run):
        why = stale
        if backend == "auto" and not int8:
            warnings.warn(f"{stale}; running on torch", stacklevel=3)
    if why is None:
        return "onnx"
    if int8:  # torch has no int8 path to fall back on
        raise UserError(f"precision int8: {why}")
    if backend == "onnx":
        raise UserError(f"backend onnx: {why}")
    return "torch"


def choose_backend_and_precision(
    backend: str, run, *, flat: bool, router: str | None, device: str, precision: str
) -> tuple[str, str]:
    """:func:`choose_backend`, with precision ``auto`` (the default) resolved: int8 where the
    run's ``onnx`` stage has an int8 graph that can run as asked (the hierarchy under the run's
    own router, on the CPU, onnxruntime installed, the stage up to date), as the bundled model's
    has; fp32 otherwise. Any other precision is kept."""
    if precision == "auto":
        precision = "fp32"
        # int8 asked outright takes device auto as the CPU; auto never gives a GPU up for it
        if device == "cpu":
            try:
                return choose_backend(backend, run, flat=flat, router=router, device=device, precision="int8"), "int8"
            except UserError:
                pass
    return choose_backend(backend, run, flat=flat, router=router, device=device, precision=precision), precision


def resolve_precision(precision: str, backend: str, run, *, flat: bool, router: str | None, device: str) -> str:
    """The precision :func:`choose_backend_and_precision` settles on."""
    return choose_backend_and_precision(backend, run, flat=flat, router=router, device=device, precision=precision)[1]


def _stage_meta(run) -> dict:
    try:
        meta = json.loads((Path(run) / STAGE / "meta.json").read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return meta if isinstance(meta, dict) else {}


def _inside(rel, name: str) -> bool:
    """``rel`` is ``<stage>[/<id>]/<name>`` inside a run: no absolute path, no ``..``."""
    parts = PurePosixPath(rel).parts if isinstance(rel, str) else ()
    return 2 <= len(parts) <= 3 and parts[-1] == name and all(p not in ("", ".", "..") and "/" not in p for p in parts)


def _external_ok(external) -> bool:
    return isinstance(external, dict) and all(
        _inside(k, "weights.pt") and isinstance(v, list) and all(isinstance(x, str) for x in v)
        for k, v in external.items()
    )


def has_int8(run) -> bool:
    """The run's ``onnx`` stage has an int8 graph (written where its training faces were readable)."""
    return "int8" in _stage_meta(run)


def check_stage_meta(meta: dict, where: Path) -> dict:
    """The ``onnx`` stage's own fields, checked before any is used (a damaged or foreign stage
    is one line, and never names a file outside the run)."""
    ok = (
        isinstance(meta.get("sources"), dict)
        and all(_inside(k, "meta.json") and isinstance(v, str) for k, v in meta["sources"].items())
        and _external_ok(meta.get("external"))
        and meta.get("mode") in ("hard", "soft")
        and isinstance(meta.get("expert_classes"), list)
        and meta["expert_classes"]
        and all(isinstance(c, list) and c and set(c) <= set(CLASSES) for c in meta["expert_classes"])
        and (
            "int8" not in meta or _external_ok(meta["int8"].get("external") if isinstance(meta["int8"], dict) else None)
        )
    )
    if not ok:
        raise UserError(f"{where / 'meta.json'} is not an ONNX stage's description; the stage is damaged")
    return meta


def stale_reason(run) -> str | None:
    """Why the run's ``onnx`` stage no longer describes its stages (one was refit since it was
    written), or None."""
    run = Path(run)
    meta = check_stage_meta(_stage_meta(run), run / STAGE)
    for rel, digest in meta["sources"].items():
        f = run / rel
        if not f.is_file() or sha256_file(f) != digest:
            return (
                f"{run / STAGE} was written for other stages than {run} now holds ({rel} changed; "
                f"rewrite it: ensemble export --run {run} --format onnx-run)"
            )
    return None


class OnnxHierarchy:
    """The interface of :class:`ensemble.predictors.HierarchicalPredictor` that photos need
    (``size``, ``mean``, ``std``, ``meta``, ``expert_classes``, :meth:`infer`), on ONNX Runtime."""

    device = "cpu"
    precision = "fp32"

    def __init__(self, session, meta: dict, stage: dict):
        self.session, self.meta, self.stage = session, meta, stage
        self.size, self.mean, self.std = meta["input_size"], tuple(meta["mean"]), tuple(meta["std"])
        self.mode = stage["mode"]
        self.expert_classes = stage["expert_classes"]

    @classmethod
    def load(cls, run, threads: int = 0, precision: str = "fp32") -> OnnxHierarchy:
        import onnxruntime as ort

        from .statefile import read_state

        run = Path(run)
        folder = run / STAGE
        stage = check_stage_meta(read_meta(folder, "ONNX stage"), folder)
        if stale := stale_reason(run):
            raise UserError(f"{stale}, or pass --backend torch")
        if precision not in ("fp32", "int8") or (precision == "int8" and "int8" not in stage):
            raise UserError(f"{folder} has no {precision} graph")
        graph, external = (GRAPH, stage["external"]) if precision == "fp32" else (GRAPH_INT8, stage["int8"]["external"])
        metas = {}  # stage folder -> its meta, read (and its weights' sha256 checked) once
        names, values = [], []
        for rel, keys in external.items():
            where = Path(rel).parent
            metas[where] = read_meta(run / where, f"stage {where}")  # before its weights are read
            state = read_state(run / rel)
            for key in keys:
                if key not in state:
                    raise UserError(f"{run / rel} has no tensor {key!r}, which {folder / graph} reads")
                a = state.pop(key)
                names.append(f"{rel}{SEP}{key}")
                values.append(np.require(a.astype(np.float32) if a.dtype.kind == "f" else a, requirements="C"))
        options = ort.SessionOptions()
        options.log_severity_level = 3  # warnings about unused initializers are not for the user
        if threads:
            options.intra_op_num_threads = threads
        options.add_external_initializers(names, [ort.OrtValue.ortvalue_from_numpy(v) for v in values])
        try:
            session = ort.InferenceSession((folder / graph).read_bytes(), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime's own exception types: a damaged graph, weights that do not fit it
            raise UserError(
                f"{folder / graph} does not load with the run's weights on ONNX Runtime "
                f"({str(exc).splitlines()[0][:160]}); rewrite it: ensemble export --run {run} --format onnx-run"
            ) from None
        session.ensemble_weights = values  # ONNX Runtime reads them in place: they live as long as the session
        meta = metas.get(Path("stage1")) or read_meta(run / "stage1", "stage 1")
        hierarchy = cls(session, meta, stage)
        hierarchy.precision = precision
        return hierarchy

    def infer(self, x: np.ndarray, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Final probabilities (n, 8), V/A (n, 2) and region weights (n, k) of preprocessed faces."""
        outs = [self.session.run(list(OUTPUTS), {INPUT: x[s : s + batch_size]}) for s in range(0, len(x), batch_size)]
        if not outs:
            k = len(self.expert_classes)
            return np.zeros((0, 8), np.float32), np.zeros((0, 2), np.float32), np.zeros((0, k), np.float32)
        return tuple(np.concatenate([o[i] for o in outs]).astype(np.float32) for i in range(3))
