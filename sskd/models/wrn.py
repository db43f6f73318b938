"""Wide ResNets of CRD/SSKD: wrn_16_1, wrn_16_2, wrn_40_1, wrn_40_2 (pre-activation blocks)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from sskd.models.base import BranchSpec, Classifier, init_weights, pool_flat, run_stages
from sskd.models.registry import MODELS


class WideBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(cout), nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.equal = cin == cout
        self.shortcut = None if self.equal else nn.Conv2d(cin, cout, 1, stride, 0, bias=False)

    def forward(self, x):
        pre = F.relu(self.bn1(x))
        out = self.conv2(F.relu(self.bn2(self.conv1(pre))))
        return out + (x if self.equal else self.shortcut(pre))


class WideResNet(Classifier):
    def __init__(self, depth: int, widen: int, num_classes: int):
        super().__init__()
        n = (depth - 4) // 6
        widths = (16, 16 * widen, 32 * widen, 64 * widen)
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        blocks = []
        for i in range(3):
            cin, cout = widths[i], widths[i + 1]
            blocks.append(
                nn.Sequential(
                    *[
                        WideBlock(cin if j == 0 else cout, cout, (1 if i == 0 else 2) if j == 0 else 1)
                        for j in range(n)
                    ]
                )
            )
        self.block1, self.block2, self.block3 = blocks
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.feat_dim = widths[3]
        self.fc = nn.Linear(widths[3], num_classes)
        init_weights(self)
        nn.init.zeros_(self.fc.bias)

    def stages_and_feat(self, x, preact=False):
        # Stage maps are the blocks' outputs, pre-activation sums (WRN's blocks normalise their input
        # first); the pooled feature follows the final BN + ReLU. ``preact`` is RepDistiller's: each map
        # through the BN that normalises it next (a second call of that BN, as RepDistiller does).
        stages, _ = run_stages(self.conv1(x), (self.block1, self.block2, self.block3))
        pre = None
        if preact:
            pre = [self.block2[0].bn1(stages[0]), self.block3[0].bn1(stages[1]), self.bn1(stages[2])]
        return stages, pool_flat(F.relu(self.bn1(stages[-1]))), pre

    def branch_spec(self) -> BranchSpec:
        # As the official wrn aux: taps are the pre-activation sums, each branch ends in its own BN + ReLU.
        n, c = len(self.block3), self.feat_dim
        return BranchSpec(
            [0, 1, 2],
            [None, self.block2, self.block3],
            lambda: nn.Sequential(*[WideBlock(c, c, 1) for _ in range(n)]),
            lambda: nn.Sequential(nn.BatchNorm2d(c), nn.ReLU(inplace=True)),
            c,
        )


@MODELS.register("wrn_16_1")
def wrn_16_1(num_classes: int) -> nn.Module:
    """Wide ResNet-16-1: depth 16, widen factor 1 (widths 16/16/32/64)."""
    return WideResNet(16, 1, num_classes)


@MODELS.register("wrn_16_2")
def wrn_16_2(num_classes: int) -> nn.Module:
    """Wide ResNet-16-2: depth 16, widen factor 2 (widths 16/32/64/128)."""
    return WideResNet(16, 2, num_classes)


@MODELS.register("wrn_40_1")
def wrn_40_1(num_classes: int) -> nn.Module:
    """Wide ResNet-40-1: depth 40, widen factor 1 (widths 16/16/32/64)."""
    return WideResNet(40, 1, num_classes)


@MODELS.register("wrn_40_2")
def wrn_40_2(num_classes: int) -> nn.Module:
    """Wide ResNet-40-2: depth 40, widen factor 2 (widths 16/32/64/128)."""
    return WideResNet(40, 2, num_classes)
