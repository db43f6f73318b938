"""Storage levels of the teacher cache: how each output a method declares is written, and what that costs.

A *level* gives every cached output one :class:`Storage`:

- ``fp16``: the output as it is, fp16 (format version 3's only form, and ``--exact``'s);
- ``topK``: class scores (``Method.topk_outputs``: logits, HSSAKD's branch logits) as their K largest
  values (fp16), their classes (int16 while the class count is <= 32,767, int32 above) and the
  log-sum-exp of all of them at the temperature the method reads them at (fp32,
  ``Method.topk_temperatures``: SSKD's and KD's T = 4, HSSAKD's 3), so the probability mass outside the
  top K is exact at that temperature (:func:`sskd.cache.dense_from_topk` spreads it evenly);
- ``q8``: class scores of more than 25 classes as 8-bit codes of the whole row: int8 codes around the
  row's midpoint with a per-row fp16 step (``<name>.q``, ``<name>.mid``, ``<name>.step``), every value
  within half a step (the row's range / 254) of the original — scores tied in code with the row's top
  class one step lower, within 1.5 steps, so that the top class stays the teacher's; the softmax does
  not see the midpoint's rounding (a constant shift of a row). ``w + 4`` bytes a row: the compact level's choice wherever it is
  no larger than the top 25 (up to 100 classes; CIFAR-100's logits, HSSAKD's branches on the digits);
- ``topK-dD``: class scores of more than 25 classes as their K largest values (fp16) and classes (as
  ``topK``) over an int8 code of the whole row in D dimensions: the row less a centre, projected on a
  basis of its centred PCA fitted once on the teacher's scores of the first 4,096 rows (stored in the cache
  beside the embeddings' projections, each class's row as int16 levels times a step, so that codes
  times levels sum exactly in float32 and a row reads the same bits in any batch), with a per-row fp16
  scale (``<name>.q``, ``<name>.scale``).
  Reading rebuilds the row from the code, holds every class outside the top K at or below the K-th
  value, and writes the top K over it: the top classes exactly as ``topK`` keeps them, the tail as the
  teacher spread it rather than evenly, and no temperature (a network's logits are an affine function of
  its last features, so a few dimensions hold nearly all of a row; ``docs/cache.md``, "1,000 classes").
  ``K (2 + index bytes) + D + 2`` bytes a row: the compact level's logits above 100 classes;
- ``int8`` / ``int8-dD`` / ``fp16-dD``: embeddings a method reads only through cosine similarities
  (:func:`cosine_outputs`: SSKD's contrastive SS embeddings). Rows are unit-normalised first (the cosine
  does not see the norm), optionally projected to D dimensions by a basis fitted once on the teacher's
  embeddings of the first 4,096 rows and stored in the cache (``projections.safetensors``), then stored
  with a per-row fp16 scale and int8 codes. Reading multiplies back by the basis, so the method sees
  the declared shape; cosines between rows are those of the D-dimensional codes.

The basis spans the uncentred PCA subspace of the unit rows (the top right singular vectors): of all
rank-D projections it keeps the Gram matrix of the fitting rows best in the least-squares sense, which
is what the similarity matrix is (``docs/cache.md`` has the comparison with centred PCA and a random
orthogonal projection on the digits teachers). Inside the subspace it is turned by a fixed random
rotation, and int8 codes store the projected row less the rows' mean, so that no single large
coordinate sets a row's int8 step.

A level's name lists its outputs, ``logits:top10-d64+embed:int8-d128``; ``exact`` is every output fp16.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import numpy as np

from sskd.core.errors import SSKDError

TOPKS = (100, 50, 25, 10, 5)  # the top-K steps --budget and --dry-run consider (below the class count)
EMBED_DIMS = (256, 128, 64, 32, 16)  # the projection steps (below the embedding width, >= MIN_DIM)
MIN_DIM = 8
COMPACT_TOPK = 25  # q8 is for more classes than this (below, fp16 rows are as small as any code)
CODE_TOPK = 10  # the K of the topK-dD steps (the top 10 exact over the code; docs/cache.md, "1,000 classes")
CODE_DIMS = (128, 64, 32)  # their code's dimensions (below the class count, >= MIN_DIM)
# The compact level's logits where q8 is larger than the top 25 (above 100 classes): the top 10 over a
# 64-dimensional code, ImageNet's 4 views x 1,000 classes + int8-d128 embeddings at 952 B per
# image-epoch. Other class scores (HSSAKD's 4K-way branch logits) stay q8 there: their top 25 of 400
# were 70 % off in the aux term and 8 % in the gradient on the 100-class bench, q8 within 0.03 %
# (docs/cache.md, "100 classes"); one basis for rows of several branches is not measured.
COMPACT_CODE = (CODE_TOPK, 64)
COMPACT_TOPK_OUTPUTS = ("logits",)
COMPACT_DIM = 128
COMPACT_MIN_CLASSES = 100  # the default is compact from here up (issue #22: below, fp16 costs little)
COMPACT_MIN_DIM = 128
ID_BYTES = 8
# The ImageNet recipe on paper (docs/cache.md): ResNet-34 teacher (HSSAKD: a branch at each of its 4
# stages), 4 rotation views, d = 512 SS embeddings.
IMAGENET = {"images": 1_281_167, "views": 4, "classes": 1000, "embed_dim": 512, "branches": 4}


@dataclass(frozen=True)
class Storage:
    """How one output is stored: ``kind`` fp16 | q8 | int8 | topk, ``k`` for top-K, ``dim`` for a projection
    (of embeddings) or a code (under top-K class scores)."""

    kind: str = "fp16"
    k: int | None = None
    dim: int | None = None
    # top-K: the temperature at which the tail's mass is exact (``None``: T = 1, a cache written before
    # the temperature was recorded; any run may read it, as before)
    t: float | None = None

    @property
    def name(self) -> str:
        if self.kind == "topk":
            return f"top{self.k}" + (f"-d{self.dim}" if self.dim else "")
        return self.kind + (f"-d{self.dim}" if self.dim else "")

    @classmethod
    def parse(cls, text: str) -> Storage:
        """``fp16``, ``q8``, ``int8``, ``int8-d64``, ``fp16-d64``, ``top25``, ``top10-d64`` -> a Storage; one
        line otherwise."""
        try:
            if text.startswith("top"):
                k, _, dim = text[3:].partition("-d")
                return cls("topk", k=int(k), dim=int(dim) if dim else None)
            if text == "q8":
                return cls("q8")
            kind, _, dim = text.partition("-d")
            if kind in ("fp16", "int8"):
                return cls(kind, dim=int(dim) if dim else None)
        except ValueError:
            pass
        raise SSKDError(f"unknown cache storage {text!r} (fp16, q8, topK, topK-dD, int8, int8-dD or fp16-dD)")

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "k": self.k,
            "dim": self.dim,
            **({"t": self.t} if self.t is not None else {}),
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Storage:
        return cls(d["kind"], d.get("k"), d.get("dim"), d.get("t"))

    def row_bytes(self, width: int) -> int:
        """Bytes of one row of ``width`` values (one view of one output, or one branch of one view)."""
        if self.kind == "topk":
            return self.k * (2 + index_bytes(width)) + (self.dim + 2 if self.dim else 4)
        if self.kind == "q8":
            return width + 4
        d = self.dim or width
        return d + 2 if self.kind == "int8" else 2 * d


def index_bytes(num_classes: int) -> int:
    """int16 class indices while they fit (<= 32,767 classes), int32 above."""
    return 2 if num_classes <= 32767 else 4


def at_temperatures(
    storage: dict[str, Storage], temperatures: dict[str, tuple[float, ...]], method: str
) -> dict[str, Storage]:
    """``storage`` with each top-K output's tail kept exact at the temperature ``method`` reads it at
    (``temperatures``: ``Method.topk_temperatures``); one line when it reads one output at two. A top-K
    over a code (``topK-dD``) keeps the tail itself, at every temperature."""
    out = {}
    for name, s in storage.items():
        if s.kind == "topk" and not s.dim:
            ts = sorted(set(temperatures.get(name, (1.0,))))
            if len(ts) > 1:
                raise SSKDError(
                    f"--method {method} reads {name} at temperatures {' and '.join(f'{t:g}' for t in ts)}: "
                    f"top-K keeps the tail's mass exact at one; store {name} whole (--exact, or a level "
                    "without top-K) or give both terms one temperature"
                )
            s = Storage("topk", k=s.k, t=float(ts[0]))
        out[name] = s
    return out


def level_name(storage: dict[str, Storage]) -> str:
    if all(s.kind == "fp16" and not s.dim for s in storage.values()):
        return "exact"
    return "+".join(f"{n}:{s.name}" for n, s in storage.items())


def parse_level(text: str, names: list[str]) -> dict[str, Storage]:
    """``exact`` or ``logits:top25+embed:int8-d128`` (outputs left out: fp16) over the outputs ``names``."""
    out = {n: Storage() for n in names}
    if text == "exact":
        return out
    for part in text.split("+"):
        name, _, how = part.partition(":")
        if name not in out:
            raise SSKDError(f"cache level {text!r}: no output {name!r} (this cache holds {', '.join(names)})")
        out[name] = Storage.parse(how)
    return out


def cosine_outputs(cls: type, info: dict[str, Any] | None) -> tuple[str, ...]:
    """The outputs of method ``cls`` it reads only through cosine similarities of rows (so unit rows, int8
    and a projection keep what it reads), as the method declares (:meth:`sskd.methods.Method.cosine_outputs`:
    SSKD's ``embed`` when its teacher's SS head is the contrastive one)."""
    declared = getattr(cls, "cosine_outputs", None)
    return tuple(declared(info or {})) if callable(declared) else ()


def allowed(output: dict[str, Any], storage: Storage) -> bool:
    """Whether an output (``{"name", "shape", "topk", "cosine"}`` as in the manifest) may use ``storage``."""
    if storage.kind == "topk":
        width = output["shape"][-1]
        return (
            bool(output.get("topk"))
            and 0 < storage.k < width
            and (storage.dim is None or (width > COMPACT_TOPK and MIN_DIM <= storage.dim < width))
        )
    if storage.kind == "q8":
        return bool(output.get("topk")) and output["shape"][-1] > COMPACT_TOPK
    if storage.kind == "int8" or storage.dim:
        return bool(output.get("cosine")) and (
            storage.dim is None or MIN_DIM <= storage.dim < output["shape"][-1]
        )
    return storage.kind == "fp16"


def ladder(output: dict[str, Any]) -> list[Storage]:
    """The storages an output allows, most faithful first (what --budget and --dry-run walk)."""
    width = output["shape"][-1]
    steps = [Storage()]
    if output.get("topk"):
        if width > COMPACT_TOPK:
            steps += [Storage("q8")]
            steps += [Storage("topk", k=CODE_TOPK, dim=d) for d in CODE_DIMS if MIN_DIM <= d < width]
        steps += [Storage("topk", k=k) for k in TOPKS if k < width]
    if output.get("cosine"):
        steps += [Storage("int8")] + [Storage("int8", dim=d) for d in EMBED_DIMS if MIN_DIM <= d < width]
    return steps


def bytes_per_image(num_views: int, outputs: list[dict[str, Any]], storage: dict[str, Storage]) -> int:
    """Disk per image per epoch: the id and every output of every view at its storage."""
    total = ID_BYTES
    for o in outputs:
        rows = num_views * int(np.prod(o["shape"][:-1], dtype=np.int64))
        total += rows * storage.get(o["name"], Storage()).row_bytes(o["shape"][-1])
    return total


def compact(outputs: list[dict[str, Any]]) -> dict[str, Storage]:
    """The compact level: class scores of more than 25 classes as 8-bit codes (q8), except the logits
    (``COMPACT_TOPK_OUTPUTS``) where q8 is larger than their top 25: their top 10 over a 64-dimensional
    code (``COMPACT_CODE``); int8 unit rows projected to 128 dimensions (where wider) for cosine-only
    embeddings; fp16 for the rest."""
    out = {}
    for o in outputs:
        width = o["shape"][-1]
        if o.get("topk") and width > COMPACT_TOPK:
            q8_fits = Storage("q8").row_bytes(width) <= Storage("topk", k=COMPACT_TOPK).row_bytes(width)
            code = Storage("topk", k=COMPACT_CODE[0], dim=COMPACT_CODE[1])
            out[o["name"]] = Storage("q8") if q8_fits or o["name"] not in COMPACT_TOPK_OUTPUTS else code
        elif o.get("cosine"):
            out[o["name"]] = Storage("int8", dim=COMPACT_DIM if width > COMPACT_DIM else None)
        else:
            out[o["name"]] = Storage()
    return out


def default(outputs: list[dict[str, Any]], num_classes: int) -> tuple[dict[str, Storage], str]:
    """What ``sskd cache`` stores without a storage flag, and why: the compact level for label spaces of
    >= 100 classes with cosine embeddings of >= 128 dimensions (or no embeddings), else exact fp16."""
    cos = [o["shape"][-1] for o in outputs if o.get("cosine")]
    if num_classes >= COMPACT_MIN_CLASSES and all(d >= COMPACT_MIN_DIM for d in cos):
        return compact(outputs), (
            f"{num_classes} classes{f', embeddings of {min(cos)} dims' if cos else ''}: the compact level "
            "(--exact keeps fp16)"
        )
    return {o["name"]: Storage() for o in outputs}, (
        f"{num_classes} classes{f', embeddings of {min(cos)} dims' if cos else ''}: exact fp16 (compact is "
        f"the default from {COMPACT_MIN_CLASSES} classes and {COMPACT_MIN_DIM}-dim embeddings; ask for it "
        "with --budget, --topk or --embed)"
    )


def _penalty(output: dict[str, Any], storage: Storage) -> int:
    return ladder(output).index(storage)


def pareto(num_views: int, outputs: list[dict[str, Any]]) -> list[dict[str, Storage]]:
    """Every combination of the outputs' ladders not beaten by another on both size and faithfulness
    (the summed ladder positions), largest first."""
    combos = []
    for choice in itertools.product(*(ladder(o) for o in outputs)):
        storage = {o["name"]: s for o, s in zip(outputs, choice, strict=True)}
        pen = sum(_penalty(o, s) for o, s in zip(outputs, choice, strict=True))
        combos.append((bytes_per_image(num_views, outputs, storage), pen, storage))
    front, best = [], None
    for size, _, storage in sorted(combos, key=lambda c: (c[1], -c[0])):
        if best is None or size < best:
            front.append((size, storage))
            best = size
    return [s for _, s in sorted(front, key=lambda f: -f[0])]


def for_budget(num_views: int, outputs: list[dict[str, Any]], budget: int) -> dict[str, Storage]:
    """The most faithful level (smallest summed ladder position, then the most bytes) within ``budget``
    bytes per image-epoch; one line naming the smallest level and its cost when none fits."""
    front = pareto(num_views, outputs)
    for storage in sorted(front, key=lambda s: sum(_penalty(o, s[o["name"]]) for o in outputs)):
        if bytes_per_image(num_views, outputs, storage) <= budget:
            return storage
    smallest = front[-1]
    raise SSKDError(
        f"--budget {budget}: no storage level fits; the smallest is {level_name(smallest)} at "
        f"{bytes_per_image(num_views, outputs, smallest):,} B per image-epoch"
    )


def imagenet_views(num_views: int) -> int:
    """Views per image of the ImageNet recipe for a method that trains on ``num_views``: the recipe's 4
    rotation views for an SS method, the normal view alone for one that reads only it (KD, DKD, ...)."""
    return IMAGENET["views"] if num_views > 1 else 1


def imagenet_outputs(outputs: list[dict[str, Any]], num_classes: int) -> list[dict[str, Any]]:
    """The same outputs at the ImageNet recipe's shapes on paper: class scores over 1,000 classes (HSSAKD's
    branches over 4,000 joint classes, as many as ResNet-34 has: 4, whatever the run's teacher has),
    cosine embeddings of 512 dimensions, anything else as it is."""
    out = []
    for o in outputs:
        shape, width = list(o["shape"]), o["shape"][-1]
        if o.get("cosine"):
            shape[-1] = IMAGENET["embed_dim"]
        elif o.get("topk") and width % num_classes == 0:
            shape[-1] = IMAGENET["classes"] * (width // num_classes)
            if len(shape) == 2:  # (branches, joint classes): one row per branch
                shape[0] = IMAGENET["branches"]
        out.append({**o, "shape": shape})
    return out


def check_request(
    outputs: list[dict[str, Any]],
    *,
    exact: bool = False,
    topk: int | None = None,
    embed: str | None = None,
    embed_dim: int | None = None,
    budget: int | None = None,
    level: str | None = None,
) -> None:
    """The storage flags against the outputs' shapes, one line each, before any work."""
    asked = [
        f for f, v in (("--topk", topk), ("--embed", embed), ("--embed-dim", embed_dim)) if v is not None
    ]
    if level is not None:
        other = asked + (["--exact"] if exact else []) + (["--budget"] if budget is not None else [])
        if other:
            raise SSKDError(f"--level {level} names every output's storage: leave out {', '.join(other)}")
        if outputs:
            level_storage(level, outputs)
        return
    if exact and (asked or budget is not None):
        raise SSKDError(f"--exact stores every output in fp16: leave out {', '.join(asked or ['--budget'])}")
    if budget is not None and asked:
        raise SSKDError(f"--budget picks the level itself: leave out {', '.join(asked)}")
    if budget is not None and budget < 1:
        raise SSKDError(f"--budget must be >= 1 byte per image-epoch, not {budget}")
    if topk is not None:
        sizes = [o["shape"][-1] for o in outputs if o.get("topk")]
        if not sizes:
            raise SSKDError("--topk: this method stores no output as top-K (leave --topk out)")
        if not 0 < topk < min(sizes):
            raise SSKDError(
                f"--topk {topk}: must be between 1 and {min(sizes) - 1}, below the {min(sizes)} classes "
                "(or leave it out for all logits)"
            )
    if embed is not None or embed_dim is not None:
        dims = [(o["name"], o["shape"][-1]) for o in outputs if o.get("cosine")]
        if not dims:
            raise SSKDError(
                f"{'--embed-dim' if embed_dim is not None else '--embed'}: this method reads no embedding "
                "through cosines only (nothing to store as int8 or project); leave it out"
            )
        if embed_dim is not None and not MIN_DIM <= embed_dim < min(d for _, d in dims):
            name, d = min(dims, key=lambda x: x[1])
            raise SSKDError(
                f"--embed-dim {embed_dim}: must be between {MIN_DIM} and {d - 1}, below the {d} dims of "
                f"{name} (or leave it out to keep them all)"
            )


