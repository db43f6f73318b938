"""The view registry: every view is one registered object, so a new view is one class in one place.

A :class:`View` says everything the plan, the DALI graph, the torchvision reference and the finishing
step need to know about it:

- (a) its parameters: the plan slots it draws (:attr:`View.slots`) and :meth:`View.params`, the operator
  arguments of a batch from those uniforms (a pure function of (seed, epoch, id, view) through
  :func:`pipelines.plan.view_params`), with their names (:meth:`View.param_names`, one DALI node each);
  and the labels it carries for a pretext task (:attr:`View.labels`, :meth:`View.label`: the rotation's
  quarter turns, the jigsaw's permutation index), recomputed on the torch side from the same plan;
- (b) its DALI graph (:meth:`View.dali`): uint8 HWC, colour drop one channel;
- (c) its exact torch reference (:meth:`View.reference`), how close DALI must come to it
  (:attr:`View.tolerance`, :attr:`View.resized_tolerance`) and, optionally, the obvious torchvision
  implementation the benchmark compares against (:meth:`View.baseline`);
- (d) whether the finishing step applies its colour matrices ``M``, ``T`` (:attr:`View.colour`) or
  turns it by its per-sample quarter turns ``k`` (:attr:`View.turns`), and whether it is made from the
  image's luma (:attr:`View.luma`, computed once per image).

``pipelines/plan.py``, ``dali.py``, ``reference.py`` and ``finish.py`` loop over the views of a set
and ask them; none names a view. Your own view::

    from pipelines.view_registry import CropView, register_view

    @register_view("vflip")
    class VFlip(CropView):
        '''Its own crop, turned upside down.'''

        def after_dali(self, v, prm, *, view, size):
            from nvidia.dali import fn
            return fn.flip(v, horizontal=0, vertical=1)

        def after_reference(self, v, prm, *, view, size):
            return v.flip(1)

after which ``--views vflip,rot90`` (or ``ViewConfig(("vflip",))``) works in every command.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np

from pipelines import params
from pipelines.colors import gray_u8, jitter_matrices
from sskd.core.errors import SSKDError
from sskd.core.registry import Registry

VIEWS = Registry("view")
Uniforms = Callable[[int], np.ndarray]  # slot -> this view's float32 uniforms (n,) for the batch's ids


def register_view(name: str, **attrs: Any) -> Callable[[type], type]:
    """Class decorator: ``@register_view("jigsaw")`` registers one instance of the class under ``name``.

    ``attrs`` are set on that instance, so one class registers several views that differ only in them
    (``@register_view("rot90", k=1)``).
    """

    def deco(cls: type) -> type:
        view = cls()
        view.name = name
        for key, value in attrs.items():
            setattr(view, key, value)
        VIEWS.register(name)(view)
        return cls

    return deco


def get_view(name: str) -> View:
    return VIEWS.get(name)


def view_names() -> tuple[str, ...]:
    """Every registered view, ``normal`` first, then in registration order."""
    return tuple(VIEWS.names())


class View:
    """One kind of view (see the module docstring). Subclass :class:`CropView` for a view of its own crop,
    :class:`SharedView` for one made from view 0's pixels."""

    name: str = ""  # the registered name (set by :func:`register_view`)
    colour: ClassVar[bool] = False  # the finishing step applies its M (3, 3), T (3,) (pipelines.finish)
    # The finishing step turns it by its per-sample ``k`` quarter turns (parameter ``v{view}.k``): the
    # turn rides along with the layout copy there instead of costing DALI a warp of its own.
    turns: ClassVar[bool] = False
    luma: ClassVar[bool] = False  # made from the image's luma: DALI hands over one channel
    labels: ClassVar[tuple[str, ...]] = ()  # pretext label kinds this view carries (:meth:`label`)
    # How far the DALI view may be from :meth:`reference`, in 0-255 levels (tests/test_views.py checks every
    # registered view): ``tolerance`` is the largest difference in the CIFAR layout, where nothing is
    # resampled down (0: the same pixels, bit for bit); ``resized_tolerance`` the mean difference in the
    # ImageNet layout, where torchvision's integer-rounded window and antialiasing kernel stand in for DALI's
    # (a wrong window, flip or turn is tens of levels).
    tolerance: ClassVar[float] = 0.0
    resized_tolerance: ClassVar[float] = 8.0

    # -- (a) parameters, from the plan --------------------------------------------------------------

    def slots(self) -> list[int]:
        """The plan slots (independent uniforms per sample) this view draws."""
        return []

    def param_names(self, view: int, layout: str) -> list[str]:
        """Names of the arrays :meth:`params` returns, in order (``v{view}.<name>``)."""
        return []

    def params(self, u: Uniforms, *, view: int, layout: str, h_img: np.ndarray, w_img: np.ndarray) -> dict:
        """Every operator argument of this view for a batch: ``{name: (n, ...) array}`` for :meth:`param_names`.

        Args:
            u: ``u(slot)`` the float32 uniforms (n,) of one of :meth:`slots` for this view.
            h_img, w_img: (n,) float32 decoded image heights and widths.
        """
        return {}

    def label(self, kind: str, u: Uniforms, *, view: int, n: int) -> np.ndarray:
        """The view's label of ``kind`` (one of :attr:`labels`) per sample: (n,) int64."""
        raise KeyError(kind)

    # -- (b) DALI graph -----------------------------------------------------------------------------

    def dali(self, img, prm: dict, *, view: int, size: int, gray=None, normal=None):
        """The uint8 HWC view (a DALI DataNode) of the flipped decoded image ``img``.

        Args:
            prm: the batch's parameter nodes by name (:func:`pipelines.dali.params_node`).
            gray: the image's luma (1 channel) when some view of the set has :attr:`luma`, else None.
            normal: view 0's node (for views made from it), None for view 0 itself.
        """
        raise NotImplementedError

    # -- (c) torch reference and torchvision baseline -----------------------------------------------

    def reference(self, img, prm: dict, *, view: int, size: int, normal=None):
        """The same view in torch: (3, size, size) uint8 (float 0-255 for a colour view) of the flipped
        decoded uint8 image ``img`` (3, H, W), with the parameters of row 0 of each ``prm`` array."""
        raise NotImplementedError

    def baseline(self, geo: list, *, size: int, layout: str) -> list | None:
        """torchvision ``transforms.v2`` of this view with its own random draws, after the crop ``geo``
        (the benchmark's honest baseline); None: the view has none."""
        return None


