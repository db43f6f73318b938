"""Where images come from: each source lists its items per split and turns one item into encoded bytes.

A source is read in the main process (listing, labels) and in worker processes (encoding and
validation of one item at a time); workers inherit it through ``fork``, so items are plain indices.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import pickle
import stat
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from shards.format import CIFAR100_MEAN, CIFAR100_STD, IMAGENET_MEAN, IMAGENET_STD
from sskd.core.errors import SSKDError

IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".gif"}


class BadItem(Exception):
    """One source item cannot be used; ``str(exc)`` is the reason, ``exc.path`` the file."""

    def __init__(self, path: str, reason: str):
        super().__init__(reason)
        self.path = path


@dataclass
class Split:
    """The items of one split: a display path and a label per item (index = position)."""

    paths: list[str]
    labels: list[int]
    skipped: list[dict] = field(default_factory=list)  # found while listing (e.g. an empty class folder)


class Source:
    """Base class: ``dataset``, ``layout``, ``classes``, ``splits``, ``mean``/``std``, ``encode``."""

    dataset: str
    layout: str
    image_ext: str
    classes: list[str]
    splits: dict[str, Split]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    root: str | None = None  # the folder the items come from, if any (named when a resume finds it changed)

    def encode(self, split: str, index: int) -> tuple[bytes, str]:
        """Encoded image bytes and their extension (``png``/``jpg``) of item ``index`` of ``split``."""
        raise NotImplementedError

    def estimated_bytes(self, split: str) -> int:
        raise NotImplementedError

    def listing(self, split: str) -> list[tuple[str, int, int]]:
        """What the split is made of, cheaply: ``(name, label, size or checksum)`` per item, in item order.

        A resumed ``sskd shard`` compares it with the interrupted run's, so a source that gained, lost or
        changed items since is refused instead of being mixed into one dataset.
        """
        raise NotImplementedError


def png_bytes(rgb: np.ndarray) -> bytes:
    """Lossless PNG of an (h, w, 3) uint8 array; deterministic for the same pixels."""
    buf = io.BytesIO()
    Image.fromarray(rgb, "RGB").save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


class ArraySource(Source):
    """In-memory uint8 images (n, h, w, 3) per split, written as PNG (digits, CIFAR-100)."""

    image_ext = "png"
    layout = "cifar"

    def __init__(
        self, dataset, classes, arrays: dict[str, tuple[np.ndarray, np.ndarray, list[str]]], mean, std
    ):
        self.dataset, self.classes, self.mean, self.std = dataset, classes, tuple(mean), tuple(std)
        self.arrays = {k: v[0] for k, v in arrays.items()}
        self.splits = {k: Split(paths=v[2], labels=[int(x) for x in v[1]]) for k, v in arrays.items()}

    def encode(self, split: str, index: int) -> tuple[bytes, str]:
        return png_bytes(self.arrays[split][index]), "png"

    def estimated_bytes(self, split: str) -> int:
        a = self.arrays[split]
        return int(a[0].nbytes * 0.8 * len(a)) if len(a) else 0

    def listing(self, split: str) -> list[tuple[str, int, int]]:
        sp = self.splits[split]
        return [
            (name, label, zlib.crc32(img.tobytes()))
            for name, label, img in zip(sp.paths, sp.labels, self.arrays[split])
        ]


def digits_source(seed: int = 0, val_fraction: float = 0.2, size: int = 32) -> ArraySource:
    """scikit-learn's 1,797 handwritten digits (real scans, 8x8, 0-16) as ``size``x``size`` RGB.

    Upsampled with bicubic interpolation: strokes stay smooth, so crops, rotations and colour changes
    act on them as on natural images (nearest-neighbour would leave 4x4 blocks). The train/val split is
    stratified by class with a fixed seed.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if not 0 < val_fraction < 1:
        raise SSKDError(f"--val-fraction must be between 0 and 1 (exclusive), not {val_fraction}")

    digits = load_digits()
    gray = np.clip(digits.images / 16.0 * 255.0 + 0.5, 0, 255).astype(np.uint8)
    up = np.stack([np.asarray(Image.fromarray(g, "L").resize((size, size), Image.BICUBIC)) for g in gray])
    rgb = np.repeat(up[..., None], 3, axis=3)
    idx = np.arange(len(rgb))
    tr, va = train_test_split(idx, test_size=val_fraction, random_state=seed, stratify=digits.target)
    tr, va = np.sort(tr), np.sort(va)
    train_px = rgb[tr].reshape(-1, 3) / 255.0
    arrays = {
        "train": (rgb[tr], digits.target[tr], [f"sklearn-digits[{i}]" for i in tr]),
        "val": (rgb[va], digits.target[va], [f"sklearn-digits[{i}]" for i in va]),
    }
    return ArraySource(
        "digits", [str(i) for i in range(10)], arrays, train_px.mean(0).round(4), train_px.std(0).round(4)
    )


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """``_codecs.encode`` for the one use a CIFAR pickle has for it (see :data:`_CIFAR_GLOBALS`)."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"_codecs.encode with {encoding!r}")
    return text.encode("latin1")


def _cifar_globals() -> dict[tuple[str, str], object]:
    try:
        from numpy._core.multiarray import _reconstruct  # numpy >= 2
    except ImportError:  # numpy 1.x
        from numpy.core.multiarray import _reconstruct
    admitted: dict[tuple[str, str], object] = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):  # as written by numpy 1 / numpy 2
        admitted[(module, "_reconstruct")] = _reconstruct
    # A copy re-saved by Python 3 at protocol 2 writes bytes as _codecs.encode(text, "latin1"): admitted
    # for exactly that encoding (the official files, from Python 2, hold plain strings instead).
    admitted[("_codecs", "encode")] = _latin1_encode
    return admitted


# Every global the official cifar-100-python pickles reference (dicts of bytes keys, lists of bytes and
# ints, one numpy uint8 array): numpy's array rebuilders, nothing else.
_CIFAR_GLOBALS = _cifar_globals()


class _Refused(pickle.UnpicklingError):
    """A global (or persistent id) the CIFAR-100 files never hold; ``str(exc)`` names it."""


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles only what the CIFAR-100 files hold: any other global (``os.system``, ``builtins.eval``,
    ``subprocess.Popen``, ...) is refused when the pickle names it, before anything in the file runs."""

    def find_class(self, module: str, name: str):
        try:
            return _CIFAR_GLOBALS[(module, name)]
        except KeyError:
            import _compat_pickle  # name it as Python 3 does: Python 3 writes builtins.eval as __builtin__.eval

            module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
            raise _Refused(f"{_compat_pickle.IMPORT_MAPPING.get(module, module)}.{name}") from None

    def persistent_load(self, pid):
        raise _Refused(f"persistent id {pid!r}")