def requested(
    outputs: list[dict[str, Any]],
    num_views: int,
    num_classes: int,
    *,
    exact: bool = False,
    topk: int | None = None,
    embed: str | None = None,
    embed_dim: int | None = None,
    budget: int | None = None,
    level: str | None = None,
) -> tuple[dict[str, Storage], str]:
    """The level the flags ask for and a line saying which and why (checked by :func:`check_request`)."""
    check_request(
        outputs, exact=exact, topk=topk, embed=embed, embed_dim=embed_dim, budget=budget, level=level
    )
    if level is not None:
        return level_storage(level, outputs), f"--level {level}"
    if exact:
        return {o["name"]: Storage() for o in outputs}, "--exact: every output fp16"
    if budget is not None:
        s = for_budget(num_views, outputs, budget)
        return s, f"--budget {budget:,}: the most faithful level that fits"
    if topk is None and embed is None and embed_dim is None:
        return default(outputs, num_classes)
    storage = {}
    for o in outputs:
        s = Storage()
        if topk is not None and o.get("topk"):
            s = Storage("topk", k=topk)
        elif o.get("cosine") and (embed is not None or embed_dim is not None):
            s = Storage(embed or "int8", dim=embed_dim)
        storage[o["name"]] = s
    return storage, "as asked"


