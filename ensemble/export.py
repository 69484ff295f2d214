"""``ensemble export``: the whole hierarchy as one ONNX or TorchScript graph.

Input: ``HierarchicalPredictor.preprocess(images)``, float32 (batch, 3, H, W), dynamic batch.
Output: (batch, 8) probabilities in canonical class order, under the chosen router mode.

``--format onnx-run`` writes the hierarchy into the run itself (``RUN/onnx``, see
:mod:`ensemble.onnx_runtime`): a graph that reads the run's own weights files, so that
``predict`` answers without torch; ``ensemble bundle`` writes it into every bundled model.
"""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .errors import UserError
from .paths import check_target, write_user_file
from .predictors import HierarchicalPredictor


class ProbabilitiesOnly(nn.Module):
    """HierarchyNet's probabilities, the one output an exported graph needs."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (batch, 3, H, W) -> (batch, 8)
        return self.net(x)[0]


def _onnx(model: nn.Module, example: torch.Tensor, target, output_names: list[str], **kwargs) -> None:
    # torch's exporter says "not installed" with a traceback of its own: one line instead
    if importlib.util.find_spec("onnx") is None:
        raise UserError("ONNX export needs the onnx package: pip install onnx")
    # the TorchScript-based exporter traces the routing as plain tensor ops; its deprecation
    # notices are not for the user of this command
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (example,),
            target,
            input_names=["faces"],
            output_names=output_names,
            dynamic_axes={name: {0: "batch"} for name in ["faces", *output_names]},
            opset_version=17,
            dynamo=False,
            **kwargs,
        )


def write_onnx_stage(run, log=print, int8: bool = True) -> Path:
    """``RUN/onnx``: the run's hierarchy (under its own router) as an ONNX graph whose weights are
    read from the run's ``weights.pt`` files (names ``<stage>/weights.pt::<key>``), for
    :class:`ensemble.onnx_runtime.OnnxHierarchy`; with ``int8``, also its int8 graph
    (:mod:`ensemble.quantize`) where the run's training faces can be read here."""
    import io

    from .artifacts import StageWriter, sha256_file
    from .onnx_runtime import GRAPH, GRAPH_INT8, INPUT, OUTPUTS, SEP, STAGE

    run = Path(run)
    hp = HierarchicalPredictor.load(run)
    net = hp.net.eval().requires_grad_(False)
    origin = {}  # (address, shape) of every tensor read from a weights file -> (file, key)
    for folder, (_meta, state) in hp.sources.items():
        rel = Path(folder).relative_to(run).as_posix() + "/weights.pt"
        for key, v in state.items():
            origin[(v.data_ptr(), tuple(v.shape))] = (rel, key)
    tensors = {**dict(net.named_parameters()), **dict(net.named_buffers())}
    buf = io.BytesIO()
    # the module as it is: no folding of batch norms into convolutions (ONNX Runtime does that at
    # load), so that every weight in the graph is one tensor of a weights file
    _onnx(
        net,
        torch.zeros(2, 3, hp.size, hp.size),
        buf,
        list(OUTPUTS),
        do_constant_folding=False,
        training=torch.onnx.TrainingMode.PRESERVE,
    )
    import onnx

    model = onnx.load_from_string(buf.getvalue())
    renamed, external, values = {}, {}, {}
    for init in model.graph.initializer:
        t = tensors.get(init.name)
        src = origin.get((t.data_ptr(), tuple(t.shape))) if t is not None else None
        if src is None:
            if int(np.prod(init.dims)) > 4096:  # a weight the exporter made: it would be stored twice
                raise UserError(f"cannot write {run / STAGE}: {init.name} {list(init.dims)} comes from no weights file")
            continue  # a small constant of the router (centers, class maps): stays in the graph
        renamed[init.name] = SEP.join(src)
        values[renamed[init.name]] = t.detach().float().numpy() if t.is_floating_point() else t.detach().numpy()
        external.setdefault(src[0], []).append(src[1])
        init.name = renamed[init.name]
        init.ClearField("raw_data")
        init.data_location = onnx.TensorProto.EXTERNAL
        entry = init.external_data.add()
        entry.key, entry.value = "location", src[0]
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            if name in renamed:
                node.input[i] = renamed[name]
    # every stage description the graph depends on: the folders its weights come from (a trunk
    # borrowed from the flat model included, whether or not the flat head is mixed in), the
    # neighborhoods and router whose constants it holds, and every expert
    folders = {Path(f) for f in hp.sources} | {run / s for s in ("stage1", "neighborhoods", "router", "experts")}
    folders |= {p for p in (run / "experts").iterdir() if (p / "meta.json").is_file()}
    stages = sorted(Path(f).relative_to(run).as_posix() for f in folders)
    writer = StageWriter(run / STAGE)
    writer.path(GRAPH).write_bytes(model.SerializeToString())
    extra = {}
    if int8:
        try:
            extra["int8"] = _write_int8(run, hp, model, values, writer.path(GRAPH_INT8), INPUT)
        except Exception as exc:  # the fp32 graph stands without it: say why in one line, leave no part of it
            writer.path(GRAPH_INT8).unlink(missing_ok=True)
            why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            log(f"no int8 graph for {run}: {why}")
    folder = writer.publish(
        {
            "stage": STAGE,
            "graph": GRAPH,
            "inputs": {"faces": ["batch", 3, hp.size, hp.size]},
            "outputs": list(OUTPUTS),
            "opset": 17,
            "mode": hp.mode,
            "expert_classes": hp.expert_classes,
            "external": external,
            "sources": {f"{s}/meta.json": sha256_file(run / s / "meta.json") for s in stages},
            **extra,
        }
    )
    size = (folder / GRAPH).stat().st_size
    also = f" and {GRAPH_INT8} ({(folder / GRAPH_INT8).stat().st_size / 1e3:.0f} kB)" if extra else ""
    log(f"wrote {folder} ({GRAPH}, {size / 1e3:.0f} kB{also}; weights read from {', '.join(external)})")
    return folder