def _unpickle(path: Path) -> dict:
    if not path.is_file():
        raise SSKDError(f"{path}: missing (expected the official cifar-100-python folder: train, test, meta)")
    try:
        with open(path, "rb") as fh:
            d = _CifarUnpickler(fh, encoding="bytes").load()
    except _Refused as exc:
        raise SSKDError(
            f"{path}: refused to load: the pickle references {exc}, which the CIFAR-100 files never hold"
        ) from None
    except Exception as exc:  # pickle raises many types on damaged input
        raise SSKDError(f"{path}: not a readable CIFAR pickle ({type(exc).__name__}: {exc})") from exc
    if not isinstance(d, dict):
        raise SSKDError(f"{path}: not a CIFAR pickle (holds a {type(d).__name__}, not a dict)")
    return d


def _field(d: dict, name: str, path: Path):
    for key in (name.encode(), name):
        if key in d:
            return d[key]
    raise SSKDError(f"{path}: field {name!r} is missing")


def cifar100_source(src: str | Path) -> ArraySource:
    """The official ``cifar-100-python`` folder (pickled ``train``, ``test``, ``meta``); fine labels.

    The test split is written as ``val``.
    """
    src = Path(src)
    if (src / "cifar-100-python").is_dir():
        src = src / "cifar-100-python"
    meta_path = src / "meta"
    names = [
        n.decode() if isinstance(n, bytes) else n
        for n in _field(_unpickle(meta_path), "fine_label_names", meta_path)
    ]
    arrays = {}
    for split, fname in (("train", "train"), ("val", "test")):
        path = src / fname
        d = _unpickle(path)
        data = np.asarray(_field(d, "data", path), dtype=np.uint8)
        labels = np.asarray(_field(d, "fine_labels", path), dtype=np.int64)
        if data.ndim != 2 or data.shape[1] != 3072:
            raise SSKDError(f"{path}: 'data' has shape {data.shape}, expected (N, 3072)")
        if len(labels) != len(data):
            raise SSKDError(f"{path}: {len(data)} images but {len(labels)} fine_labels")
        if len(labels) and (labels.min() < 0 or labels.max() >= len(names)):
            raise SSKDError(f"{path}: fine_labels outside 0..{len(names) - 1}")
        files = [
            f.decode() if isinstance(f, bytes) else str(f)
            for f in d.get(b"filenames", d.get("filenames", []))
        ]
        files = files if len(files) == len(data) else [f"{fname}[{i}]" for i in range(len(data))]
        arrays[split] = (
            data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy(),
            labels,
            [f"{fname}/{f}" for f in files],
        )
    source = ArraySource("cifar100", names, arrays, CIFAR100_MEAN, CIFAR100_STD)
    source.root = str(src.resolve())
    return source