def level_storage(level: str, outputs: list[dict[str, Any]]) -> dict[str, Storage]:
    """The storage of every output at the level ``level`` names: ``exact``, ``compact`` (the compact level
    for these shapes, whatever the class count) or a level name (``logits:top25+embed:int8-d128``; outputs
    it leaves out are fp16); one line naming the output when it cannot be stored so."""
    if level == "compact":
        return compact(outputs)
    storage = parse_level(level, [o["name"] for o in outputs])
    for o in outputs:
        s = storage[o["name"]]
        if not allowed(o, s):
            width = o["shape"][-1]
            why = (
                f"top-K needs class scores and 0 < K < {width}"
                if s.kind == "topk" and not s.dim
                else f"top-K over a code needs class scores of more than {COMPACT_TOPK} classes, 0 < K < "
                f"{width} and D in {MIN_DIM}..{width - 1}"
                if s.kind == "topk"
                else f"q8 is for class scores of more than {COMPACT_TOPK} classes"
                if s.kind == "q8"
                else f"int8 and projections are for embeddings read only through cosines, D in "
                f"{MIN_DIM}..{width - 1}"
            )
            raise SSKDError(
                f"--level {level}: {o['name']} ({width} wide) cannot be stored as {s.name} ({why}); "
                f"it allows {', '.join(x.name for x in ladder(o))}"
            )
    return storage


