"""Any timm architecture as ``timm:NAME`` behind the project's model interface.

``create_model("timm:NAME", K)`` looks ``NAME`` up in timm when it is asked for (timm is imported then, never
when :mod:`sskd.models` is), builds it with ``K`` classes and no pretrained weights, and wraps it in
:class:`TimmClassifier`:

- ``model(x)`` is timm's own ``model(x)``;
- ``model(x, features=True)``: ``feat`` is timm's pooled pre-logits feature (``forward_head(pre_logits=True)``),
  ``stages`` every output ``feature_info`` lists (``forward_intermediates``, NCHW for vision transformers too:
  their patch tokens on the patch grid), ``maps`` the ones the feature methods read: the stages at stride 4
  and deeper for a network whose stages shrink the image (the stem is not a stage, as RepDistiller's
  ``feat[1:-1]``), four evenly spaced blocks for one whose blocks all keep the patch grid (a ViT);
- ``features="preact"`` (AB): the maps before their last ReLU. A residual stage that ends in a ReLU (timm's
  ResNets) gives the input of that ReLU; a stage whose last block ends in a residual sum with no activation
  after it (ConvNeXt, EfficientNet/MobileNet inverted residuals, ViT blocks) gives its maps themselves, as the
  built-in MobileNetV2 does; any other architecture refuses (:attr:`TimmClassifier.preact_refusal`);
- :meth:`TimmClassifier.branch_spec`, HSSAKD's branch layout, for networks made of a sequence of stages or
  blocks: timm's ResNets, ConvNeXts, EfficientNets/MobileNets and ViTs. Branch l runs fresh copies of the
  stages (blocks for a ViT) after its tap; the last branch runs a 1x1 convolution back to the last stage's
  input width and a copy of the last stage at stride 1 (a ViT: a copy of its last group of blocks).
"""

from __future__ import annotations

import copy
import difflib

import torch
from torch import nn

from sskd.core.errors import SSKDError
from sskd.models.base import BranchSpec, Classifier, Features

PREFIX = "timm:"
MAP_COUNT = 4  # maps a ViT gives the feature methods: as many as a CNN's stages at strides 4, 8, 16 and 32


def create_timm(name: str, num_classes: int, **kw) -> TimmClassifier:
    """``timm:NAME`` (``name`` is the whole registry name); an unknown NAME is one line with timm's closest."""
    model_name = name[len(PREFIX) :]
    import timm
    from timm.models import split_model_name_tag

    if not timm.is_model(split_model_name_tag(model_name)[0]):
        raise SSKDError(unknown_message(model_name))
    return TimmClassifier(model_name, num_classes, **kw)


def unknown_message(model_name: str) -> str:
    """The one line for a name timm does not know, with its closest names (timm's list is read only here)."""
    import timm

    close = difflib.get_close_matches(model_name, timm.list_models(), n=5, cutoff=0.5)
    hint = f"; closest: {', '.join(PREFIX + c for c in close)}" if close else ""
    return (
        f"unknown timm model '{PREFIX}{model_name}' (timm {timm.__version__}; a newer timm may know it){hint}; "
        f"all names: python -c \"import timm; print(timm.list_models('*{model_name[:4]}*'))\""
    )


def _family(net: nn.Module) -> str | None:
    """The families whose stage layout this module knows (branches, pre-activations); None for others."""
    from timm.models.convnext import ConvNeXt
    from timm.models.efficientnet import EfficientNet
    from timm.models.mobilenetv3 import MobileNetV3
    from timm.models.resnet import ResNet
    from timm.models.vision_transformer import VisionTransformer

    for family, cls in (
        ("resnet", ResNet),
        ("convnext", ConvNeXt),
        ("efficientnet", EfficientNet),
        ("mobilenetv3", MobileNetV3),
        ("vit", VisionTransformer),
    ):
        if isinstance(net, cls):
            return family
    return None


def _last_block(module: nn.Module) -> nn.Module:
    """A tapped stage's last block (the stage itself when it is one block, as a ViT block is)."""
    blocks = getattr(module, "blocks", module)
    return blocks[-1] if isinstance(blocks, nn.Sequential) and len(blocks) else module


def _preact_source(block: nn.Module) -> nn.Module | str | None:
    """Where a stage's pre-activation is: the block's last ReLU (its input), ``"linear"`` when the block ends
    in a residual sum with nothing after it (the map is its own pre-activation), None when unknown."""
    from timm.models._efficientnet_blocks import EdgeResidual, InvertedResidual
    from timm.models.convnext import ConvNeXtBlock
    from timm.models.resnet import BasicBlock, Bottleneck
    from timm.models.vision_transformer import Block

    if isinstance(block, Bottleneck):
        return block.act3
    if isinstance(block, BasicBlock):
        return block.act2
    if isinstance(block, (InvertedResidual, EdgeResidual, ConvNeXtBlock, Block)):
        return "linear"
    return None


