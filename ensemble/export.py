"""``ensemble export``: the whole hierarchy as one ONNX or TorchScript graph.

Input: ``HierarchicalPredictor.preprocess(images)``, float32 (batch, 3, H, W), dynamic batch.
Output: (batch, 8) probabilities in canonical class order, under the chosen router mode.
"""

from __future__ import annotations

import warnings
from pathlib import Path

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


def export(run: Path, fmt: str, out: Path, router: str | None = None) -> Path:
    """The hierarchy of ``run`` as one ONNX or TorchScript file: faces (batch, 3, H, W) -> probabilities (batch, 8)."""
    if fmt not in ("onnx", "torchscript"):
        raise UserError(f"export format must be onnx or torchscript, got {fmt!r}")
    check_target(out, "export", (run,))  # before the run is loaded: a bad --out costs nothing; never into the run
    hp = HierarchicalPredictor.load(run, router=router)
    model = ProbabilitiesOnly(hp.net).eval().requires_grad_(False)  # an inference graph: no autograd
    example = torch.zeros(2, 3, hp.size, hp.size)

    def write(tmp: Path) -> None:
        # the TorchScript-based exporters trace the routing as plain tensor ops; their deprecation
        # notices are not for the user of this command
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if fmt == "torchscript":
                torch.jit.trace(model, example, check_trace=False).save(str(tmp))
            else:
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

    return write_user_file(out, write, "export", (run,))