class SharedView(View):
    """A view made from view 0's pixels: no parameters of its own."""


class CropView(View):
    """A view of its own crop of the (shared-flipped) image: a pad-4 random crop (CIFAR layout) or a
    random-resized crop to the output size (ImageNet layout); ``zoom`` makes it a random-resized crop
    with those area scales per layout in both (the crop+resize view). Subclasses add what follows the
    crop (:meth:`after_dali`, :meth:`after_reference`) and their own parameters (:meth:`more_slots`,
    :meth:`more_names`, :meth:`more_params`)."""

    zoom: ClassVar[dict[str, tuple[float, float]] | None] = None

    def _resized(self, layout: str) -> bool:
        return self.zoom is not None or layout == "imagenet"

    def slots(self) -> list[int]:
        return [*params.SLOT_CROP, *self.more_slots()]

    def param_names(self, view: int, layout: str) -> list[str]:
        crop = [f"v{view}.roi_start", f"v{view}.roi_end"] if self._resized(layout) else [f"v{view}.start"]
        return crop + [f"v{view}.{n}" for n in self.more_names()]

    def params(self, u, *, view, layout, h_img, w_img):
        f32 = np.float32
        out = {}
        if self._resized(layout):
            scale = self.zoom[layout] if self.zoom is not None else params.RRC_SCALE
            area = h_img * w_img * (f32(scale[0]) + u(params.SLOT_CROP[0]) * f32(scale[1] - scale[0]))
            lo, hi = f32(np.log(params.RRC_RATIO[0])), f32(np.log(params.RRC_RATIO[1]))
            ratio = np.exp(lo + u(params.SLOT_CROP[1]) * (hi - lo))
            w = np.minimum(np.sqrt(area * ratio), w_img)
            h = np.minimum(np.sqrt(area / ratio), h_img)
            x0, y0 = u(params.SLOT_CROP[2]) * (w_img - w), u(params.SLOT_CROP[3]) * (h_img - h)
            out[f"v{view}.roi_start"] = np.stack([y0, x0], 1).astype(f32)
            out[f"v{view}.roi_end"] = np.stack([y0 + h, x0 + w], 1).astype(f32)
        else:
            span = f32(2 * params.PAD + 1)
            dy = np.floor(u(params.SLOT_CROP[0]) * span).astype(np.int32) - params.PAD
            dx = np.floor(u(params.SLOT_CROP[1]) * span).astype(np.int32) - params.PAD
            out[f"v{view}.start"] = np.stack([dy, dx], 1)
        out.update({f"v{view}.{k}": a for k, a in self.more_params(u).items()})
        return out

    def more_slots(self) -> list[int]:
        return []

    def more_names(self) -> list[str]:
        return []

    def more_params(self, u: Uniforms) -> dict[str, np.ndarray]:
        return {}

    def dali(self, img, prm, *, view, size, gray=None, normal=None):
        from nvidia.dali import fn, types

        if self.luma and gray is not None:  # crop and resample the one luma channel made once per image
            img = gray
        if f"v{view}.start" in prm:  # CIFAR layout: a window of the image zero-padded by PAD
            v = fn.slice(
                img,
                start=prm[f"v{view}.start"],
                shape=[size, size],
                axis_names="HW",
                out_of_bounds_policy="pad",
                fill_values=0,
            )
        else:  # random-resized-crop as one resize of a region of interest
            v = fn.resize(
                img,
                size=[size, size],
                roi_start=prm[f"v{view}.roi_start"],
                roi_end=prm[f"v{view}.roi_end"],
                roi_relative=False,
                interp_type=types.INTERP_LINEAR,
                antialias=True,
            )
        if self.luma and gray is None:  # DALI's own luma of the crop: 20x faster on CPU than a 3x3 matrix
            v = fn.color_space_conversion(v, image_type=types.RGB, output_type=types.GRAY)
        return self.after_dali(v, prm, view=view, size=size)

    def after_dali(self, v, prm: dict, *, view: int, size: int):
        """What follows the crop in the graph (default: nothing)."""
        return v

    def reference(self, img, prm, *, view, size, normal=None):
        import torch
        from torchvision.transforms.v2 import functional as TF

        from pipelines.torch_ops import crop_resize

        if self.luma:  # the luma of the whole image, then one channel cropped and resampled
            img = torch.from_numpy(gray_u8(img.permute(1, 2, 0).numpy())[..., :1]).permute(2, 0, 1)
        if f"v{view}.start" in prm:
            dy, dx = (int(a) for a in prm[f"v{view}.start"][0])
            padded = TF.pad(img, [params.PAD] * 4, fill=0)
            v = padded[:, params.PAD + dy : params.PAD + dy + size, params.PAD + dx : params.PAD + dx + size]
        else:
            (y0, x0), (y1, x1) = prm[f"v{view}.roi_start"][0], prm[f"v{view}.roi_end"][0]
            v = crop_resize(img, float(y0), float(x0), float(y1 - y0), float(x1 - x0), size)
        if self.luma:
            v = v.expand(3, -1, -1)
        return self.after_reference(v, prm, view=view, size=size)

    def after_reference(self, v, prm: dict, *, view: int, size: int):
        """What follows the crop in the reference (default: nothing)."""
        return v

    def baseline(self, geo, *, size, layout):
        if self.zoom is not None:
            from torchvision.transforms import v2

            geo = [
                v2.RandomResizedCrop(size, scale=self.zoom[layout], antialias=True),
                v2.RandomHorizontalFlip(),
            ]
        extra = self.baseline_extra()
        return None if extra is None else [*geo, *extra]

    def baseline_extra(self) -> list | None:
        """torchvision transforms after the crop (None: no baseline)."""
        return None