def map_indices(reductions: list[int]) -> list[int]:
    """Which stages are the feature methods' maps: four evenly spaced ones when every stage keeps the same
    grid (a ViT's blocks), else the stages at stride 4 and deeper (not the stem)."""
    n = len(reductions)
    if n and len(set(reductions)) == 1:
        k = min(MAP_COUNT, n)
        return [(i + 1) * n // k - 1 for i in range(k)]
    deep = [i for i, r in enumerate(reductions) if r >= 4]
    return deep or list(range(n))


class TokenBlocks(nn.Module):
    """ViT blocks on an NCHW map of patch tokens: flatten to tokens, run the blocks, fold back to NCHW."""

    def __init__(self, blocks: list[nn.Module]):
        super().__init__()
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.blocks(x.flatten(2).transpose(1, 2))
        return y.transpose(1, 2).reshape(b, c, h, w)


class ChannelNorm(nn.Module):
    """A token LayerNorm applied over the channels of an NCHW map (a ViT's final norm for a branch)."""

    def __init__(self, norm: nn.Module):
        super().__init__()
        self.norm = norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def _restride(module: nn.Module) -> nn.Module:
    """``module`` at stride 1: strided convolutions keep the grid (a patchify convolution, kernel = stride,
    becomes 1x1) and strided pooling goes."""
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Conv2d) and child.stride != (1, 1):
            if child.kernel_size == child.stride and child.padding == (0, 0):
                child = nn.Conv2d(
                    child.in_channels, child.out_channels, 1, groups=child.groups, bias=child.bias is not None
                )
            else:
                child.stride = (1, 1)
            setattr(module, name, child)
        elif isinstance(child, (nn.AvgPool2d, nn.MaxPool2d)) and child.stride not in (1, (1, 1)):
            setattr(module, name, nn.Identity())
        else:
            _restride(child)
    return module


