"""``ensemble export``: the whole hierarchy as one ONNX or TorchScript graph.

Input: ``HierarchicalPredictor.preprocess(images)``, float32 (batch, 3, H, W), dynamic batch.
Output: (batch, 8) probabilities in canonical class order, under the chosen router mode.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
from torch import nn

from .errors import UserError
from .predictors import HierarchicalPredictor


class ProbabilitiesOnly(nn.Module):
    """HierarchyNet's probabilities, the one output an exported graph needs."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (batch, 3, H, W) -> (batch, 8)
        return self.net(x)[0]


def export(run: Path, fmt: str, out: Path, router: str | None = None) -> Path:
    hp = HierarchicalPredictor.load(run, router=router)
    model = ProbabilitiesOnly(hp.net).eval().requires_grad_(False)  # an inference graph: no autograd
    example = torch.zeros(2, 3, hp.size, hp.size)
    tmp = out.with_name(out.name + ".tmp")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(b"")
    except OSError as exc:
        raise UserError(f"cannot write {out}: {exc.strerror or exc}") from None
    # the TorchScript-based exporters trace the routing as plain tensor ops; their deprecation
    # notices are not for the user of this command
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if fmt == "torchscript":
            torch.jit.trace(model, example, check_trace=False).save(str(tmp))
        elif fmt == "onnx":
            try:
                torch.onnx.export(
                    model,
                    (example,),
                    str(tmp),
                    input_names=["faces"],
                    output_names=["probabilities"],
                    dynamic_axes={"faces": {0: "batch"}, "probabilities": {0: "batch"}},
                    opset_version=17,
                    dynamo=False,
                )
            except ImportError as exc:
                raise UserError(f"ONNX export needs the onnx package ({exc}); pip install onnx") from None
        else:
            raise UserError(f"export format must be onnx or torchscript, got {fmt!r}")
    os.replace(tmp, out)
    return out
