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


for _depth in (8, 14, 20, 32, 44, 56, 110):
    MODELS.register(f"resnet{_depth}")(
        lambda num_classes, d=_depth: CifarResNet(d, (16, 16, 32, 64), num_classes)
    )
MODELS.register("resnet8x4")(lambda num_classes: CifarResNet(8, (32, 64, 128, 256), num_classes))
MODELS.register("resnet32x4")(lambda num_classes: CifarResNet(32, (32, 64, 128, 256), num_classes))
MODELS.register("ResNet50")(lambda num_classes: CifarResNet50(num_classes))
