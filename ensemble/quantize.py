"""The ``onnx`` stage's int8 graph: the trunk's convolutions in 8-bit integers, for CPUs.

On a CPU without bf16 units, the fp32 VGG16 trunk already runs near the chip's multiply-add peak
(about 16 ms a 48-px face on one Zen 3 core), so no fp32 plumbing answers 100 photos a second on
two cores. ONNX Runtime's integer convolutions do the same work in less than half the time.

``hierarchy-int8.onnx`` is made from the fp32 graph (:func:`ensemble.export.write_onnx_stage`):

- each convolution's batch norm is folded into it: weight ``W * s`` with ``s = gamma /
  sqrt(var + eps)`` per output channel, bias ``beta + (b - mean) * s``;
- activations are quantized to uint8 with ranges measured (min/max) on faces of the run's
  *training* split, never on a split that figures are reported on; weights to int8 per output
  channel (ONNX Runtime's static QDQ quantizer);
- the graph still holds no weight: ``W`` is read from the run's weights file under its usual name
  and the graph multiplies it by ``s`` and quantizes it (``Mul`` then ``QuantizeLinear`` on
  constants, which ONNX Runtime folds when the session is built). What it stores beyond the fp32
  graph's small constants is per-channel: ``s``, the folded biases and the quantization scales
  (the bundled model's int8 graph is 171 kB against 38 kB).

A convolution without a batch norm is quantized as it is (``QuantizeLinear(W)``). The first
convolution (it reads the image), the heads, stage 1, the router and the experts stay in fp32:
they cost little. Keeping the first convolution in float was chosen on the selection split: the
same label as fp32 for 99.8 % of its faces, against 97.8 % with it in int8. The int8 graph
answers like the fp32 one on about 99 % of faces; the model card gives its figures.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np

from .errors import UserError

#: training faces whose activations set the int8 ranges (stratified by class, fixed seed)
CALIBRATION_FACES = 1024
CALIBRATION_SEED = 0


def calibration_faces(run: Path, n: int = CALIBRATION_FACES, seed: int = CALIBRATION_SEED) -> tuple[np.ndarray, dict]:
    """(n, H, W, 3) uint8 faces from the run's training split, prepared as it was trained on
    them, and a description for the stage's meta. One-line UserError where the data set the run
    was trained on cannot be read here."""
    import json

    from .config import config_from_dict
    from .data import load_dataset, stratified_take
    from .prepare import load_images

    cfg_file = Path(run) / "config.json"
    if not cfg_file.is_file():
        raise UserError(f"{run} records no config.json, so its training faces are unknown")
    try:
        cfg = config_from_dict(json.loads(cfg_file.read_text(encoding="utf-8")))
        ds = load_dataset(cfg.data, seed=cfg.train.seed)
    except (UserError, OSError, ValueError) as exc:
        raise UserError(f"its training data cannot be read here ({exc})") from None
    train = ds.manifest[ds.manifest["split"] == "train"]
    if train.empty:
        raise UserError("its data set has no training split here")
    pick = stratified_take(train, n, seed).reset_index(drop=True)
    images = load_images(pick, cfg.data.image_size, cfg.data.cache_dir, "none", progress=False)
    faces = [f for f in (images.get(i) for i in range(len(pick))) if f is not None]
    if not faces:
        raise UserError("none of its training images could be read here")
    about = {"split": "train", "faces": len(faces), "seed": seed, "method": "minmax", "format": cfg.data.format}
    return np.stack(faces), about


def fold_batch_norms(model, values: dict[str, np.ndarray]) -> dict[str, tuple[str, str]]:
    """Fold every ``Conv -> BatchNormalization`` pair of ``model`` (in place) into one ``Conv``
    whose weight is the output of ``Mul(W, s)`` and whose bias is an embedded constant.
    ``values`` holds the graph's external weights by name. Returns, per folded weight name,
    ``(W's name, s's name)``."""
    from onnx import helper, numpy_helper

    g = model.graph
    consumers: dict[str, list] = {}
    for node in g.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    attrs = lambda node: {a.name: helper.get_attribute_value(a) for a in node.attribute}  # noqa: E731
    folded, drop = {}, []
    for conv in [n for n in g.node if n.op_type == "Conv"]:
        users = consumers.get(conv.output[0], [])
        if len(users) != 1 or users[0].op_type != "BatchNormalization" or len(conv.input) < 2:
            continue
        bn = users[0]
        bias = [conv.input[2]] if len(conv.input) > 2 and conv.input[2] else []
        if attrs(bn).get("training_mode", 0) or any(n not in values for n in (conv.input[1], *bias, *bn.input[1:5])):
            continue
        w = values[conv.input[1]]
        b = values[conv.input[2]] if len(conv.input) > 2 and conv.input[2] else np.zeros(w.shape[0], np.float32)
        gamma, beta, mean, var = (values[n] for n in bn.input[1:5])
        s = (gamma / np.sqrt(var + np.float32(attrs(bn).get("epsilon", 1e-5)))).astype(np.float32)
        stem = conv.name or conv.output[0]
        s_name, w_name, b_name = f"{stem}::bn_scale", f"{stem}::folded_weight", f"{stem}::folded_bias"
        g.initializer.extend(
            [
                numpy_helper.from_array(s.reshape(-1, 1, 1, 1), s_name),
                numpy_helper.from_array((beta + (b - mean) * s).astype(np.float32), b_name),
            ]
        )
        g.node.insert(0, helper.make_node("Mul", [conv.input[1], s_name], [w_name], name=f"{stem}/fold_bn"))
        folded[w_name] = (conv.input[1], s_name)
        conv.input[:] = [conv.input[0], w_name, b_name]
        conv.output[0] = bn.output[0]
        drop.append(bn)
    for bn in drop:
        g.node.remove(bn)
    used = {name for n in g.node for name in n.input}
    for i in [i for i in g.initializer if i.name not in used]:  # the batch norms' own parameters
        g.initializer.remove(i)
    return folded


def _trunk_nodes(model) -> list[str]:
    """The convolutions and the ReLUs and max-pools that follow them: what is quantized."""
    producer = {out: n for n in model.graph.node for out in n.output}
    names = []
    for node in model.graph.node:
        src = producer.get(node.input[0]) if node.input else None
        if node.op_type == "Conv":
            names.append(node.name)
        elif node.op_type == "Relu" and src is not None and src.op_type == "Conv":
            names.append(node.name)
        elif node.op_type == "MaxPool" and src is not None and src.op_type in ("Relu", "MaxPool") and src.name in names:
            names.append(node.name)
    return names


def int8_graph(model, values: dict[str, np.ndarray], inputs: np.ndarray, input_name: str):
    """The int8 graph of an fp32 graph whose weights are external (``values`` by name), its
    activation ranges measured on ``inputs`` (preprocessed training faces). Returns the graph, its
    external weights still external, and the external names it reads."""
    import onnx
    from onnx import helper
    from onnxruntime.quantization import CalibrationDataReader

    graph = copy.deepcopy(model)
    # every convolution's weight input -> (the external weight it comes from, its batch norm's
    # scale or None where it has none)
    weights = fold_batch_norms(graph, values)
    for node in graph.graph.node:
        if node.op_type == "Conv" and len(node.input) > 1 and node.input[1] in values:
            weights[node.input[1]] = (node.input[1], None)
    # the convolution that reads the image stays in float: under 1 % of the arithmetic, and in 8 bits
    # it alone changed the answer on 2 % of the selection split's faces
    reads_image = {n.name for n in graph.graph.node if input_name in n.input}
    nodes = [n for n in _trunk_nodes(graph) if n not in reads_image]
    quantized = {n.input[1] for n in graph.graph.node if n.op_type == "Conv" and n.name in nodes}
    if not quantized:
        raise UserError("the graph has no convolution to quantize past the one that reads the image")
    # a runnable copy for the quantizer: every weight embedded, the folds computed here
    runnable = copy.deepcopy(graph)
    init = {i.name: i for i in runnable.graph.initializer}
    for name, value in values.items():
        if name in init:
            init[name].CopyFrom(onnx.numpy_helper.from_array(value, name))
    mul = {n.output[0]: n for n in runnable.graph.node if n.output and n.output[0] in weights}
    for w_name, (src, s_name) in weights.items():
        if s_name is not None:
            s = onnx.numpy_helper.to_array(init[s_name])
            runnable.graph.node.remove(mul[w_name])
            runnable.graph.initializer.append(onnx.numpy_helper.from_array(values[src] * s, w_name))

    class Faces(CalibrationDataReader):
        def __init__(self):
            self.batches = iter(inputs[i : i + 64] for i in range(0, len(inputs), 64))

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else {input_name: batch}

    out = _quantize(runnable, Faces(), nodes)
    # weights back to their files: the quantizer's int8 copy of each weight becomes
    # QuantizeLinear([Mul(W, s)]) on the external W, which ONNX Runtime folds at load
    g = out.graph
    by_name = {i.name: i for i in g.initializer}
    dq = {n.input[0]: n for n in g.node if n.op_type == "DequantizeLinear"}
    head = []
    for w_name, (src, s_name) in weights.items():
        q_name = f"{w_name}_quantized"
        if w_name not in quantized:  # a convolution left in float: its folded weight computed again at load
            if s_name is not None:
                g.initializer.remove(by_name.pop(w_name))
                head.append(helper.make_node("Mul", [src, s_name], [w_name], name=f"{w_name}/fold_bn"))
            continue
        if q_name not in by_name or q_name not in dq:
            raise UserError(f"the quantizer left {w_name} in float; the int8 graph is not written")
        g.initializer.remove(by_name.pop(q_name))
        node = dq[q_name]
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        if s_name is not None:
            head.append(helper.make_node("Mul", [src, s_name], [w_name], name=f"{w_name}/fold_bn"))
        head.append(
            helper.make_node("QuantizeLinear", [w_name, *node.input[1:3]], [q_name], axis=axis, name=f"{q_name}/q")
        )
    rest = list(g.node)
    del g.node[:]
    g.node.extend(head + rest)
    used = {name for n in g.node for name in n.input}
    for i in list(g.initializer):
        if i.name in values or i.name not in used:  # embedded weights out; leftovers of the quantizer dropped
            g.initializer.remove(i)
    g.initializer.extend(copy.deepcopy(i) for i in model.graph.initializer if i.name in values and i.name in used)
    scales = {s_name for _src, s_name in weights.values() if s_name}  # the quantizer dropped them with their Mul
    scales -= {i.name for i in g.initializer}
    g.initializer.extend(copy.deepcopy(i) for i in graph.graph.initializer if i.name in scales)
    return out, sorted(used & set(values))


def _quantize(model, reader, nodes: list[str]):
    """ONNX Runtime's static QDQ quantizer (uint8 activations, int8 weights per output channel,
    min/max ranges) on the named nodes, between temporary files: it writes its own."""
    import logging
    import tempfile

    import onnx
    import onnxruntime
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    def advice(record: logging.LogRecord) -> bool:  # to pre-process the model: done, batch norms are folded
        return "pre-processing before quantization" not in record.getMessage()

    root = logging.getLogger()
    onnxruntime.set_default_logger_severity(3)  # its notes on initializers it prunes are not the user's
    root.addFilter(advice)
    try:
        with tempfile.TemporaryDirectory(prefix="ensemble-int8-") as tmp:
            src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
            onnx.save(model, src)
            quantize_static(
                src,
                dst,
                reader,
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                nodes_to_quantize=nodes,
                calibrate_method=CalibrationMethod.MinMax,
            )
            return onnx.load(dst)
    finally:
        root.removeFilter(advice)
        onnxruntime.set_default_logger_severity(2)  # ONNX Runtime's default (it has no getter)