def fit_projection(rows: np.ndarray, dim: int) -> dict[str, np.ndarray]:
    """``{"basis": (d, dim), "mean": (dim,)}`` fp32: the subspace of the uncentred PCA of the unit-normalised
    ``rows`` (N, d) — the top right singular vectors, signs fixed so that a refit gives the same basis —
    turned by a fixed random rotation, and the mean of the projected unit rows.

    The mean is subtracted before int8 coding and added back when read: the first component of an
    uncentred PCA is close to the rows' common direction, so without it one coordinate near 1 would set
    every row's int8 step and leave the others coarse (measured: 3x the similarity error at d = 256 -> 128)."""
    x = unit_rows(np.asarray(rows, np.float64).reshape(-1, rows.shape[-1]))
    if x.shape[0] < dim:
        raise SSKDError(
            f"--embed-dim {dim}: the projection is fitted on {x.shape[0]} embedding rows, fewer than its "
            f"{dim} dims (cache more samples, or a smaller --embed-dim)"
        )
    basis = _rotated(_top_directions(x, dim))
    return {"basis": basis, "mean": unit_rows(x.astype(np.float32) @ basis).mean(0).astype(np.float32)}


def fit_code(rows: np.ndarray, dim: int) -> dict[str, np.ndarray]:
    """``{"levels": (w, dim) int16, "step": (w,), "center": (w,)}``: the code of class-score rows (N, w) a
    ``topK-dD`` storage writes: their mean, and the subspace of their centred PCA (the top ``dim`` right
    singular vectors of the rows less the mean, signs fixed) turned by the same fixed random rotation as
    the embeddings' projection — of all rank-``dim`` affine codes the one that keeps the fitting rows best
    in the least-squares sense —, each class's row of the basis stored as integer levels times a step.

    The levels stay within ``code_levels(dim)``, so that a row's int8 codes times them sum, in float32, to
    an integer below 2**24 whatever the order of the sum: reading a row gives the same bits in any batch,
    with any BLAS and thread count (the cache's rows read bit for bit alike however they are batched)."""
    x = np.asarray(rows, np.float64).reshape(-1, rows.shape[-1])
    if x.shape[0] <= dim:
        raise SSKDError(
            f"top-K over a {dim}-dimensional code: its basis is fitted on {x.shape[0]} class-score rows, "
            f"no more than its {dim} dims (cache more samples, or a smaller D)"
        )
    center = x.mean(0)
    basis = _rotated(_top_directions(x - center, dim))
    peak = np.abs(basis).max(1)
    step = (np.where(peak > 0, peak, 1) / code_levels(dim)).astype(np.float32)
    levels = np.rint(basis / step[:, None]).astype(np.int16)
    return {"levels": levels, "step": step, "center": center.astype(np.float32)}


