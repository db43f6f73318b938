"""MobileNetV2 of CRD/SSKD: ``mobile_half`` (expansion 6, width 0.5, stem stride 2) for 32x32 inputs."""

from __future__ import annotations

from torch import nn

from sskd.models.base import BranchSpec, Classifier, init_weights, pool_flat
from sskd.models.registry import MODELS


def _conv_bn(
    cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, relu: bool = True
) -> list[nn.Module]:
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]
    return layers + [nn.ReLU(inplace=True)] if relu else layers


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        mid = cin * expand
        self.cout, self.expand = cout, expand
        self.use_res = stride == 1 and cin == cout
        self.conv = nn.Sequential(
            *_conv_bn(cin, mid, 1),
            *_conv_bn(mid, mid, 3, stride, groups=mid),
            *_conv_bn(mid, cout, 1, relu=False),
        )

    def forward(self, x):
        return x + self.conv(x) if self.use_res else self.conv(x)


class MobileNetV2(Classifier):
    SETTING = [
        (1, 16, 1, 1),
        (None, 24, 2, 1),
        (None, 32, 3, 2),
        (None, 64, 4, 2),
        (None, 96, 3, 1),
        (None, 160, 3, 2),
        (None, 320, 1, 1),
    ]  # (t, c, n, s); None = the expansion T

    def __init__(self, num_classes: int, expand: int = 6, width: float = 0.5):
        super().__init__()
        cin = int(32 * width)
        self.conv1 = nn.Sequential(*_conv_bn(3, cin, 3, stride=2))
        blocks = []
        for t, c, n, s in self.SETTING:
            cout = int(c * width)
            layers = []
            for i in range(n):
                layers.append(InvertedResidual(cin, cout, s if i == 0 else 1, t or expand))
                cin = cout
            blocks.append(nn.Sequential(*layers))
        self.blocks = nn.ModuleList(blocks)
        self.feat_dim = 1280
        self.conv2 = nn.Sequential(*_conv_bn(cin, self.feat_dim, 1))
        self.fc = nn.Linear(self.feat_dim, num_classes)
        init_weights(self)

    maps = slice(0, 4)  # the four block taps, not the final 1x1 conv

    def stages_and_feat(self, x, preact=False):
        x = self.conv1(x)
        stages = []
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in (1, 2, 4, 6):  # CRD's feature taps: after the 24-, 32-, 96- and 320-channel stages
                stages.append(x)
        x = self.conv2(x)
        stages.append(x)
        # linear bottlenecks: the maps have no last ReLU, so RepDistiller's preact maps are the maps
        return stages, pool_flat(x), (stages[self.maps] if preact else None)

    def branch_spec(self) -> BranchSpec:
        # Official mobilenetV2 aux: taps after blocks 1, 2, 4, 6; the last branch is blocks 5-6 at stride
        # 1 (from the 160-channel output); each branch ends in the 1x1 conv to 1280.
        b = self.blocks
        bodies = [None, b[2], nn.Sequential(b[3], b[4]), nn.Sequential(b[5], b[6])]
        c_last = b[6][-1].cout

        def last():
            layers, cin = [], c_last
            for block in (*b[5], *b[6]):
                layers.append(InvertedResidual(cin, block.cout, 1, block.expand))
                cin = block.cout
            return nn.Sequential(*layers)

        return BranchSpec(
            [0, 1, 2, 3],
            bodies,
            last,
            lambda: nn.Sequential(*_conv_bn(c_last, self.feat_dim, 1)),
            self.feat_dim,
        )


@MODELS.register("MobileNetV2")
def mobilenetv2(num_classes: int) -> nn.Module:
    """CRD's ``mobile_half``: MobileNetV2 at expansion 6 and width 0.5 for 32x32 inputs."""
    return MobileNetV2(num_classes)