_KINDS = (
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISDIR, "a folder"),
)


def _kind(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def read_regular_file(path: str | os.PathLike) -> bytes:
    """The bytes of ``path`` (symbolic links followed) if it is a regular file; ``OSError`` otherwise.

    A FIFO, socket or device named like an image is never read: reading a FIFO blocks for ever, a
    device may never end. It is checked before opening (opening a FIFO itself blocks, opening a device
    can act on it) and again on the opened file, which is opened without blocking.
    """
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        raise NotRegularFile(errno.EINVAL, f"not a regular file ({_kind(st.st_mode)})", str(path))
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):  # swapped between the two looks
            raise NotRegularFile(errno.EINVAL, f"not a regular file ({_kind(st.st_mode)})", str(path))
        return fh.read()


class NotRegularFile(OSError):
    """A FIFO, socket, device or folder where a file was expected; ``strerror`` says which."""


def _images_in(folder: Path, skip_bad: bool = False) -> list[Path]:
    # A dangling link or unreadable entry is listed too: it must fail loudly (or be skipped and listed),
    # never vanish from the dataset. So is a FIFO, socket or device named like an image: refused here,
    # before any work, or with --skip-bad listed and then skipped by encode(), which never opens it.
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.is_dir())
    if not skip_bad:
        for p in files:
            try:
                mode = os.stat(p).st_mode
            except OSError:
                continue  # dangling or unreadable: encode() names it
            if not stat.S_ISREG(mode):
                raise SSKDError(
                    f"{p}: not a regular file ({_kind(mode)}), not an image; remove it, or use "
                    "--skip-bad to skip it"
                )
    return files