def _rot_dali(img, k: int):
    """Exact counter-clockwise rotation by k x 90° (np.rot90 on HWC) as transpose + flip."""
    from nvidia.dali import fn

    if k == 1:
        return fn.transpose(fn.flip(img, horizontal=1), perm=[1, 0, 2], output_layout="HWC")
    if k == 2:
        return fn.flip(img, horizontal=1, vertical=1)
    return fn.flip(fn.transpose(img, perm=[1, 0, 2], output_layout="HWC"), horizontal=1)


def _rot_lambda(k: int | None):
    import torch
    from torchvision.transforms import v2

    if k is None:  # uniform in {1, 2, 3}
        return v2.Lambda(lambda x: torch.rot90(x, int(torch.randint(1, 4, ())), dims=(-2, -1)))
    return v2.Lambda(lambda x: torch.rot90(x, k, dims=(-2, -1)))


# -- the built-in views ---------------------------------------------------------------------------------


@register_view("normal")
class Normal(CropView):
    """View 0: the crop (pad-4 random crop, or random-resized crop) and the shared flip. Unrotated."""

    labels = ("rotation",)

    def label(self, kind, u, *, view, n):
        return np.zeros(n, dtype=np.int64)

    def baseline_extra(self):
        return []


@register_view("color_drop")
class ColorDrop(CropView):
    """Grayscale (DALI's luma), replicated to 3 channels by the finishing step."""

    luma = True

    def baseline_extra(self):
        from torchvision.transforms import v2

        return [v2.Grayscale(3)]


