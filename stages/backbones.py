"""Backbones split into a feature trunk of named blocks and a task head.

Any torchvision classification model works by name (``vgg16``, ``vgg16_bn``, ``alexnet``,
``resnet18``, ``resnet50``, ``mobilenet_v2``, ``efficientnet_b0`` …), plus ``tinyvgg``, a
small VGG-style net registered for tests and the CPU demo.

The trunk is cut into blocks at each resolution drop (VGG: the five conv blocks that end in
max-pooling; ResNet: stem + layer1..4; MobileNet/EfficientNet: their stride stages), named
``block1`` … ``blockN``. ``trainable`` says what learns, as in the report's Table I:
``head`` (classifier only), ``block5`` (last conv block + head), ``block3`` (the last three
blocks + head, about half of VGG16's layers), ``all``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ensemble.artifacts import state_digest  # noqa: F401  (re-exported)
from ensemble.errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class TinyVGG(nn.Module):
    """A four-block VGG-style net (conv-bn-relu x2, max-pool), for tests and the CPU demo."""

    def __init__(self, widths=(16, 32, 64, 128)):
        super().__init__()
        layers, c_in = [], 3
        for w in widths:
            layers += [
                nn.Conv2d(c_in, w, 3, padding=1, bias=False),
                nn.BatchNorm2d(w),
                nn.ReLU(inplace=True),
                nn.Conv2d(w, w, 3, padding=1, bias=False),
                nn.BatchNorm2d(w),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            ]
            c_in = w
        self.features = nn.Sequential(*layers)


# VGG's layouts (Simonyan & Zisserman 2015, configurations A, B, D, E): channels, "M" = max-pool
_VGG_LAYOUTS = {
    "vgg11": (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "vgg13": (64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "vgg16": (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"),
    "vgg19": (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"),
}


class VGG(nn.Module):
    """torchvision's VGG, module for module (same state_dict keys, same initialisation from the
    same seed), built here so that loading a trained run never imports torchvision: that import
    pulls in torch._dynamo, over a second of a cold ``ensemble predict``."""

    def __init__(self, name: str, num_classes: int = 1000):
        super().__init__()
        layers, c_in = [], 3
        for v in _VGG_LAYOUTS[name.removesuffix("_bn")]:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
                continue
            layers.append(nn.Conv2d(c_in, v, kernel_size=3, padding=1))
            layers += [nn.BatchNorm2d(v), nn.ReLU(inplace=True)] if name.endswith("_bn") else [nn.ReLU(inplace=True)]
            c_in = v
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(
            nn.Linear(512 * 7 * 7, 4096),
            nn.ReLU(True),
            nn.Dropout(0.5),
            nn.Linear(4096, 4096),
            nn.ReLU(True),
            nn.Dropout(0.5),
            nn.Linear(4096, num_classes),
        )
        if self.classifier[0].weight.is_meta:
            return  # built to be loaded (and torch's normal_ on the meta device imports torch._dynamo)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.constant_(m.bias, 0)

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def _conv_bn(c_in: int, c_out: int, k: int = 3, stride: int = 1, groups: int = 1, act: bool = True) -> nn.Sequential:
    """torchvision's Conv2dNormActivation as MobileNetV2 uses it: conv (no bias), batch norm, ReLU6."""
    layers = [nn.Conv2d(c_in, c_out, k, stride, (k - 1) // 2, groups=groups, bias=False), nn.BatchNorm2d(c_out)]
    return nn.Sequential(*layers, nn.ReLU6(inplace=True)) if act else nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    """MobileNetV2's block (Sandler et al. 2018): expand 1x1, depthwise 3x3, project 1x1 (linear),
    with the input added back where the shape allows."""

    def __init__(self, c_in: int, c_out: int, stride: int, expand: int):
        super().__init__()
        hidden = c_in * expand
        self.use_res_connect = stride == 1 and c_in == c_out
        layers = [_conv_bn(c_in, hidden, 1)] if expand != 1 else []
        layers += [_conv_bn(hidden, hidden, 3, stride, groups=hidden), nn.Conv2d(hidden, c_out, 1, bias=False)]
        self.conv = nn.Sequential(*layers, nn.BatchNorm2d(c_out))

    def forward(self, x):
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


# (expansion t, channels c, repeats n, first stride s): the paper's Table 2, width 1.0
_MOBILENET_V2 = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


class MobileNetV2(nn.Module):
    """torchvision's mobilenet_v2, module for module (same state_dict keys, same initialisation
    from the same seed), so that loading a trained MobileNetV2 run never imports torchvision."""

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        layers, c_in = [_conv_bn(3, 32, stride=2)], 32
        for t, c, n, s in _MOBILENET_V2:
            for i in range(n):
                layers.append(InvertedResidual(c_in, c, s if i == 0 else 1, t))
                c_in = c
        layers.append(_conv_bn(c_in, 1280, 1))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, num_classes))
        if self.classifier[1].weight.is_meta:
            return  # built to be loaded
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def blocks(self) -> list[nn.Sequential]:
        """The trunk cut where the resolution drops (a block starts at each stride-2 layer), as
        :func:`_split_by_resolution` cuts torchvision's model: features 0-1, 2-3, 4-6, 7-13, 14-18."""
        starts = [0, 2, 4, 7, 14, len(self.features)]
        return [nn.Sequential(*self.features[a:b]) for a, b in zip(starts, starts[1:])]

    def forward(self, x):
        x = nn.functional.adaptive_avg_pool2d(self.features(x), 1)
        return self.classifier(torch.flatten(x, 1))