def _write_int8(run: Path, hp, model, values: dict, target: Path, input_name: str) -> dict:
    """The int8 graph (:mod:`ensemble.quantize`) into ``target``; its entry in the stage's meta."""
    from .images import uint8_to_input
    from .onnx_runtime import GRAPH_INT8, SEP
    from .quantize import calibration_faces, int8_graph

    with warnings.catch_warnings():  # the data set's own notes (rows dropped) were given when it was trained
        warnings.simplefilter("ignore")
        faces, about = calibration_faces(run)
    graph, names = int8_graph(model, values, uint8_to_input(faces, hp.mean, hp.std), input_name)
    target.write_bytes(graph.SerializeToString())
    external = {}
    for name in names:
        rel, key = name.split(SEP, 1)
        external.setdefault(rel, []).append(key)
    return {"graph": GRAPH_INT8, "external": external, "calibration": about}


def export(run: Path, fmt: str, out: Path, router: str | None = None) -> Path:
    """The hierarchy of ``run`` as one ONNX or TorchScript file: faces (batch, 3, H, W) -> probabilities (batch, 8)."""
    if fmt not in ("onnx", "torchscript"):
        raise UserError(f"export format must be onnx, onnx-run or torchscript, got {fmt!r}")
    check_target(out, "export", (run,))  # before the run is loaded: a bad --out costs nothing; never into the run
    hp = HierarchicalPredictor.load(run, router=router)
    model = ProbabilitiesOnly(hp.net).eval().requires_grad_(False)  # an inference graph: no autograd
    example = torch.zeros(2, 3, hp.size, hp.size)

    def write(tmp: Path) -> None:
        if fmt == "onnx":
            return _onnx(model, example, str(tmp), ["probabilities"])
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.jit.trace(model, example, check_trace=False).save(str(tmp))

    return write_user_file(out, write, "export", (run,))