class FolderSource(Source):
    """ImageNet layout: ``SRC/train/<wnid>/*.JPEG``; val from ``SRC/val/<wnid>/*`` or flat + a label file.

    Class index = position of the folder name in sorted order. JPEG and PNG files keep their original
    bytes (no re-encode); other formats are re-encoded as PNG. Every image is fully decoded once to
    catch truncated or corrupt files.
    """

    dataset = "imagefolder"
    layout = "imagenet"
    image_ext = "jpg"
    mean, std = IMAGENET_MEAN, IMAGENET_STD

    def __init__(self, src: str | Path, val_labels: str | Path | None = None, skip_bad: bool = False):
        src = Path(src)
        self.root = str(src.resolve())
        train = src / "train"
        if not train.is_dir():
            raise SSKDError(f"{train}: not found (expected SRC/train/<class>/*.JPEG)")
        class_dirs = sorted(p for p in train.iterdir() if p.is_dir())
        if not class_dirs:
            raise SSKDError(f"{train}: no class folders")
        self.classes = [p.name for p in class_dirs]
        self.splits = {"train": self._list_classes(class_dirs, skip_bad)}
        val = src / "val"
        if val.is_dir():
            self.splits["val"] = self._list_val(val, val_labels, skip_bad)
        elif val_labels:
            raise SSKDError(f"{val}: --val-labels given but there is no val folder")

    def _list_classes(self, class_dirs: list[Path], skip_bad: bool) -> Split:
        index = {name: i for i, name in enumerate(self.classes)}
        split = Split([], [])
        for d in class_dirs:
            if d.name not in index:
                raise SSKDError(f"{d}: class folder not among the train classes")
            files = _images_in(d, skip_bad)
            if not files:
                if not skip_bad:
                    raise SSKDError(f"{d}: empty class folder (no images); use --skip-bad to skip it")
                split.skipped.append({"path": str(d), "reason": "empty class folder"})
            split.paths += [str(f) for f in files]
            split.labels += [index[d.name]] * len(files)
        return split

    def _list_val(self, val: Path, val_labels, skip_bad: bool) -> Split:
        subdirs = sorted(p for p in val.iterdir() if p.is_dir())
        if subdirs:
            return self._list_classes(subdirs, skip_bad)
        files = _images_in(val, skip_bad)
        if not val_labels:
            raise SSKDError(f"{val}: flat val folder needs --val-labels FILE (one class index per line)")
        path = Path(val_labels)
        if not path.is_file():
            raise SSKDError(f"{path}: label file not found")
        lines = [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
        if len(lines) != len(files):
            raise SSKDError(
                f"{path}: {len(lines)} labels for {len(files)} images in {val} (one line per image)"
            )
        labels = []
        for n, text in enumerate(lines, 1):
            if not text.lstrip("-").isdigit() or not 0 <= int(text) < len(self.classes):
                raise SSKDError(f"{path}:{n}: {text!r} is not a class index in 0..{len(self.classes) - 1}")
            labels.append(int(text))
        return Split([str(f) for f in files], labels)

    def encode(self, split: str, index: int) -> tuple[bytes, str]:
        path = self.splits[split].paths[index]
        try:
            data = read_regular_file(path)
        except NotRegularFile as exc:
            raise BadItem(path, exc.strerror) from None
        except OSError as exc:
            raise BadItem(path, f"unreadable ({exc.strerror or exc})") from exc
        try:
            with Image.open(io.BytesIO(data)) as img:
                fmt = img.format
                img.load()  # full decode: catches truncated and corrupt files
                if fmt not in ("JPEG", "PNG"):
                    return png_bytes(np.asarray(img.convert("RGB"))), "png"
        except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError... on bad files
            raise BadItem(path, f"not a decodable image ({type(exc).__name__}: {exc})") from exc
        return data, "jpg" if fmt == "JPEG" else "png"

    def estimated_bytes(self, split: str) -> int:
        total = 0
        for p in self.splits[split].paths:
            with contextlib.suppress(OSError):  # a dangling link: encode() reports it
                total += os.stat(p).st_size
        return total

    def listing(self, split: str) -> list[tuple[str, int, int]]:
        out = []
        for path, label in zip(self.splits[split].paths, self.splits[split].labels):
            try:
                size = os.stat(path).st_size
            except OSError:
                size = -1  # unreadable: encode() reports it (or --skip-bad skips it)
            out.append((os.path.relpath(os.path.abspath(path), self.root), label, size))
        return out


def sample_photo_tree(
    root: str | Path, classes: int = 8, per_class: int = 64, val_per_class: int = 16, seed: int = 0
) -> Path:
    """An ImageNet-layout folder of real photographs: crops of scikit-learn's two bundled photos.

    Writes ``root/train/n0000000k/*.JPEG`` and ``root/val/n0000000k/*.JPEG``: ~500x375 JPEG q90 (some at
    their crop size), every class a mix of both photos (odd classes mirrored). For profiling and tests
    of the ImageNet path where ImageNet itself cannot be had.
    """
    from sklearn.datasets import load_sample_images

    root = Path(root)
    photos = [np.asarray(p) for p in load_sample_images().images]  # two 427x640 RGB photographs
    rng = np.random.default_rng(seed)
    for split, n in (("train", per_class), ("val", val_per_class)):
        for c in range(classes):
            d = root / split / f"n{c:08d}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                photo = photos[(c + i) % 2]
                h, w = int(rng.integers(300, 400)), int(rng.integers(400, 520))
                y, x = int(rng.integers(0, photo.shape[0] - h)), int(rng.integers(0, photo.shape[1] - w))
                crop = Image.fromarray(photo[y : y + h, x : x + w])
                if c % 2:
                    crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
                crop.resize((500, 375) if i % 3 else (w, h)).save(d / f"img_{c}_{i}.JPEG", quality=90)
    return root
