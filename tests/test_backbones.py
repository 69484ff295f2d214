"""Backbones: trunk blocks, freezing, heads, and where pretrained weights come from."""

import shutil
import urllib.error
import urllib.request
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from ensemble.config import ModelConfig
from ensemble.errors import UserError
from stages.backbones import EmotionNet, build_head, build_model, build_trunk

REPO = Path(__file__).resolve().parents[1]
SHARED_MOBILENET = REPO.parent / "shared" / "weights" / "mobilenet_v2-b0353104.pth"
MOBILENET_FILE = "mobilenet_v2-b0353104.pth"

# backbone -> number of trunk blocks (VGG: five conv blocks; ResNet: stem + layer1..4; MobileNet: strides)
BACKBONES = {"tinyvgg": 4, "vgg16_bn": 5, "resnet18": 5, "mobilenet_v2": 5}


@pytest.fixture(scope="module")
def trunks():
    """Each backbone's (trunk, channels, classifier), built once (random weights)."""
    cache = {}

    def get(name):
        if name not in cache:
            torch.manual_seed(0)
            cache[name] = build_trunk(name, "none")
        return cache[name]

    return get


def _net(trunks, name, n_out=8):
    trunk, channels, _ = trunks(name)
    return EmotionNet(trunk, build_head("slim", channels, n_out, 16, 0.0))


def _block_flags(net):
    """Per trunk block: the set of requires_grad values of its parameters."""
    return [{p.requires_grad for p in block.parameters()} for block in net.trunk]


# --------------------------------------------------------------------------- blocks


def test_tinyvgg_has_four_blocks_named_block1_to_block4(trunks):
    trunk, channels, classifier = trunks("tinyvgg")
    assert len(trunk) == 4
    assert channels == 128
    assert classifier is None
    net = _net(trunks, "tinyvgg")
    for k in range(1, 5):  # block1..block4 are valid names for this backbone
        net.freeze(f"block{k}")
        assert net.n_frozen_blocks == k - 1
    # each block ends by halving the resolution (conv-bn-relu x2, max-pool)
    x = torch.zeros(1, 3, 32, 32)
    sides = []
    with torch.no_grad():
        for block in trunk.eval():
            x = block(x)
            sides.append(x.shape[-1])
    assert sides == [16, 8, 4, 2]


@pytest.mark.parametrize("name", ["tinyvgg", "vgg16_bn", "resnet18", "mobilenet_v2"])
def test_block_counts(trunks, name):
    trunk, channels, _ = trunks(name)
    assert len(trunk) == BACKBONES[name]
    assert channels == {"tinyvgg": 128, "vgg16_bn": 512, "resnet18": 512, "mobilenet_v2": 1280}[name]
    # every block has weights (no empty block from the resolution split)
    assert all(sum(p.numel() for p in b.parameters()) > 0 for b in trunk)


def test_vgg16_bn_blocks_end_with_max_pooling(trunks):
    trunk, _, classifier = trunks("vgg16_bn")
    for block in trunk:
        assert isinstance(block[-1], nn.MaxPool2d)
        assert sum(isinstance(m, nn.Conv2d) for m in block) in (2, 3)
    assert [sum(isinstance(m, nn.Conv2d) for m in b) for b in trunk] == [2, 2, 3, 3, 3]
    assert isinstance(classifier, nn.Sequential)  # the VGG classifier is kept for the classic head


# --------------------------------------------------------------------------- freezing


@pytest.mark.parametrize("name", ["tinyvgg", "vgg16_bn", "resnet18", "mobilenet_v2"])
@pytest.mark.parametrize("trainable", ["head", "block5", "block4", "block3", "all"])
def test_freeze_leaves_exactly_the_intended_blocks_trainable(trunks, name, trainable):
    net = _net(trunks, name)
    n = BACKBONES[name]
    if trainable.startswith("block") and int(trainable[5:]) > n:
        with pytest.raises(UserError, match=f"block1..block{n}"):
            net.freeze(trainable)
        return
    net.freeze(trainable)
    first_trainable = {"head": n, "all": 0}.get(trainable)
    if first_trainable is None:
        first_trainable = int(trainable[5:]) - 1
    expected = [{i >= first_trainable} for i in range(n)]
    assert _block_flags(net) == expected
    assert all(p.requires_grad for p in net.head.parameters())
    n_trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
    want = sum(p.numel() for p in net.head.parameters()) + sum(
        p.numel() for i, b in enumerate(net.trunk) if i >= first_trainable for p in b.parameters()
    )
    assert n_trainable == want


