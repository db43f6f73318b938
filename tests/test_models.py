"""Every registered model: forward on a tiny batch, the feature interface, published parameter counts."""

import pytest
import torch

from sskd.errors import SSKDError
from sskd.heads import SSHead, SSModel
from sskd.models import Features, create_model, list_models

# Published parameter counts (CRD, Tian et al. 2020, Table 1/2 headers; 100 classes), in millions.
PUBLISHED = {"resnet8x4": 1.23, "resnet32x4": 7.43, "wrn_40_2": 2.26, "wrn_16_2": 0.70, "wrn_40_1": 0.57,
             "resnet56": 0.86, "resnet20": 0.28, "resnet110": 1.74, "vgg13": 9.46, "vgg8": 3.96,
             "MobileNetV2": 0.81, "ShuffleV1": 0.95, "ShuffleV2": 1.35, "ResNet50": 23.71}
# Width of the pooled feature = the SS head's d (official-code-facts.md §1).
FEAT_DIM = {"wrn_40_2": 128, "wrn_16_2": 128, "wrn_40_1": 64, "resnet56": 64, "resnet20": 64, "resnet32x4": 256,
            "resnet8x4": 256, "vgg13": 512, "vgg8": 512, "ShuffleV1": 960, "ShuffleV2": 1024, "MobileNetV2": 1280,
            "ResNet50": 2048}


def test_registry_has_every_architecture_of_the_issue():
    expected = {"resnet8", "resnet14", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "resnet8x4",
                "resnet32x4", "wrn_16_1", "wrn_16_2", "wrn_40_1", "wrn_40_2", "vgg8", "vgg11", "vgg13", "vgg16",
                "vgg19", "MobileNetV2", "ShuffleV1", "ShuffleV2", "ResNet50", "torchvision:resnet18",
                "torchvision:resnet34", "torchvision:resnet50"}
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
