"""VGG-BN of CRD/SSKD for 32x32 inputs: vgg8, vgg11, vgg13, vgg16, vgg19."""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from sskd.models.base import BranchSpec, Classifier, init_weights, pool_flat
from sskd.models.registry import MODELS

CFG = {
    "vgg8": [[64], [128], [256], [512], [512]],
    "vgg11": [[64], [128], [256, 256], [512, 512], [512, 512]],
    "vgg13": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    "vgg16": [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
    "vgg19": [[64, 64], [128, 128], [256, 256, 256, 256], [512, 512, 512, 512], [512, 512, 512, 512]],
}


def _block(widths: list[int], cin: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for w in widths:
        layers += [nn.Conv2d(cin, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
        cin = w
    return nn.Sequential(*layers[:-1])  # the last ReLU is applied in forward (CRD keeps pre-activations)


class VGG(Classifier):
    def __init__(self, cfg: list[list[int]], num_classes: int):
        super().__init__()
        cins = [3] + [c[-1] for c in cfg[:-1]]
        self.blocks = nn.ModuleList(_block(c, cin) for c, cin in zip(cfg, cins))
        self.feat_dim = 512
        self.fc = nn.Linear(512, num_classes)
        init_weights(self)

    maps = slice(1, 5)  # blocks 1-4 (block 0 is RepDistiller's stem map f0)

    def stages_and_feat(self, x, preact=False):
        h = x.shape[2]
        stages, pres = [], []
        for i, block in enumerate(self.blocks):
            pre = block(x)
            pres.append(pre)
            x = F.relu(pre)
            stages.append(x)
            if i < 3 or (i == 3 and h == 64):  # CRD pools after blocks 0-2 (and 3 for 64 px inputs)
                x = F.max_pool2d(x, 2, 2)
        return stages, pool_flat(x), (pres[self.maps] if preact else None)

    def branch_spec(self) -> BranchSpec:
        # Official vgg aux (32 px): taps after blocks 0, 1, 2 and 4; the last branch is block 3 again
        # (512 channels in) and block 4.
        b = self.blocks

        def stage(*parts):
            return nn.Sequential(*[m for p in parts for m in (p, nn.ReLU(inplace=True))])

        pool = nn.MaxPool2d(2, 2)
        bodies = [
            None,
            nn.Sequential(pool, stage(b[1])),
            nn.Sequential(pool, stage(b[2])),
            nn.Sequential(pool, stage(b[3], b[4])),
        ]
        c3 = [m.out_channels for m in b[3] if isinstance(m, nn.Conv2d)]
        c4 = [m.out_channels for m in b[4] if isinstance(m, nn.Conv2d)]
        return BranchSpec([0, 1, 2, 4], bodies, lambda: stage(_block(c3, 512), _block(c4, c3[-1])), None, 512)


@MODELS.register("vgg8")
def vgg8(num_classes: int) -> nn.Module:
    """VGG-8 (BatchNorm, 32x32 inputs): 5 convolutions in 5 blocks (``CFG["vgg8"]``) and a linear layer."""
    return VGG(CFG["vgg8"], num_classes)


@MODELS.register("vgg11")
def vgg11(num_classes: int) -> nn.Module:
    """VGG-11 (BatchNorm, 32x32 inputs): 8 convolutions in 5 blocks (``CFG["vgg11"]``) and a linear layer."""
    return VGG(CFG["vgg11"], num_classes)


@MODELS.register("vgg13")
def vgg13(num_classes: int) -> nn.Module:
    """VGG-13 (BatchNorm, 32x32 inputs): 10 convolutions in 5 blocks (``CFG["vgg13"]``) and a linear layer."""
    return VGG(CFG["vgg13"], num_classes)


@MODELS.register("vgg16")
def vgg16(num_classes: int) -> nn.Module:
    """VGG-16 (BatchNorm, 32x32 inputs): 13 convolutions in 5 blocks (``CFG["vgg16"]``) and a linear layer."""
    return VGG(CFG["vgg16"], num_classes)


@MODELS.register("vgg19")
def vgg19(num_classes: int) -> nn.Module:
    """VGG-19 (BatchNorm, 32x32 inputs): 16 convolutions in 5 blocks (``CFG["vgg19"]``) and a linear layer."""
    return VGG(CFG["vgg19"], num_classes)