def test_freeze_then_unfreeze_all(trunks):
    net = _net(trunks, "tinyvgg")
    net.freeze("head")
    assert not any(p.requires_grad for p in net.trunk.parameters())
    net.freeze("all")
    assert all(p.requires_grad for p in net.parameters())
    assert net.n_frozen_blocks == 0


@pytest.mark.parametrize("bad", ["block0", "block", "blockx", "trunk", ""])
def test_freeze_rejects_unknown_names(trunks, bad):
    net = _net(trunks, "tinyvgg")
    with pytest.raises(UserError, match="model.trainable"):
        net.freeze(bad)


def test_frozen_blocks_stay_in_eval_mode_after_train(trunks):
    net = _net(trunks, "tinyvgg")
    net.freeze("block3")  # blocks 1-2 frozen, 3-4 and the head learn
    net.train()
    assert net.training
    for i, block in enumerate(net.trunk):
        assert all(m.training == (i >= 2) for m in block.modules()), f"block{i + 1}"
    assert all(m.training for m in net.head.modules())
    # the frozen blocks' batch-norm statistics do not move in a training forward pass
    frozen_bn = [m for m in net.trunk[0].modules() if isinstance(m, nn.BatchNorm2d)]
    live_bn = [m for m in net.trunk[3].modules() if isinstance(m, nn.BatchNorm2d)]
    before_frozen = [m.running_mean.clone() for m in frozen_bn]
    before_live = [m.running_mean.clone() for m in live_bn]
    net(torch.rand(4, 3, 32, 32) * 3 + 1)
    assert all(torch.equal(a, m.running_mean) for a, m in zip(before_frozen, frozen_bn))
    assert any(not torch.equal(a, m.running_mean) for a, m in zip(before_live, live_bn))
    net.eval()
    assert not any(m.training for m in net.modules())


def test_head_only_net_trunk_stays_eval(trunks):
    net = _net(trunks, "resnet18")
    net.freeze("head")
    net.train()
    assert not any(m.training for block in net.trunk for m in block.modules())
    assert net.head.training


def test_build_model_applies_trainable_and_trunk_from():
    torch.manual_seed(0)
    net = build_model(ModelConfig(backbone="tinyvgg", trainable="block3", hidden=8), 8)
    assert net.n_frozen_blocks == 2
    assert _block_flags(net) == [{False}, {False}, {True}, {True}]
    net = build_model(ModelConfig(backbone="tinyvgg", trainable="all", trunk_from="flat", hidden=8), 3)
    assert net.n_frozen_blocks == 4  # a borrowed trunk is always frozen
    assert net(torch.zeros(2, 3, 32, 32)).shape == (2, 3)


# --------------------------------------------------------------------------- heads


def test_slim_head_output_shape(trunks):
    trunk, channels, _ = trunks("tinyvgg")
    head = build_head("slim", channels, 8, 32, 0.5)
    net = EmotionNet(trunk, head).eval()
    for side in (32, 48):
        assert net(torch.zeros(3, 3, side, side)).shape == (3, 8)
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(128, 32), (32, 8)]


def test_classic_head_without_pretrained_classifier(trunks):
    trunk, channels, _ = trunks("tinyvgg")
    head = build_head("classic", channels, 2, 0, 0.3)
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(128 * 49, 4096), (4096, 4096), (4096, 2)]
    assert EmotionNet(trunk, head).eval()(torch.zeros(2, 3, 32, 32)).shape == (2, 2)


def test_classic_head_reuses_the_vgg_classifier(trunks):
    trunk, channels, classifier = trunks("vgg16_bn")
    head = build_head("classic", channels, 8, 0, 0.25, classifier)
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(25088, 4096), (4096, 4096), (4096, 8)]
    assert linears[0].weight is classifier[0].weight  # the pretrained 4096-4096 layers are kept
    assert linears[1].weight is classifier[3].weight
    assert all(m.p == 0.25 for m in head.modules() if isinstance(m, nn.Dropout))
    with torch.no_grad():
        assert EmotionNet(trunk, head).eval()(torch.zeros(1, 3, 64, 64)).shape == (1, 8)