def _torchvision_model(name: str, pretrained: str) -> nn.Module:
    if pretrained in ("", "none") and name.removesuffix("_bn") in _VGG_LAYOUTS:
        return VGG(name)
    if pretrained in ("", "none") and name == "mobilenet_v2":
        return MobileNetV2()
    import torchvision

    try:
        builder = torchvision.models.get_model_builder(name)
    except ValueError:
        raise UserError(f"unknown backbone {name!r} (any torchvision classification model, or tinyvgg)") from None
    if name.startswith(("swin", "vit", "maxvit")):
        raise UserError(
            f"backbone {name!r} is a vision transformer; supported are convolutional torchvision models "
            f"(vgg, alexnet, resnet, resnext, wide_resnet, mobilenet, efficientnet, densenet, convnext, "
            f"squeezenet) and tinyvgg"
        )
    if pretrained in ("", "none"):
        return builder(weights=None)
    if pretrained == "imagenet":
        # any of torchvision's ImageNet weights for this model whose file is already in the
        # torch cache (offline machines), else the default ones (downloaded once)
        enum = torchvision.models.get_model_weights(name)
        folder = Path(torch.hub.get_dir()) / "checkpoints"
        present = [w for w in enum if (folder / Path(w.url).name).is_file()]
        weights = present[0] if present else enum.DEFAULT
        try:
            return builder(weights=weights)
        except Exception as exc:  # offline with no file: say exactly what to do
            files = " or ".join(Path(w.url).name for w in enum)
            raise UserError(
                f"ImageNet weights for {name} are not available ({type(exc).__name__}): place {files} "
                f"in {folder} (or set TORCH_HOME), or set model.pretrained to a state_dict file"
            ) from None
    path = Path(pretrained).expanduser()
    if not path.is_file():
        raise UserError(f"model.pretrained: no such file {path} (use imagenet, none or a state_dict path)")
    model = builder(weights=None)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickled code, a truncated file, not a torch file at all
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise UserError(
            f"cannot load weights from {path}: not a plain tensor state_dict "
            f"(weights load with weights_only=True; pickled objects are refused): {first}"
        ) from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[1:2]
        raise UserError(f"{path} is not a state_dict of torchvision's {name}: {' '.join(first).strip()}") from None
    return model


