"""CIFAR ResNets of CRD/SSKD (resnet8..110, resnet8x4, resnet32x4) and the CIFAR ResNet50."""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from sskd.models.base import BranchSpec, Classifier, init_weights, pool_flat, run_stages
from sskd.models.registry import MODELS


def conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride, 1, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1, self.bn1 = conv3x3(cin, planes, stride), nn.BatchNorm2d(planes)
        self.conv2, self.bn2 = conv3x3(planes, planes), nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or cin != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward_pre(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        pre = self.bn2(self.conv2(out)) + (x if self.downsample is None else self.downsample(x))
        return F.relu(pre), pre

    def forward(self, x):
        return self.forward_pre(x)[0]


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1):
        super().__init__()
        out = planes * 4
        self.conv1, self.bn1 = nn.Conv2d(cin, planes, 1, bias=False), nn.BatchNorm2d(planes)
        self.conv2, self.bn2 = conv3x3(planes, planes, stride), nn.BatchNorm2d(planes)
        self.conv3, self.bn3 = nn.Conv2d(planes, out, 1, bias=False), nn.BatchNorm2d(out)
        self.downsample = None
        if stride != 1 or cin != out:
            self.downsample = nn.Sequential(nn.Conv2d(cin, out, 1, stride, bias=False), nn.BatchNorm2d(out))

    def forward_pre(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        pre = self.bn3(self.conv3(out)) + (x if self.downsample is None else self.downsample(x))
        return F.relu(pre), pre

    def forward(self, x):
        return self.forward_pre(x)[0]


class CifarResNet(Classifier):
    """ResNet-(6n+2) with widths ``filters`` = (stem, stage1, stage2, stage3) (CRD's resnet.py)."""

    def __init__(self, depth: int, filters: tuple[int, int, int, int], num_classes: int):
        super().__init__()
        n = (depth - 2) // 6
        self.conv1, self.bn1 = conv3x3(3, filters[0]), nn.BatchNorm2d(filters[0])
        cin, layers = filters[0], []
        for i, planes in enumerate(filters[1:]):
            blocks = [
                BasicBlock(cin if j == 0 else planes, planes, 2 if (i > 0 and j == 0) else 1)
                for j in range(n)
            ]
            layers.append(nn.Sequential(*blocks))
            cin = planes
        self.layer1, self.layer2, self.layer3 = layers
        self.feat_dim = cin
        self.fc = nn.Linear(cin, num_classes)
        init_weights(self)

    def stages_and_feat(self, x, preact=False):
        stages, pre = run_stages(
            F.relu(self.bn1(self.conv1(x))), (self.layer1, self.layer2, self.layer3), preact
        )
        return stages, pool_flat(stages[-1]), pre

    def branch_spec(self) -> BranchSpec:
        n, c = len(self.layer3), self.feat_dim
        return BranchSpec(
            [0, 1, 2],
            [None, self.layer2, self.layer3],
            lambda: nn.Sequential(*[BasicBlock(c, c, 1) for _ in range(n)]),
            None,
            c,
        )


class CifarResNet50(Classifier):
    """Bottleneck ResNet-50 for 32x32 inputs: 3x3 stem, no max-pool (CRD's resnetv2.py)."""

    def __init__(self, num_classes: int, blocks=(3, 4, 6, 3)):
        super().__init__()
        self.conv1, self.bn1 = conv3x3(3, 64), nn.BatchNorm2d(64)
        cin, layers = 64, []
        for i, (planes, n) in enumerate(zip((64, 128, 256, 512), blocks)):
            stage = []
            for j in range(n):
                stage.append(Bottleneck(cin, planes, 2 if (i > 0 and j == 0) else 1))
                cin = planes * 4
            layers.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.feat_dim = cin
        self.fc = nn.Linear(cin, num_classes)
        init_weights(self)

    def stages_and_feat(self, x, preact=False):
        stages, pre = run_stages(
            F.relu(self.bn1(self.conv1(x))), (self.layer1, self.layer2, self.layer3, self.layer4), preact
        )
        return stages, pool_flat(stages[-1]), pre

    def branch_spec(self) -> BranchSpec:
        n, c = len(self.layer4), self.feat_dim
        return BranchSpec(
            [0, 1, 2, 3],
            [None, self.layer2, self.layer3, self.layer4],
            lambda: nn.Sequential(*[Bottleneck(c, c // 4, 1) for _ in range(n)]),
            None,
            c,
        )


CIFAR_WIDTHS = (16, 16, 32, 64)  # stem, stage 1, stage 2, stage 3
X4_WIDTHS = (32, 64, 128, 256)  # the x4 models: 4x the stages, 2x the stem


@MODELS.register("resnet8")
def resnet8(num_classes: int) -> nn.Module:
    """CIFAR ResNet-8 (1 basic block a stage, widths 16/16/32/64)."""
    return CifarResNet(8, CIFAR_WIDTHS, num_classes)


@MODELS.register("resnet14")
def resnet14(num_classes: int) -> nn.Module:
    """CIFAR ResNet-14 (2 basic blocks a stage, widths 16/16/32/64)."""
    return CifarResNet(14, CIFAR_WIDTHS, num_classes)


@MODELS.register("resnet20")
def resnet20(num_classes: int) -> nn.Module:
    """CIFAR ResNet-20 (3 basic blocks a stage, widths 16/16/32/64)."""
    return CifarResNet(20, CIFAR_WIDTHS, num_classes)


@MODELS.register("resnet32")
def resnet32(num_classes: int) -> nn.Module:
    """CIFAR ResNet-32 (5 basic blocks a stage, widths 16/16/32/64)."""
    return CifarResNet(32, CIFAR_WIDTHS, num_classes)


@MODELS.register("resnet44")
def resnet44(num_classes: int) -> nn.Module:
    """CIFAR ResNet-44 (7 basic blocks a stage, widths 16/16/32/64)."""
    return CifarResNet(44, CIFAR_WIDTHS, num_classes)


@MODELS.register("resnet56")
def resnet56(num_classes: int) -> nn.Module:
    """CIFAR ResNet-56 (9 basic blocks a stage, widths 16/16/32/64)."""
    return CifarResNet(56, CIFAR_WIDTHS, num_classes)


@MODELS.register("resnet110")
def resnet110(num_classes: int) -> nn.Module:
    """CIFAR ResNet-110 (18 basic blocks a stage, widths 16/16/32/64)."""
    return CifarResNet(110, CIFAR_WIDTHS, num_classes)


@MODELS.register("resnet8x4")
def resnet8x4(num_classes: int) -> nn.Module:
    """CIFAR ResNet-8 with 4x wider stages (stem 32, stages 64/128/256): the usual SSKD/CRD student."""
    return CifarResNet(8, X4_WIDTHS, num_classes)


@MODELS.register("resnet32x4")
def resnet32x4(num_classes: int) -> nn.Module:
    """CIFAR ResNet-32 with 4x wider stages (stem 32, stages 64/128/256): the usual SSKD/CRD teacher."""
    return CifarResNet(32, X4_WIDTHS, num_classes)


@MODELS.register("ResNet50")
def resnet50(num_classes: int) -> nn.Module:
    """Bottleneck ResNet-50 for 32x32 inputs (CRD's resnetv2.py)."""
    return CifarResNet50(num_classes)