def test_unknown_head_and_backbone():
    with pytest.raises(UserError, match="model.head"):
        build_head("wide", 16, 8, 8, 0.0)
    with pytest.raises(UserError, match="unknown backbone"):
        build_trunk("no_such_net_42", "none")
    with pytest.raises(UserError, match="tinyvgg has no pretrained"):
        build_trunk("tinyvgg", "imagenet")


# --------------------------------------------------------------------------- pretrained weights


def _tensors(state_or_module):
    state = state_or_module.state_dict() if isinstance(state_or_module, nn.Module) else state_or_module
    return list(state.values())


def test_pretrained_state_dict_file_is_loaded(tmp_path):
    import torchvision

    torch.manual_seed(123)
    ref = torchvision.models.mobilenet_v2(weights=None)
    with torch.no_grad():  # make the file unmistakable (not what a fresh init would give)
        for p in ref.parameters():
            p.add_(torch.randn_like(p))
    path = tmp_path / "my_mobilenet.pt"
    torch.save(ref.state_dict(), path)
    trunk, _, _ = build_trunk("mobilenet_v2", str(path))
    got, want = _tensors(trunk), _tensors(ref.features)
    assert len(got) == len(want)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    # a checkpoint dict with a "state_dict" entry works too
    wrapped = tmp_path / "wrapped.pt"
    torch.save({"state_dict": ref.state_dict(), "epoch": 3}, wrapped)
    trunk2, _, _ = build_trunk("mobilenet_v2", str(wrapped))
    assert all(torch.equal(a, b) for a, b in zip(_tensors(trunk2), want))


def test_pretrained_wrong_state_dict_is_a_user_error(tmp_path):
    import torchvision

    path = tmp_path / "resnet.pt"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    with pytest.raises(UserError, match="not a state_dict of torchvision's mobilenet_v2"):
        build_trunk("mobilenet_v2", str(path))


def test_pretrained_missing_or_garbage_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        build_trunk("mobilenet_v2", str(tmp_path / "nope.pt"))
    junk = tmp_path / "junk.pt"
    junk.write_text("not a torch file")
    with pytest.raises(UserError, match="cannot load weights"):
        build_trunk("mobilenet_v2", str(junk))


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """TORCH_HOME in an empty folder and no network: any download raises URLError."""
    home = tmp_path / "torch_home"
    home.mkdir()
    monkeypatch.setenv("TORCH_HOME", str(home))
    calls = []

    def no_network(url, *args, **kwargs):
        calls.append(url)
        raise urllib.error.URLError("network is unreachable (test)")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    return home, calls


def _default_file(name):
    import torchvision

    return Path(torchvision.models.get_model_weights(name).DEFAULT.url).name


def test_imagenet_offline_without_file_names_the_file(offline):
    home, calls = offline
    with pytest.raises(UserError) as err:
        build_trunk("mobilenet_v2", "imagenet")
    msg = str(err.value)
    assert _default_file("mobilenet_v2") in msg  # the exact file torchvision would download
    assert str(home / "hub" / "checkpoints") in msg  # and where to put it
    assert "URLError" in msg
    assert calls, "the download should have been attempted (and refused)"


@pytest.mark.skipif(
    not SHARED_MOBILENET.is_file(), reason=f"ImageNet MobileNetV2 weights not present at {SHARED_MOBILENET}"
)
def test_shared_imagenet_file_loads_as_a_state_dict_path(offline):
    _, calls = offline
    trunk, _, _ = build_trunk("mobilenet_v2", str(SHARED_MOBILENET))
    state = torch.load(SHARED_MOBILENET, map_location="cpu", weights_only=True)
    want = [v for k, v in state.items() if k.startswith("features.")]
    got = _tensors(trunk)
    assert len(got) == len(want) and all(torch.equal(a, b) for a, b in zip(got, want))
    assert not calls