def _split_by_resolution(layers: list[nn.Module], probe_size: int = 64) -> list[nn.Sequential]:
    """Group layers into blocks: a strided layer with weights starts a block, a pooling ends one."""
    x = torch.zeros(1, 3, probe_size, probe_size)
    blocks: list[list[nn.Module]] = [[]]
    close_next = False
    with torch.no_grad():
        for layer in layers:
            h = x.shape[-1]
            x = layer.eval()(x)
            shrinks = x.shape[-1] < h
            has_params = any(True for _ in layer.parameters())
            if (close_next or (shrinks and has_params)) and blocks[-1]:
                blocks.append([])
            close_next = False
            blocks[-1].append(layer)
            if shrinks and not has_params:
                close_next = True
    return [nn.Sequential(*b) for b in blocks if b]


def build_trunk(name: str, pretrained: str = "none") -> tuple[nn.Sequential, int, nn.Module | None]:
    """(trunk of blocks, output channels, the model's pretrained VGG-style classifier or None)."""
    if name == "tinyvgg":
        if pretrained not in ("", "none"):
            raise UserError('tinyvgg has no pretrained weights (set model.pretrained = "none")')
        model = TinyVGG()
        layers = list(model.features)
        classifier = None
    else:
        model = _torchvision_model(name, pretrained)
        if isinstance(model, VGG):  # blocks end at each max-pool; no probe pass (on the meta device
            # that imports torch._dynamo, a second of a cold predict)
            blocks, block = [], []
            for layer in model.features:
                block.append(layer)
                if isinstance(layer, nn.MaxPool2d):
                    blocks.append(nn.Sequential(*block))
                    block = []
            return nn.Sequential(*blocks), 512, model.classifier
        if isinstance(model, MobileNetV2):  # its stride stages, known: no probe pass
            return nn.Sequential(*model.blocks()), 1280, None
        if hasattr(model, "layer4"):  # ResNet family
            stem = nn.Sequential(*[m for n_, m in model.named_children() if n_ in ("conv1", "bn1", "relu", "maxpool")])
            blocks = [stem] + [getattr(model, f"layer{i}") for i in range(1, 5)]
            trunk = nn.Sequential(*blocks)
            return trunk, _out_channels(trunk), None
        if not hasattr(model, "features"):
            raise UserError(f"backbone {name!r} has no 'features' trunk or ResNet layers; not supported")
        layers = list(model.features)
        classifier = getattr(model, "classifier", None) if name.startswith(("vgg", "alexnet")) else None
    trunk = nn.Sequential(*_split_by_resolution(layers))
    return trunk, _out_channels(trunk), classifier


def _out_channels(trunk: nn.Module) -> int:
    with torch.no_grad():
        return int(trunk.eval()(torch.zeros(1, 3, 64, 64)).shape[1])


class EmotionNet(nn.Module):
    """trunk (blocks) -> head. Outputs (batch, n_outputs) logits or regression values."""

    def __init__(self, trunk: nn.Sequential, head: nn.Module):
        super().__init__()
        self.trunk = trunk
        self.head = head
        self.n_frozen_blocks = 0

    def forward(self, x):  # (batch, 3, H, W) -> (batch, n_outputs)
        return self.head(self.trunk(x))

    def tail(self, z):  # output of the frozen blocks -> (batch, n_outputs)
        return self.head(self.trunk[self.n_frozen_blocks :](z))

    def freeze(self, trainable: str) -> None:
        """Make only the named part learn: head | blockN | all."""
        n = len(self.trunk)
        if trainable == "all":
            k = 0
        elif trainable == "head":
            k = n
        elif trainable.startswith("block") and trainable[5:].isdigit() and 1 <= int(trainable[5:]) <= n:
            k = int(trainable[5:]) - 1
        else:
            raise UserError(
                f"model.trainable must be head, all or block1..block{n} for this backbone, got {trainable!r}"
            )
        self.n_frozen_blocks = k
        for i, block in enumerate(self.trunk):
            for p in block.parameters():
                p.requires_grad_(i >= k)

    def train(self, mode: bool = True):
        super().train(mode)
        for block in list(self.trunk)[: self.n_frozen_blocks]:
            block.eval()  # frozen blocks keep their batch-norm statistics
        return self