@register_view("rotation")
class Rotation(CropView):
    """The paper's rotation: k x 90° counter-clockwise, k uniform in {1, 2, 3}, per sample. DALI hands
    over the unturned crop and the finishing step turns it while it copies the view into the CHW float
    batch (:attr:`View.turns`): exact, and cheaper than DALI's nearest-neighbour warp (``sskd bench
    pipeline``, docs/benchmarks.md), which in turn beat DALI conditionals."""

    labels = ("rotation",)
    turns = True

    def more_slots(self):
        return [params.SLOT_ROT]

    def more_names(self):
        return ["k"]

    def more_params(self, u):
        return {"k": np.floor(u(params.SLOT_ROT) * np.float32(3)).astype(np.int32) + 1}

    def label(self, kind, u, *, view, n):
        return self.more_params(u)["k"].astype(np.int64)

    def after_reference(self, v, prm, *, view, size):
        import torch

        return torch.rot90(v, int(prm[f"v{view}.k"][0]), dims=(1, 2))  # counter-clockwise, as np.rot90

    def baseline_extra(self):
        return [_rot_lambda(None)]


@register_view("crop_resize")
class CropResize(CropView):
    """A random crop resized back to the output size (a zoom-in)."""

    zoom = params.CROP_RESIZE_SCALE

    def baseline_extra(self):
        return []


@register_view("color_distort")
class ColorDistort(CropView):
    """Brightness, contrast, saturation and hue as one 3x3 matrix + offset per sample, applied by the
    finishing step on the float values (:func:`pipelines.colors.jitter_matrices`)."""

    colour = True

    def more_slots(self):
        return list(params.SLOT_JITTER)

    def more_names(self):
        return ["M", "T"]

    def more_params(self, u):
        m, t = jitter_matrices(*(u(s) for s in params.SLOT_JITTER))
        return {"M": m, "T": t}

    def after_reference(self, v, prm, *, view, size):
        from pipelines.torch_ops import affine

        return affine(v, prm[f"v{view}.M"][0], prm[f"v{view}.T"][0])

    def baseline_extra(self):
        from torchvision.transforms import v2

        return [v2.ColorJitter(*params.JITTER)]


@register_view("rot270", k=3)
@register_view("rot180", k=2)
@register_view("rot90", k=1)
class FixedRotation(CropView):
    """The official SSKD code's rotations: its own crop, turned by ``k`` x 90° counter-clockwise."""

    k: int = 0
    labels = ("rotation",)

    def label(self, kind, u, *, view, n):
        return np.full(n, self.k, dtype=np.int64)

    def after_dali(self, v, prm, *, view, size):
        return _rot_dali(v, self.k)

    def after_reference(self, v, prm, *, view, size):
        import torch

        return torch.rot90(v, self.k, dims=(1, 2))

    def baseline_extra(self):
        return [_rot_lambda(self.k)]


