"""ShuffleNet V1 (g=3, 240/480/960) and V2 (116/232/464/1024) of CRD/SSKD for 32x32 inputs."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from sskd.models.base import BranchSpec, Classifier, init_weights, pool_flat, run_stages
from sskd.models.registry import MODELS


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    return rearrange(x, "b (g c) h w -> b (c g) h w", g=groups)


class V1Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, groups: int):
        super().__init__()
        mid = cout // 4
        self.g = 1 if cin == 24 else groups
        self.stride = stride
        self.conv1, self.bn1 = nn.Conv2d(cin, mid, 1, groups=self.g, bias=False), nn.BatchNorm2d(mid)
        self.conv2, self.bn2 = nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False), nn.BatchNorm2d(mid)
        self.conv3, self.bn3 = nn.Conv2d(mid, cout, 1, groups=groups, bias=False), nn.BatchNorm2d(cout)

    def forward_pre(self, x):
        out = channel_shuffle(F.relu(self.bn1(self.conv1(x))), self.g)
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        pre = torch.cat([out, F.avg_pool2d(x, 3, 2, 1)], 1) if self.stride == 2 else out + x
        return F.relu(pre), pre

    def forward(self, x):
        return self.forward_pre(x)[0]


class ShuffleV1(Classifier):
    def __init__(self, num_classes: int, widths=(240, 480, 960), blocks=(4, 8, 4), groups: int = 3):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 24, 1, bias=False), nn.BatchNorm2d(24)
        cin, layers = 24, []
        for w, n in zip(widths, blocks):
            stage = []
            for i in range(n):
                stage.append(V1Block(cin, w - (cin if i == 0 else 0), 2 if i == 0 else 1, groups))
                cin = w
            layers.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3 = layers
        self.groups = groups
        self.feat_dim = widths[-1]
        self.fc = nn.Linear(self.feat_dim, num_classes)
        init_weights(self)

    def stages_and_feat(self, x, preact=False):
        stages, pre = run_stages(
            F.relu(self.bn1(self.conv1(x))), (self.layer1, self.layer2, self.layer3), preact
        )
        return stages, pool_flat(stages[-1]), pre

    def branch_spec(self) -> BranchSpec:
        n, c, g = len(self.layer3), self.feat_dim, self.groups
        return BranchSpec(
            [0, 1, 2],
            [None, self.layer2, self.layer3],
            lambda: nn.Sequential(*[V1Block(c, c, 1, g) for _ in range(n)]),
            None,
            c,
        )


class V2Block(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        c = channels // 2
        self.branch = nn.Sequential(
            nn.Conv2d(c, c, 1, bias=False),
            nn.BatchNorm2d(c),
            nn.ReLU(inplace=True),
            nn.Conv2d(c, c, 3, 1, 1, groups=c, bias=False),
            nn.BatchNorm2d(c),
            nn.Conv2d(c, c, 1, bias=False),
            nn.BatchNorm2d(c),
            nn.ReLU(inplace=True),
        )

    def forward_pre(self, x):
        """Output and RepDistiller's preact: the branch before its last ReLU beside the passed half, unshuffled."""
        x1, x2 = x.chunk(2, dim=1)
        y = self.branch[:-1](x2)
        return channel_shuffle(torch.cat([x1, F.relu(y)], 1), 2), torch.cat([x1, y], 1)

    def forward(self, x):
        x1, x2 = x.chunk(2, dim=1)
        return channel_shuffle(torch.cat([x1, self.branch(x2)], 1), 2)


class V2Down(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        mid = cout // 2
        self.left = nn.Sequential(
            nn.Conv2d(cin, cin, 3, 2, 1, groups=cin, bias=False),
            nn.BatchNorm2d(cin),
            nn.Conv2d(cin, mid, 1, bias=False),
            nn.BatchNorm2d(mid),
            nn.ReLU(inplace=True),
        )
        self.right = nn.Sequential(
            nn.Conv2d(cin, mid, 1, bias=False),
            nn.BatchNorm2d(mid),
            nn.ReLU(inplace=True),
            nn.Conv2d(mid, mid, 3, 2, 1, groups=mid, bias=False),
            nn.BatchNorm2d(mid),
            nn.Conv2d(mid, mid, 1, bias=False),
            nn.BatchNorm2d(mid),
            nn.ReLU(inplace=True),
        )

    def forward(self, x):
        return channel_shuffle(torch.cat([self.left(x), self.right(x)], 1), 2)


class ShuffleV2(Classifier):
    def __init__(self, num_classes: int, widths=(116, 232, 464, 1024), blocks=(3, 7, 3)):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 24, 1, bias=False), nn.BatchNorm2d(24)
        cin, layers = 24, []
        for w, n in zip(widths[:3], blocks):
            layers.append(nn.Sequential(V2Down(cin, w), *[V2Block(w) for _ in range(n)]))
            cin = w
        self.layer1, self.layer2, self.layer3 = layers
        self.widths = widths
        self.conv2, self.bn2 = nn.Conv2d(cin, widths[3], 1, bias=False), nn.BatchNorm2d(widths[3])
        self.feat_dim = widths[3]
        self.fc = nn.Linear(widths[3], num_classes)
        init_weights(self)

    maps = slice(0, 3)  # the three stages, not the final 1x1 conv

    def stages_and_feat(self, x, preact=False):
        stages, pre = run_stages(
            F.relu(self.bn1(self.conv1(x))), (self.layer1, self.layer2, self.layer3), preact
        )
        out = F.relu(self.bn2(self.conv2(stages[-1])))
        return [*stages, out], pool_flat(out), pre

    def branch_spec(self) -> BranchSpec:
        # Taps after the three stages (not the final 1x1 conv); each branch ends in that conv to 1024.
        # at stride 1 the down block becomes a plain block: as many blocks as the stage has
        c, n, w = self.widths[2], len(self.layer3), self.feat_dim
        return BranchSpec(
            [0, 1, 2],
            [None, self.layer2, self.layer3],
            lambda: nn.Sequential(*[V2Block(c) for _ in range(n)]),
            lambda: nn.Sequential(nn.Conv2d(c, w, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True)),
            w,
        )


@MODELS.register("ShuffleV1")
def shufflev1(num_classes: int) -> nn.Module:
    """ShuffleNet V1, 3 groups, stages of 240/480/960 channels, for 32x32 inputs."""
    return ShuffleV1(num_classes)


@MODELS.register("ShuffleV2")
def shufflev2(num_classes: int) -> nn.Module:
    """ShuffleNet V2, stages of 116/232/464 channels and a 1024-channel last conv, for 32x32 inputs."""
    return ShuffleV2(num_classes)