def trainable_counts(net: nn.Module) -> dict:
    """Weight layers (convolutions and linear layers; batch norms not counted) and parameters,
    in all and trainable: what ``model.trainable`` leaves to learn."""
    layers = [m for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    params = list(net.parameters())
    return {
        "n_weight_layers": len(layers),
        "n_trainable_layers": sum(m.weight.requires_grad for m in layers),
        "n_params": sum(p.numel() for p in params),
        "n_trainable_params": sum(p.numel() for p in params if p.requires_grad),
    }


def describe_trainable(counts: dict) -> str:
    """One line: '12 of 16 weight layers, 134.0M of 134.3M parameters (99.8%) trainable'."""
    share = counts["n_trainable_params"] / max(1, counts["n_params"])
    return (
        f"{counts['n_trainable_layers']} of {counts['n_weight_layers']} weight layers, "
        f"{_millions(counts['n_trainable_params'])} of {_millions(counts['n_params'])} parameters "
        f"({share:.1%}) trainable"
    )


def _millions(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e5 else f"{n:,}"


def build_head(
    kind: str, in_channels: int, n_out: int, hidden: int, dropout: float, classifier: nn.Module | None = None
) -> nn.Module:
    """The head: ``slim`` (global pool -> hidden -> n_out) or ``classic`` (VGG's 4096-4096 classifier, its pretrained layers kept)."""
    if kind == "slim":
        return nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Dropout(dropout),
            nn.Linear(in_channels, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, n_out),
        )
    if kind == "classic":
        if (
            classifier is not None
            and isinstance(classifier, nn.Sequential)
            and in_channels * 49 == getattr(classifier[0], "in_features", -1)
        ):
            layers = [m for m in classifier]  # the pretrained 4096-4096 layers (VGG), new output layer
            layers[-1] = nn.Linear(layers[-1].in_features, n_out)
            for i, m in enumerate(layers):
                if isinstance(m, nn.Dropout):
                    layers[i] = nn.Dropout(dropout)
            return nn.Sequential(nn.AdaptiveAvgPool2d(7), nn.Flatten(), *layers)
        return nn.Sequential(
            nn.AdaptiveAvgPool2d(7),
            nn.Flatten(),
            nn.Linear(in_channels * 49, 4096),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(4096, 4096),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(4096, n_out),
        )
    raise UserError(f"model.head must be slim or classic, got {kind!r}")


def build_model(model_cfg, n_out: int) -> EmotionNet:
    """The network a stage trains, frozen as ``model_cfg.trainable`` says."""
    trunk, channels, classifier = build_trunk(model_cfg.backbone, model_cfg.pretrained)
    head = build_head(model_cfg.head, channels, n_out, model_cfg.hidden, model_cfg.dropout, classifier)
    net = EmotionNet(trunk, head)
    net.freeze("head" if model_cfg.trunk_from else model_cfg.trainable)
    return net


def check_input_size(net: nn.Module, size: int, backbone: str) -> None:
    """Refuse, in one line, an input size the backbone's pooling cannot take (e.g. alexnet at 48 px)."""
    was_training = net.training
    try:
        with torch.no_grad():
            net.eval()(torch.zeros(1, 3, size, size))
    except RuntimeError as exc:
        first = (str(exc).strip().splitlines() or [""])[0][:160]
        raise UserError(f"backbone {backbone!r} cannot take {size}-px input ({first}); raise data.image_size") from None
    finally:
        net.train(was_training)


def normalization(backbone: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The mean/std the backbone's ImageNet weights expect (torchvision's presets)."""
    if backbone != "tinyvgg":
        try:
            import torchvision

            t = torchvision.models.get_model_weights(backbone).DEFAULT.transforms()
            return tuple(t.mean), tuple(t.std)
        except (ValueError, AttributeError):
            pass
    return IMAGENET_MEAN, IMAGENET_STD
