"""Every registered model: forward on a tiny batch, the feature interface, published parameter counts."""

import pytest
import torch

from sskd.core.errors import SSKDError
from sskd.models import Features, create_model, list_models
from sskd.models.heads import SSHead, SSModel

# Published parameter counts (CRD, Tian et al. 2020, Table 1/2 headers; 100 classes), in millions.
PUBLISHED = {
    "resnet8x4": 1.23,
    "resnet32x4": 7.43,
    "wrn_40_2": 2.26,
    "wrn_16_2": 0.70,
    "wrn_40_1": 0.57,
    "resnet56": 0.86,
    "resnet20": 0.28,
    "resnet110": 1.74,
    "vgg13": 9.46,
    "vgg8": 3.96,
    "MobileNetV2": 0.81,
    "ShuffleV1": 0.95,
    "ShuffleV2": 1.35,
    "ResNet50": 23.71,
}
# Width of the pooled feature = the SS head's d.
FEAT_DIM = {
    "wrn_40_2": 128,
    "wrn_16_2": 128,
    "wrn_40_1": 64,
    "resnet56": 64,
    "resnet20": 64,
    "resnet32x4": 256,
    "resnet8x4": 256,
    "vgg13": 512,
    "vgg8": 512,
    "ShuffleV1": 960,
    "ShuffleV2": 1024,
    "MobileNetV2": 1280,
    "ResNet50": 2048,
}


def test_registry_has_every_architecture_of_the_issue():
    expected = {
        "resnet8",
        "resnet14",
        "resnet20",
        "resnet32",
        "resnet44",
        "resnet56",
        "resnet110",
        "resnet8x4",
        "resnet32x4",
        "wrn_16_1",
        "wrn_16_2",
        "wrn_40_1",
        "wrn_40_2",
        "vgg8",
        "vgg11",
        "vgg13",
        "vgg16",
        "vgg19",
        "MobileNetV2",
        "ShuffleV1",
        "ShuffleV2",
        "ResNet50",
        "torchvision:resnet18",
        "torchvision:resnet34",
        "torchvision:resnet50",
    }
    assert expected <= set(list_models())


@pytest.mark.parametrize("name", list_models())
def test_every_model_forward_and_features(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=7).eval()
    size = 64 if name.startswith("torchvision:") else 32
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        logits = model(x)
        f = model(x, features=True)
    assert logits.shape == (2, 7)
    assert isinstance(f, Features)
    assert torch.allclose(f.logits, logits)
    assert f.feat.shape == (2, model.feat_dim)
    assert len(f.stages) >= 3 and all(s.shape[0] == 2 and s.ndim == 4 for s in f.stages)
    assert torch.allclose(model.fc(f.feat), logits, atol=1e-5)  # feat is exactly the classifier's input
    if name in FEAT_DIM:
        assert model.feat_dim == FEAT_DIM[name]


@pytest.mark.parametrize("name, millions", sorted(PUBLISHED.items()))
def test_parameter_counts_match_published(name, millions):
    n = sum(p.numel() for p in create_model(name, num_classes=100).parameters()) / 1e6
    assert n == pytest.approx(millions, rel=0.01, abs=0.006)


def test_ss_model_and_head():
    backbone = create_model("resnet8", 10)
    model = SSModel(backbone)
    assert isinstance(model.head, SSHead)
    layers = [m for m in model.head.net]
    assert [type(m).__name__ for m in layers] == ["Linear", "ReLU", "Linear"]
    assert layers[0].in_features == layers[0].out_features == layers[2].out_features == backbone.feat_dim
    out = model(torch.randn(3, 3, 32, 32))
    assert out.logits.shape == (3, 10) and out.embed.shape == (3, 64) and out.feat.shape == (3, 64)


def test_unknown_model_and_missing_pretrained_weights(tmp_path, monkeypatch):
    with pytest.raises(SSKDError, match="unknown model 'resnet9'.*did you mean"):
        create_model("resnet9", 10)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(SSKDError, match="not in the local hub cache"):
        create_model("torchvision:resnet18", 1000, pretrained=True)


# The maps feature methods read (RepDistiller's feat[1:-1]): channels and size at a 32x32 input.
MAPS_32 = {
    "resnet8x4": [(64, 32), (128, 16), (256, 8)],
    "resnet56": [(16, 32), (32, 16), (64, 8)],
    "wrn_40_2": [(32, 32), (64, 16), (128, 8)],
    "vgg13": [(128, 16), (256, 8), (512, 4), (512, 4)],
    "MobileNetV2": [(12, 16), (16, 8), (48, 4), (160, 2)],
    "ShuffleV1": [(240, 16), (480, 8), (960, 4)],
    "ShuffleV2": [(116, 16), (232, 8), (464, 4)],
    "ResNet50": [(256, 32), (512, 16), (1024, 8), (2048, 4)],
    "torchvision:resnet18": [(64, 8), (128, 4), (256, 2), (512, 1)],
}


@pytest.mark.parametrize("name", sorted(MAPS_32))
def test_feature_maps_and_preact_follow_repdistiller(name):
    """``maps`` and ``preact`` are what RepDistiller's ``is_feat`` / ``preact=True`` return (feat[1:-1])."""
    torch.manual_seed(0)
    model = create_model(name, num_classes=5).eval()
    with torch.no_grad():
        f = model(torch.randn(2, 3, 32, 32), features="preact")
    assert [(m.shape[1], m.shape[2]) for m in f.maps] == MAPS_32[name]
    assert len(f.preact) == len(f.maps) and all(p.shape == m.shape for p, m in zip(f.preact, f.maps))
    if name == "MobileNetV2":  # linear bottlenecks: no last ReLU
        assert all(torch.equal(p, m) for p, m in zip(f.preact, f.maps))
    elif name == "wrn_40_2":  # maps are pre-activation sums; preact adds the BN that normalises them next
        assert torch.allclose(f.preact[2], model.bn1(f.maps[2]))
    elif name != "ShuffleV2":  # the maps are the ReLU of the preact maps, which go negative
        assert all(torch.equal(torch.relu(p), m) for p, m in zip(f.preact, f.maps))
        assert all((p < 0).any() for p in f.preact)
    assert model(torch.randn(1, 3, 32, 32), features=True).preact is None  # only when asked


def test_models_command_lists_shapes(capsys):
    from sskd.cli import main

    assert main(["models", "--size", "32", "--arch", "resnet8x4"]) == 0
    out = capsys.readouterr().out
    assert "resnet8x4" in out and "maps 64x32x32, 128x16x16, 256x8x8" in out and "feat 256" in out
