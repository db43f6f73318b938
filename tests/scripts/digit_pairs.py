"""A genuine 100-class dataset with no download: pairs of scikit-learn digits in the cifar-100-python layout
(and a 1,000-class one: triples).

    python tests/scripts/digit_pairs.py OUT [--train 6000] [--test 1000] [--seed 0] [--digits 2]
    sskd shard cifar100 OUT data/shards/pairs

The teacher cache's top-K logit levels only pay on label spaces of 100 classes or more; the digits have 10.
This makes a 100-class problem from the same real scans (docs/cache.md, "100 classes"): each 32x32 RGB
image holds two digits side by side, each 8x8 scan resized (bicubic, as ``sskd shard digits`` does) to 16
columns x 32 rows, and its label is ``10 * left + right`` (fine label names "00".."99"; coarse label = the
left digit, names "0".."9"). ``--digits 3`` makes the 1,000-class version, ImageNet's label-space size
(docs/cache.md, "1,000 classes"): three digits of 10 columns each (one blank column either side), label
``100 * a + 10 * b + c`` (names "000".."999"; coarse label = the first digit), file names
``trip_00042_a0123_b0456_c0789.png``.

The 1,797 scans are first split, stratified by digit with ``--seed``, into a train pool (80 %) and a test
pool (20 %): test images are composed only of scans that no train image uses, so the test split measures
generalisation to unseen handwriting, not to unseen pairings of seen scans. Every class gets the same
number of images (``--train`` and ``--test`` are rounded down to multiples of the class count); each image's scans
are drawn at random from its digits' pools and named in its file name (``pair_00042_l0123_r0456.png``:
the indices into ``sklearn.datasets.load_digits()``). Same ``--seed``, same bytes.

OUT gets the official folder's three pickles (protocol 2, bytes keys as the Python 2 originals): ``train``
and ``test`` (``data`` uint8 (N, 3072) channel-major, ``fine_labels``, ``coarse_labels``, ``filenames``,
``batch_label``) and ``meta`` (``fine_label_names``, ``coarse_label_names``). Written under a temporary
name and renamed, so a half-made OUT never looks complete.
"""

from __future__ import annotations

import argparse
import os
import pickle
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image

SIZE = 32  # images are SIZE x SIZE
# Per digit count: the set's name, its file-name prefix, one letter per digit.
NAMES = {2: ("pairs", "pair", "lr"), 3: ("triples", "trip", "abc")}


def digit_slots(n_digits: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Every scikit-learn digit as a 32-row x (32 // n_digits)-column uint8 slot, and its digit: for pairs
    (1797, 32, 16), (1797,)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    gray = np.clip(digits.images / 16.0 * 255.0 + 0.5, 0, 255).astype(np.uint8)
    size = (SIZE // n_digits, SIZE)  # (columns, rows)
    slots = np.stack([np.asarray(Image.fromarray(g, "L").resize(size, Image.BICUBIC)) for g in gray])
    return slots, digits.target.astype(np.int64)


def pools(targets: np.ndarray, seed: int, test_fraction: float = 0.2) -> dict[str, np.ndarray]:
    """Disjoint train and test pools of scan indices, stratified by digit."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(targets))
    tr, te = train_test_split(idx, test_size=test_fraction, random_state=seed, stratify=targets)
    return {"train": np.sort(tr), "test": np.sort(te)}


def compose(
    slots: np.ndarray, targets: np.ndarray, pool: np.ndarray, per_class: int, rng, n_digits: int = 2
) -> dict:
    """``per_class`` images of each of the 10**n_digits classes from the scans in ``pool``, in a shuffled
    order; ``scans`` (n, n_digits) are the scan indices drawn, left to right."""
    by_digit = [pool[targets[pool] == d] for d in range(10)]
    labels = np.repeat(np.arange(10**n_digits), per_class)
    labels = labels[rng.permutation(len(labels))]
    # Drawn digit by digit over all images (for pairs: every left scan, then every right one).
    scans = np.stack(
        [
            np.array(
                [rng.choice(by_digit[c // 10 ** (n_digits - 1 - j) % 10]) for c in labels], dtype=np.int64
            )
            for j in range(n_digits)
        ],
        axis=1,
    )
    gray = np.concatenate([slots[scans[:, j]] for j in range(n_digits)], axis=2)  # (n, 32, w * n_digits)
    pad = SIZE - gray.shape[2]
    gray = np.pad(gray, ((0, 0), (0, 0), (pad // 2, pad - pad // 2)))  # (n, 32, 32)
    data = np.repeat(gray[:, None], 3, axis=1).reshape(len(labels), 3 * SIZE * SIZE)  # channel-major RGB
    return {"data": data, "fine_labels": labels, "scans": scans}


def build(out: str | Path, n_train: int = 6000, n_test: int = 1000, seed: int = 0, n_digits: int = 2) -> Path:
    """Write the digit-pairs (or triples) folder to ``out`` (refused if it exists); returns it."""
    out = Path(out)
    if out.exists():
        raise SystemExit(f"{out}: exists; choose a new folder")
    if n_digits not in NAMES:
        raise SystemExit(f"--digits must be one of {sorted(NAMES)}, not {n_digits}")
    classes = 10**n_digits
    if n_train < classes or n_test < classes:
        raise SystemExit(
            f"--train and --test must be >= {classes} (one image per class), not {n_train}, {n_test}"
        )
    kind, prefix, letters = NAMES[n_digits]
    slots, targets = digit_slots(n_digits)
    pool = pools(targets, seed)
    rng = np.random.default_rng(seed)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for split, n in (("train", n_train), ("test", n_test)):
        s = compose(slots, targets, pool[split], n // classes, rng, n_digits)
        d = {
            b"batch_label": f"digit {kind} {split}, seed {seed}".encode(),
            b"filenames": [
                (
                    f"{prefix}_{i:05d}"
                    + "".join(f"_{c}{a:04d}" for c, a in zip(letters, row, strict=True))
                    + ".png"
                ).encode()
                for i, row in enumerate(s["scans"].tolist())
            ],
            b"fine_labels": s["fine_labels"].tolist(),
            b"coarse_labels": (s["fine_labels"] // (classes // 10)).tolist(),
            b"data": s["data"],
        }
        with open(tmp / split, "wb") as fh:
            pickle.dump(d, fh, protocol=2)
    meta = {
        b"fine_label_names": [f"{c:0{n_digits}d}".encode() for c in range(classes)],
        b"coarse_label_names": [str(c).encode() for c in range(10)],
    }
    with open(tmp / "meta", "wb") as fh:
        pickle.dump(meta, fh, protocol=2)
    os.replace(tmp, out)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="folder to write (must not exist): train, test, meta")
    p.add_argument(
        "--train", type=int, default=6000, help="train images (a multiple of the classes; default 6000)"
    )
    p.add_argument(
        "--test", type=int, default=1000, help="test images (a multiple of the classes; default 1000)"
    )
    p.add_argument("--seed", type=int, default=0, help="the scan split and every draw (default 0)")
    p.add_argument("--digits", type=int, default=2, help="digits per image: 2 (100 classes) or 3 (1,000)")
    a = p.parse_args(argv)
    out = build(a.out, a.train, a.test, a.seed, a.digits)
    c = 10**a.digits
    print(f"{out}: {a.train // c * c} train, {a.test // c * c} test images, {c} classes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