@register_view("shared_rot270", k=3)
@register_view("shared_rot180", k=2)
@register_view("shared_rot90", k=1)
class SharedRotation(SharedView):
    """View 0 itself turned by ``k`` x 90° counter-clockwise, exact (as np.rot90): HSSAKD's views."""

    k: int = 0
    labels = ("rotation",)

    def label(self, kind, u, *, view, n):
        return np.full(n, self.k, dtype=np.int64)

    def dali(self, img, prm, *, view, size, gray=None, normal=None):
        return _rot_dali(normal, self.k)

    def reference(self, img, prm, *, view, size, normal=None):
        import torch

        return torch.rot90(normal, self.k, dims=(1, 2)).contiguous()

    def baseline(self, geo, *, size, layout):
        return None  # made from view 0 (BaselineViews turns its view 0)


# Output tile j (row-major: top-left, top-right, bottom-left, bottom-right) shows input tile PERMUTATIONS[p][j].
PERMUTATIONS = tuple(itertools.permutations(range(4)))  # the 24 orders of 2 x 2 tiles, identity first


@register_view("jigsaw")
class Jigsaw(CropView):
    """Its own crop cut into 2 x 2 tiles and reassembled in one of the 24 orders (:data:`PERMUTATIONS`),
    the index ``p`` uniform in 0..23 per sample and view (the jigsaw pretext's label). In the graph: one
    slice per output tile, its source tile's relative start a per-sample argument, then two concatenations
    (exact: no resampling). The output size must be even."""

    labels = ("jigsaw",)

    def more_slots(self):
        return [params.SLOT_PERM]

    def more_names(self):
        return ["perm", *(f"tile{j}" for j in range(4))]

    def more_params(self, u):
        p = np.minimum(np.floor(u(params.SLOT_PERM) * np.float32(len(PERMUTATIONS))), len(PERMUTATIONS) - 1)
        p = p.astype(np.int32)
        src = np.asarray(PERMUTATIONS, dtype=np.int32)[p]  # (n, 4) source tile of each output tile
        out = {"perm": p}
        for j in range(4):  # relative (y, x) start of the source tile of output tile j
            out[f"tile{j}"] = np.stack([src[:, j] // 2, src[:, j] % 2], 1).astype(np.float32) * np.float32(
                0.5
            )
        return out

    def label(self, kind, u, *, view, n):
        return self.more_params(u)["perm"].astype(np.int64)

    @staticmethod
    def _half(size: int) -> int:
        if size % 2:
            raise SSKDError(f"view jigsaw: the output size must be even to cut 2 x 2 tiles, not {size}")
        return size // 2

    def after_dali(self, v, prm, *, view, size):
        from nvidia.dali import fn

        half = self._half(size)
        tiles = [
            fn.slice(v, rel_start=prm[f"v{view}.tile{j}"], shape=[half, half], axis_names="HW")
            for j in range(4)
        ]
        rows = [fn.cat(tiles[0], tiles[1], axis_name="W"), fn.cat(tiles[2], tiles[3], axis_name="W")]
        return fn.cat(*rows, axis_name="H")

    def after_reference(self, v, prm, *, view, size):
        return jigsaw_tiles(v, PERMUTATIONS[int(prm[f"v{view}.perm"][0])])

    def baseline_extra(self):
        import torch
        from torchvision.transforms import v2

        return [v2.Lambda(lambda x: jigsaw_tiles(x, PERMUTATIONS[int(torch.randint(0, 24, ()))]))]


def jigsaw_tiles(v, perm) -> Any:
    """``v`` (..., H, W) with its 2 x 2 tiles reordered: output tile j is input tile ``perm[j]``."""
    import torch

    h, w = v.shape[-2] // 2, v.shape[-1] // 2
    tiles = [v[..., (t // 2) * h : (t // 2 + 1) * h, (t % 2) * w : (t % 2 + 1) * w] for t in range(4)]
    out = [tiles[p] for p in perm]
    return torch.cat([torch.cat(out[:2], dim=-1), torch.cat(out[2:], dim=-1)], dim=-2).contiguous()
