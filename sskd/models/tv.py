"""ImageNet ResNets from torchvision (``torchvision:resnet18|34|50``) behind the same interface.

Pretrained weights are torchvision's, loaded only from the local torch hub cache
(``$TORCH_HOME/hub/checkpoints``): nothing is downloaded at run time.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from sskd.core.errors import SSKDError
from sskd.models.base import BranchSpec, Classifier, pool_flat, run_stages
from sskd.models.registry import MODELS


class TorchvisionResNet(Classifier):
    def __init__(self, arch: str, num_classes: int, pretrained: bool = False):
        super().__init__()
        import torchvision

        net = getattr(torchvision.models, arch)(weights=None)
        if pretrained:
            net.load_state_dict(_pretrained_state(arch))
            from sskd.models.weights import IMAGENET_NORM

            self.input_norm = (*IMAGENET_NORM, f"torchvision {arch} ImageNet weights")
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        self.feat_dim = net.fc.in_features
        self.fc = net.fc if num_classes == net.fc.out_features else nn.Linear(self.feat_dim, num_classes)

    def stages_and_feat(self, x, preact=False):
        layers = (self.layer1, self.layer2, self.layer3, self.layer4)
        if not preact:
            stages, _ = run_stages(self.stem(x), layers)
            return stages, pool_flat(stages[-1]), None
        x, stages, pres = self.stem(x), [], []
        for layer in layers:
            for block in list(layer)[:-1]:
                x = block(x)
            x, pre = _tv_forward_pre(layer[-1], x)
            stages.append(x)
            pres.append(pre)
        return stages, pool_flat(x), pres

    def branch_spec(self) -> BranchSpec:
        block, n, c = type(self.layer4[0]), len(self.layer4), self.feat_dim
        planes = c // block.expansion
        return BranchSpec(
            [0, 1, 2, 3],
            [None, self.layer2, self.layer3, self.layer4],
            lambda: nn.Sequential(*[block(c, planes) for _ in range(n)]),
            None,
            c,
        )


def _tv_forward_pre(block: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """torchvision's BasicBlock / Bottleneck forward, also returning the sum before the last ReLU."""
    identity = x if block.downsample is None else block.downsample(x)
    out = block.relu(block.bn1(block.conv1(x)))
    out = block.bn2(block.conv2(out))
    if hasattr(block, "conv3"):
        out = block.bn3(block.conv3(block.relu(out)))
    pre = out + identity
    return torch.relu(pre), pre


def _pretrained_state(arch: str) -> dict:
    import torchvision

    weights = torchvision.models.get_model_weights(arch).DEFAULT
    filename = Path(weights.url).name
    path = Path(torch.hub.get_dir()) / "checkpoints" / filename
    if not path.is_file():
        raise SSKDError(
            f"{path}: torchvision's pretrained {arch} weights are not in the local hub cache; "
            f"copy {filename} there (from {weights.url}) or set TORCH_HOME"
        )
    return torch.load(path, map_location="cpu", weights_only=True)


@MODELS.register("torchvision:resnet18")
def tv_resnet18(num_classes: int, pretrained: bool = False) -> nn.Module:
    """torchvision's ImageNet ResNet-18; ``pretrained``: its weights from the local hub cache."""
    return TorchvisionResNet("resnet18", num_classes, pretrained)


@MODELS.register("torchvision:resnet34")
def tv_resnet34(num_classes: int, pretrained: bool = False) -> nn.Module:
    """torchvision's ImageNet ResNet-34; ``pretrained``: its weights from the local hub cache."""
    return TorchvisionResNet("resnet34", num_classes, pretrained)


@MODELS.register("torchvision:resnet50")
def tv_resnet50(num_classes: int, pretrained: bool = False) -> nn.Module:
    """torchvision's ImageNet ResNet-50; ``pretrained``: its weights from the local hub cache."""
    return TorchvisionResNet("resnet50", num_classes, pretrained)