class TimmClassifier(Classifier):
    """A timm model (``self.net``) answering the project's interface; see the module docstring. It overrides
    :meth:`forward` whole (timm computes the stages, the feature and the logits), so it has no ``fc``."""

    def __init__(self, model_name: str, num_classes: int, *, pretrained: bool = False, **kw):
        super().__init__()
        import timm

        self.arch = PREFIX + model_name
        if pretrained:  # from the local Hugging Face cache (sskd.models.weights); timm fits the head
            from sskd.models.weights import pretrained_cfg, pretrained_file, read_state_dict

            cfg = pretrained_cfg(model_name)
            self.pretrained_file = pretrained_file(model_name)
            kw["pretrained_cfg_overlay"] = {"state_dict": read_state_dict(self.pretrained_file)}
            full = f"{cfg.architecture}.{cfg.tag}" if cfg.tag else cfg.architecture
            self.input_norm = (tuple(cfg.mean), tuple(cfg.std), f"timm:{full} pretrained config")
            self.input_size = tuple(cfg.input_size)
        try:
            self.net = timm.create_model(model_name, pretrained=pretrained, num_classes=num_classes, **kw)
        except RuntimeError as exc:  # timm's own refusals (an unknown pretrained tag, ...)
            raise SSKDError(f"{self.arch}: {exc}") from None
        self.feat_dim = int(getattr(self.net, "head_hidden_size", None) or self.net.num_features)
        patch = getattr(self.net, "patch_embed", None)  # a ViT built for one size asserts it at every call
        if getattr(patch, "strict_img_size", False) and not getattr(self.net, "dynamic_img_size", False):
            self.fixed_input_size = tuple(int(v) for v in patch.img_size)
        info = list(getattr(self.net, "feature_info", None) or [])
        self.has_stages = bool(info) and hasattr(self.net, "forward_intermediates")
        self.tap_names = [f["module"] for f in info] if self.has_stages else []
        self.map_index = map_indices([f["reduction"] for f in info]) if self.has_stages else []
        self.family = _family(self.net)

    @property
    def preact_refusal(self) -> str | None:
        """Why this model has no pre-activation maps (None when it has them), for AB's one-line refusal."""
        if not self.has_stages:
            return f"{self.arch} gives no stage maps (timm has no forward_intermediates for it)"
        unknown = [
            n for n in self._map_names() if _preact_source(_last_block(self.net.get_submodule(n))) is None
        ]
        if unknown:
            return (
                f"{self.arch}'s map {unknown[0]} does not end in a ReLU or a residual sum this wrapper knows, "
                "so it has no pre-activation map"
            )
        return None

    def _map_names(self) -> list[str]:
        return [self.tap_names[i] for i in self.map_index]

    def forward(self, x: torch.Tensor, features: bool | str = False):
        """timm's logits; with ``features=True`` :class:`Features`; with ``features="preact"`` also ``preact``."""
        if features not in (False, True, "preact"):
            raise ValueError(f"features must be False, True or 'preact', not {features!r}")
        if features == "preact":
            return self._with_preact(x)
        try:
            return self.net(x) if not features else self._features(x)
        except AssertionError as exc:  # timm asserts a fixed input size (a ViT's patch grid, ...)
            raise SSKDError(
                f"{self.arch} on {x.shape[-2]}x{x.shape[-1]} inputs: {exc} (set data.size to its size, or pick "
                "a timm model built for this one)"
            ) from None

    def _features(self, x: torch.Tensor) -> Features:
        if not self.has_stages:
            final, stages = self.net.forward_features(x), []
        else:
            final, stages = self.net.forward_intermediates(x)
        feat = self.net.forward_head(final, pre_logits=True)
        logits = self.net.forward_head(final)
        return Features(logits, feat, stages, [stages[i] for i in self.map_index])

    def _with_preact(self, x: torch.Tensor) -> Features:
        why = self.preact_refusal
        if why:
            raise SSKDError(f"features='preact' (AB): {why}")
        caught: dict[int, torch.Tensor] = {}
        hooks = []
        for i, name in enumerate(self._map_names()):
            source = _preact_source(_last_block(self.net.get_submodule(name)))
            if isinstance(source, nn.Module):  # the ReLU may work in place: keep a copy of its input

                def grab(_module, args, i=i):
                    caught[i] = args[0].clone()

                hooks.append(source.register_forward_pre_hook(grab))
        try:
            f = self.forward(x, features=True)
        finally:
            for h in hooks:
                h.remove()
        return f._replace(preact=[caught.get(i, m) for i, m in enumerate(f.maps)])

    def _bodies(self, taps: list[int]) -> list[nn.Module | None]:
        """``bodies[j]``: the modules that take stage ``taps[j - 1]``'s output to stage ``taps[j]``'s (the
        siblings between the two tapped modules); ``bodies[0]`` is None."""
        bodies: list[nn.Module | None] = [None]
        for a, b in zip(taps, taps[1:]):
            pa, _, ca = self.tap_names[a].rpartition(".")
            pb, _, cb = self.tap_names[b].rpartition(".")
            if pa != pb:
                raise NotImplementedError(
                    f"its stages {self.tap_names[a]} and {self.tap_names[b]} are not in one sequence"
                )
            names = [n for n, _ in self.net.get_submodule(pa).named_children()]
            parent = self.net.get_submodule(pa)
            parts = [getattr(parent, n) for n in names[names.index(ca) + 1 : names.index(cb) + 1]]
            bodies.append(TokenBlocks(parts) if self.family == "vit" else nn.Sequential(*parts))
        return bodies

    def branch_spec(self) -> BranchSpec:
        """Taps at the feature methods' maps; see the module docstring for what each branch runs."""
        if self.family is None or not self.has_stages:
            raise NotImplementedError(
                f"no branch layout is known for its family ({type(self.net).__name__}); timm:NAME branches "
                "are built for ResNet, ConvNeXt, EfficientNet/MobileNet and ViT models"
            )
        taps = list(self.map_index)
        if len(taps) < 2:
            raise NotImplementedError(f"it has {len(taps)} stage map, branches need two or more")
        bodies = self._bodies(taps)
        widths = [int(self.net.feature_info[i]["num_chs"]) for i in taps]
        if self.family == "vit":
            return BranchSpec(
                taps,
                bodies,
                lambda: copy.deepcopy(bodies[-1]),
                lambda: ChannelNorm(copy.deepcopy(self.net.norm)),
                widths[-1],
            )
        c_in, c_out = widths[-2], widths[-1]

        def last() -> nn.Module:
            back = nn.Sequential(nn.Conv2d(c_out, c_in, 1, bias=False), nn.BatchNorm2d(c_in))
            return nn.Sequential(back, _restride(copy.deepcopy(bodies[-1])))

        if self.family == "efficientnet":  # each branch ends in the 1x1 convolution to the head's width
            tail = lambda: nn.Sequential(copy.deepcopy(self.net.conv_head), copy.deepcopy(self.net.bn2))  # noqa: E731
            return BranchSpec(taps, bodies, last, tail, self.feat_dim)
        return BranchSpec(taps, bodies, last, None, c_out)