def code_levels(dim: int) -> int:
    """The largest basis level of a ``dim``-dimensional code: 127 x level x dim stays below 2**24, the
    integers float32 holds exactly (1,032 at D = 128, 2,064 at 64)."""
    return min(32767, (2**24 - 1) // (127 * dim))


def code_basis(code: dict[str, np.ndarray]) -> np.ndarray:
    """The (w, D) float32 basis a :func:`fit_code` code stands for (levels x step)."""
    return code["levels"].astype(np.float32) * code["step"][:, None]


def fit_basis(rows: np.ndarray, storage: Storage) -> dict[str, np.ndarray]:
    """The basis an output stored at ``storage`` (one with a ``dim``) is written with, fitted on ``rows``."""
    return fit_code(rows, storage.dim) if storage.kind == "topk" else fit_projection(rows, storage.dim)


def held_out_error(rows: np.ndarray, storage: Storage, basis: dict[str, np.ndarray], temperatures) -> float:
    """How far ``rows`` (n, w) read back from ``storage`` with its fitted ``basis`` are from themselves, in
    what the methods read: for a top-K over a code, the largest over ``temperatures`` of the mean total
    variation between the rows' softmax and the read rows' softmax at that temperature (the old top-K's
    tail mass bounds the same distance); for a projected embedding, the largest error of an entry of the
    rows' cosine-similarity matrix. ``sskd cache`` scores the rows after the ones the basis was fitted on."""
    x = np.asarray(rows, np.float32).reshape(-1, rows.shape[-1])
    back = decode(encode("x", x, storage, basis), "x", storage, x.shape[-1], proj=basis)
    if storage.kind == "topk":
        return max(total_variation(x, back, t) for t in temperatures)
    u, v = unit_rows(x.astype(np.float64)), unit_rows(back.astype(np.float64))
    return float(np.abs(u @ u.T - v @ v.T).max())


def total_variation(x: np.ndarray, y: np.ndarray, t: float) -> float:
    """The mean over rows of the total variation between the softmaxes of class-score rows ``x`` and ``y``
    at temperature ``t`` (half the L1 distance of the probabilities)."""
    p, q = (
        np.exp(v - v.max(-1, keepdims=True))
        for v in (np.asarray(x, np.float64) / t, np.asarray(y, np.float64) / t)
    )
    return float(0.5 * np.abs(p / p.sum(-1, keepdims=True) - q / q.sum(-1, keepdims=True)).sum(-1).mean())


def _top_directions(x: np.ndarray, dim: int) -> np.ndarray:
    """The top ``dim`` right singular vectors of ``x`` (d, dim), each signed so its largest entry is
    positive (a refit gives the same basis)."""
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    basis = vt[:dim].T
    sign = np.sign(basis[np.abs(basis).argmax(0), np.arange(dim)])
    return basis * np.where(sign == 0, 1, sign)


def _rotated(basis: np.ndarray) -> np.ndarray:
    """``basis`` (d, D) turned by a fixed random rotation inside its subspace, fp32. Inner products in the
    subspace are unchanged, but PCA piles a row's energy into its first coordinates, and one large
    coordinate sets the row's int8 step; rotated, the energy is spread and the step small (the trick of
    rotation-based quantisers)."""
    dim = basis.shape[1]
    q, r = np.linalg.qr(np.random.default_rng(0).normal(size=(dim, dim)))
    return (basis @ (q * np.sign(np.diag(r)))).astype(np.float32)


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length along the last axis (zero rows stay zero)."""
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.where(norm > 0, norm, 1)


def encode(
    name: str, value: np.ndarray, storage: Storage, proj: dict[str, np.ndarray] | None = None
) -> dict[str, np.ndarray]:
    """The stored arrays of one output ``value`` (n, V, ..., w) float32 at ``storage``.

    ``topk``: ``<name>.topv`` fp16, ``<name>.topi`` int16/int32, ``<name>.lse`` fp32 (``t · logsumexp(x / t)``
    at the storage's temperature ``t``, in logit units); with a ``dim``, ``<name>.q`` int8 (..., D) and
    ``<name>.scale`` fp16 (...) instead of the log-sum-exp: the row less ``proj``'s centre on its basis;
    ``q8``: ``<name>.q`` int8 (..., w), ``<name>.mid`` and
    ``<name>.step`` fp16 (...); ``int8``:
    ``<name>.q`` int8 (..., D) and ``<name>.scale`` fp16 (...), unit rows (projected by ``proj`` first, less
    its mean);
    ``fp16``: ``<name>`` (projected unit rows with a ``dim``)."""
    value = np.asarray(value, np.float32)
    if storage.kind == "topk":
        import torch

        x = torch.from_numpy(value)
        top = x.topk(storage.k, dim=-1)
        idx = np.int16 if index_bytes(value.shape[-1]) == 2 else np.int32
        out = {
            f"{name}.topv": top.values.numpy().astype(np.float16),
            f"{name}.topi": top.indices.numpy().astype(idx),
        }
        if storage.dim:
            return {**out, **_int8_rows(name, (value - proj["center"]) @ code_basis(proj))}
        t = storage.t or 1.0
        return {
            **out,
            f"{name}.lse": (t * torch.logsumexp(x.double() / t, dim=-1)).numpy().astype(np.float32),
        }
    if storage.kind == "fp16" and not storage.dim:
        return {name: value.astype(np.float16)}
    if storage.kind == "q8":
        lo, hi = value.min(-1), value.max(-1)
        mid = ((lo + hi) / 2).astype(np.float16)
        m = mid.astype(np.float32)
        half = np.maximum(hi - m, m - lo)
        step = np.where(half > 0, half / 127, 1).astype(np.float16)
        q = np.clip(np.rint((value - m[..., None]) / step.astype(np.float32)[..., None]), -127, 127)
        # The row's top class keeps a code of its own: scores within half a step of it go one step down,
        # so the stored scores still name the teacher's class (a near tie would otherwise pick the first).
        top = value.argmax(-1)[..., None]
        q -= (q == np.take_along_axis(q, top, -1)) & (np.arange(value.shape[-1]) != top)
        return {f"{name}.q": q.astype(np.int8), f"{name}.mid": mid, f"{name}.step": step}
    x = unit_rows(value)
    if storage.dim:
        x = unit_rows(x @ proj["basis"])
    if storage.kind == "fp16":
        return {name: x.astype(np.float16)}
    if storage.dim:
        x = x - proj["mean"]
    return _int8_rows(name, x)


def _int8_rows(name: str, x: np.ndarray) -> dict[str, np.ndarray]:
    """``<name>.q`` int8 codes of the rows of ``x`` with a per-row fp16 step ``<name>.scale`` (the row's
    largest magnitude / 127): every value within half a step."""
    peak = np.abs(x).max(-1)
    scale = np.where(peak > 0, peak / 127, 1).astype(np.float16)
    q = np.clip(np.rint(x / scale.astype(np.float32)[..., None]), -127, 127).astype(np.int8)
    return {f"{name}.q": q, f"{name}.scale": scale}


def _int8_values(arrays: dict[str, np.ndarray], name: str, rows) -> np.ndarray:
    """The rows :func:`_int8_rows` coded, as float32."""
    return (
        np.asarray(arrays[f"{name}.q"][rows], np.float32)
        * np.asarray(arrays[f"{name}.scale"][rows], np.float32)[..., None]
    )


def tail_mass(arrays: dict[str, np.ndarray], name: str, storage: Storage) -> float:
    """The mean probability, at the storage's temperature, of the classes a top-K row leaves out: what
    :func:`sskd.cache.dense_from_topk` spreads evenly, so how much of a KL term top-K may change (a top-K
    over a code, which keeps the tail, has no log-sum-exp to read it from)."""
    t = storage.t or 1.0
    topv = np.asarray(arrays[f"{name}.topv"], np.float64)
    lse = np.asarray(arrays[f"{name}.lse"], np.float64)
    return float(np.clip(1.0 - np.exp((topv - lse[..., None]) / t).sum(-1), 0.0, 1.0).mean())


def decode(
    arrays: dict[str, np.ndarray], name: str, storage: Storage, width: int, rows=slice(None), proj=None
) -> np.ndarray:
    """One output back as float32 (len(rows), V, ..., ``width``) from the arrays :func:`encode` wrote."""
    from sskd.cache import dense_from_topk, put_top

    if storage.kind == "topk" and storage.dim:
        import torch

        topv = np.asarray(arrays[f"{name}.topv"][rows], np.float32)
        topi = np.asarray(arrays[f"{name}.topi"][rows])
        # int8 codes times integer levels: exact in float32 in any order (fit_code), so BLAS may batch the
        # rows as it likes (torch's matmul: 5x numpy's on a batch's rows; a cache read is this)
        q = torch.from_numpy(np.asarray(arrays[f"{name}.q"][rows], np.float32))
        levels = torch.from_numpy(proj["levels"].astype(np.float32))
        x = (q.reshape(-1, q.shape[-1]) @ levels.T).numpy().reshape(topv.shape[:-1] + (width,))
        x *= np.asarray(arrays[f"{name}.scale"][rows], np.float32)[..., None]
        x *= proj["step"]
        x += proj["center"]
        # every class outside the top K at or below the K-th value (as in the teacher's row), then the top K
        np.minimum(x, topv[..., -1:], out=x)
        put_top(x, topv, topi)
        return x
    if storage.kind == "topk":
        return dense_from_topk(
            np.asarray(arrays[f"{name}.topv"][rows], np.float32),
            np.asarray(arrays[f"{name}.topi"][rows]),
            np.asarray(arrays[f"{name}.lse"][rows], np.float32),
            width,
            storage.t or 1.0,
        )
    if storage.kind == "q8":
        x = np.asarray(arrays[f"{name}.q"][rows], np.float32)  # mid + q * step, in place: reads are this
        x *= np.asarray(arrays[f"{name}.step"][rows], np.float32)[..., None]
        x += np.asarray(arrays[f"{name}.mid"][rows], np.float32)[..., None]
        return x
    if storage.kind == "int8":
        x = _int8_values(arrays, name, rows)
        if storage.dim:
            x = x + proj["mean"]
    else:
        x = np.asarray(arrays[name][rows], np.float32)
    return x @ proj["basis"].T if storage.dim else x