@pytest.mark.skipif(
    not SHARED_MOBILENET.is_file(), reason=f"ImageNet MobileNetV2 weights not present at {SHARED_MOBILENET}"
)
def test_imagenet_offline_with_file_in_torch_home(offline):
    home, calls = offline
    ckpt = home / "hub" / "checkpoints"
    ckpt.mkdir(parents=True)
    shutil.copyfile(SHARED_MOBILENET, ckpt / MOBILENET_FILE)
    trunk, channels, _ = build_trunk("mobilenet_v2", "imagenet")
    assert not calls, "no download may be attempted when the file is in place"
    assert channels == 1280
    state = torch.load(SHARED_MOBILENET, map_location="cpu", weights_only=True)
    want = [v for k, v in state.items() if k.startswith("features.")]
    got = _tensors(trunk)
    assert len(got) == len(want)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_an_input_too_small_for_the_backbone_is_one_line():
    from stages.backbones import check_input_size

    net = build_model(ModelConfig(backbone="alexnet", pretrained="none"), 8)
    with pytest.raises(UserError, match="'alexnet' cannot take 32-px input.*raise data.image_size"):
        check_input_size(net, 32, "alexnet")
    check_input_size(net, 96, "alexnet")  # large enough: no error
    assert net.training  # left as it was


def test_vision_transformers_are_refused_by_name():
    with pytest.raises(UserError, match="vision transformer"):
        build_model(ModelConfig(backbone="swin_t", pretrained="none"), 8)


def test_a_pickle_as_pretrained_file_is_one_line(tmp_path):
    f = tmp_path / "evil.pth"
    import pickle

    f.write_bytes(pickle.dumps({"a": object()}))
    with pytest.raises(UserError) as exc, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's note on the pickle protocol
        build_model(ModelConfig(backbone="mobilenet_v2", pretrained=str(f)), 8)
    assert "\n" not in str(exc.value) and "weights_only=False" not in str(exc.value)


@pytest.mark.parametrize("name", ["vgg11", "vgg16_bn"])
def test_own_vgg_is_torchvisions_module_for_module(name):
    """Loading a run builds VGG without torchvision: same keys, same initialisation from the same
    seed, same outputs, same trunk blocks."""
    import torchvision

    from stages.backbones import VGG, _out_channels, _split_by_resolution, build_trunk

    torch.manual_seed(0)
    ours = VGG(name)
    torch.manual_seed(0)
    theirs = torchvision.models.get_model(name, weights=None)
    a, b = ours.state_dict(), theirs.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    x = torch.randn(2, 3, 48, 48)
    assert torch.equal(ours.eval()(x), theirs.eval()(x))
    trunk, channels, classifier = build_trunk(name, "none")
    assert isinstance(classifier, torch.nn.Sequential) and channels == _out_channels(trunk) == 512
    probed = _split_by_resolution(list(theirs.features))  # the rule every other backbone is cut by
    assert [repr(b) for b in trunk] == [repr(b) for b in probed] and len(trunk) == 5


def test_own_mobilenet_v2_is_torchvisions_module_for_module():
    """Loading a MobileNetV2 run builds it without torchvision: same keys, same initialisation
    from the same seed, same outputs, the same five trunk blocks the probe cuts torchvision's into."""
    import torchvision

    from stages.backbones import MobileNetV2, _out_channels, _split_by_resolution, build_trunk

    torch.manual_seed(0)
    ours = MobileNetV2()
    torch.manual_seed(0)
    theirs = torchvision.models.mobilenet_v2(weights=None)
    a, b = ours.state_dict(), theirs.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    x = torch.randn(2, 3, 64, 64)
    assert torch.equal(ours.eval()(x), theirs.eval()(x))
    trunk, channels, classifier = build_trunk("mobilenet_v2", "none")
    assert classifier is None and channels == _out_channels(trunk) == 1280
    probed = _split_by_resolution(list(theirs.features))
    assert [list(b.state_dict()) for b in trunk] == [list(b.state_dict()) for b in probed] and len(trunk) == 5
    with torch.device("meta"):  # how a trained run is loaded: nothing allocated, nothing initialised
        assert all(p.is_meta for p in MobileNetV2().parameters())


def test_a_mobilenet_v2_run_is_built_without_torchvision():
    """How load_network builds a trained MobileNetV2 run (pretrained none, meta device): no
    torchvision import (with it torch._dynamo: over a second of a cold predict)."""
    import subprocess
    import sys

    code = (
        "import sys, torch\n"
        "from ensemble.config import ModelConfig\n"
        "from stages.backbones import build_model\n"
        "with torch.device('meta'):\n"
        "    build_model(ModelConfig(backbone='mobilenet_v2', pretrained='none', head='slim'), 8)\n"
        "print(sorted(m for m in ('torchvision', 'torch._dynamo') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout
