"""Checkpoints load with ``torch.load(weights_only=True)``, CIFAR pickles through an unpickler that admits
numpy's array rebuilders only: every kind of checkpoint a run writes loads and resumes that way; a crafted
checkpoint or pickle, or an older checkpoint holding other objects, is a one-line error naming the file,
and nothing in it runs."""

import os
import pickle
import shutil
import struct
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch

from shards.sources import cifar100_source
from sskd import runs
from sskd.cli import main as sskd_main
from sskd.core.errors import SSKDError

FAST = ["--no-progress", "--batch-size", "32", "--set", "data.eval_batch_size=128"]


def run(*args) -> int:
    return sskd_main([str(a) for a in args])


class Payload:
    """Unpickling this runs ``os.system`` (it would create ``marker``): what a crafted file does."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def one_line(exc) -> str:
    text = str(exc.value)
    assert "\n" not in text, text
    return text


# ---- every checkpoint a run writes --------------------------------------------------------------------


@pytest.fixture(scope="module")
def run_dirs(digits_shards, tmp_path_factory):
    root = tmp_path_factory.mktemp("safe")
    common = ["--shards", digits_shards, "--max-steps", 2, *FAST]
    assert run("train-teacher", "--arch", "resnet8", "--out", root / "teacher", *common) == 0
    assert (
        run(
            "train-teacher", "--arch", "resnet8", "--out", root / "bf16", "--mixed-precision", "bf16", *common
        )
        == 0
    )
    assert (
        run(
            "distill",
            "--method",
            "crd",
            "--teacher",
            root / "teacher",
            "--student",
            "resnet8",
            "--out",
            root / "crd",
            "--set",
            "crd.nce_k=64",
            *common,
        )
        == 0
    )
    assert (
        run("train-teacher", "--method", "hssakd", "--arch", "resnet8", "--out", root / "hssakd", *common)
        == 0
    )
    return root


@pytest.mark.parametrize("name", ["teacher", "bf16", "crd", "hssakd"])
def test_every_checkpoint_loads_with_weights_only(run_dirs, name):
    for which in ("last", "best"):
        path = run_dirs / name / "checkpoints" / f"{which}.pt"
        direct = torch.load(path, map_location="cpu", weights_only=True)  # what the product does
        ckpt = runs.load_checkpoint(run_dirs / name, which)
        assert ckpt.keys() == direct.keys() and ckpt["step"] == 2
        assert isinstance(ckpt["data_state"][0]["dali"], bytes)  # DALI's reader position travels as bytes
    if name == "crd":
        assert ckpt["model"]["_extra_state"].shape[0] == 2  # the memory banks, one tensor


def test_a_crd_run_resumes_from_its_weights_only_checkpoint(run_dirs, digits_shards, tmp_path):
    shutil.copytree(run_dirs / "crd", tmp_path / "crd")
    assert (
        run(
            "distill",
            "--method",
            "crd",
            "--teacher",
            run_dirs / "teacher",
            "--student",
            "resnet8",
            "--out",
            tmp_path / "crd",
            "--set",
            "crd.nce_k=64",
            "--shards",
            digits_shards,
            "--max-steps",
            3,
            "--resume",
            *FAST,
        )
        == 0
    )
    assert runs.load_model_info(tmp_path / "crd")["steps"] == 3


def test_gradscaler_state_is_plain_numbers(tmp_path):
    """fp16 runs (GPU only) store GradScaler.state_dict(): floats and ints (the CPU scaler's is the same)."""
    scaler = torch.amp.GradScaler("cpu")
    x = torch.ones(2, requires_grad=True)
    opt = torch.optim.SGD([x], lr=0.1)
    scaler.scale((x * 2).sum()).backward()
    scaler.step(opt)
    scaler.update()
    state = scaler.state_dict()
    assert state and all(type(v) in (int, float) for v in state.values())
    runs.save_checkpoint(tmp_path, "last", {"scaler": state, "step": 1})
    assert runs.load_checkpoint(tmp_path)["scaler"] == state


def test_save_converts_numpy_and_paths_and_refuses_other_objects(tmp_path):
    state = {
        "a": np.arange(3, dtype=np.int64),
        "b": np.float32(0.5),
        "c": Path("/x/y"),
        "d": (np.int64(2), "s"),
        "e": torch.Size([2, 3]),
        "f": {"g": [b"dali", None, True]},
    }
    runs.save_checkpoint(tmp_path, "last", state)
    got = runs.load_checkpoint(tmp_path)
    assert torch.equal(got["a"], torch.arange(3)) and got["b"] == 0.5 and type(got["b"]) is float
    assert got["c"] == "/x/y" and got["d"] == (2, "s") and got["e"] == torch.Size([2, 3])
    assert got["f"] == {"g": [b"dali", None, True]}
    with pytest.raises(TypeError, match=r"state\.x\.y is a .*Payload"):
        runs.save_checkpoint(tmp_path, "other", {"x": {"y": Payload(tmp_path / "m")}})
    assert not (tmp_path / "checkpoints" / "other.pt").exists()


# ---- refused checkpoints ------------------------------------------------------------------------------


def crafted(path: Path, marker: Path, zipped: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"model": {}, "step": 1, "evil": Payload(marker)}
    if zipped:
        torch.save(state, path)  # the format torch.save writes
    else:
        path.write_bytes(pickle.dumps(state, protocol=2))  # a bare pickle: torch.load's legacy path


@pytest.mark.parametrize("zipped", [True, False], ids=["zip", "bare-pickle"])
def test_a_crafted_checkpoint_is_refused_and_never_run(tmp_path, zipped):
    marker = tmp_path / "PAYLOAD-RAN"
    path = tmp_path / "r" / "checkpoints" / "last.pt"
    crafted(path, marker, zipped)
    with pytest.raises(SSKDError) as exc:
        runs.load_checkpoint(tmp_path / "r")
    text = one_line(exc)
    assert text.startswith(f"{path}: refused to load: it references ") and "system" in text
    assert not marker.exists()


def test_resume_from_a_crafted_checkpoint_fails_without_running_it(run_dirs, digits_shards, tmp_path, capsys):
    shutil.copytree(run_dirs / "teacher", tmp_path / "t")
    marker = tmp_path / "PAYLOAD-RAN"
    crafted(tmp_path / "t" / "checkpoints" / "last.pt", marker, zipped=True)
    assert (
        run(
            "train-teacher",
            "--arch",
            "resnet8",
            "--shards",
            digits_shards,
            "--out",
            tmp_path / "t",
            "--max-steps",
            4,
            "--resume",
            *FAST,
        )
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("sskd: error:") and "last.pt: refused to load" in err
    assert not marker.exists()


def test_an_older_checkpoint_with_other_objects_is_one_line_not_a_silent_fallback(run_dirs, tmp_path):
    shutil.copytree(run_dirs / "teacher", tmp_path / "t")
    path = tmp_path / "t" / "checkpoints" / "last.pt"
    ckpt = torch.load(path, weights_only=False)
    ckpt["info"]["top1_history"] = np.array([1.0, 2.0])  # what an older writer might have kept
    torch.save(ckpt, path)
    with pytest.raises(SSKDError) as exc:
        runs.load_checkpoint(tmp_path / "t")
    text = one_line(exc)
    assert text.startswith(f"{path}: refused to load: it references numpy.")
    assert "written by an older sskd" in text and "delete it" in text


def test_a_test_edited_checkpoint_still_loads(run_dirs, tmp_path):
    shutil.copytree(run_dirs / "teacher", tmp_path / "t")
    path = tmp_path / "t" / "checkpoints" / "last.pt"
    ckpt = torch.load(path, weights_only=False)
    ckpt["step"] = 7
    torch.save(ckpt, path)
    assert runs.load_checkpoint(tmp_path / "t")["step"] == 7


@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage"])
def test_a_damaged_checkpoint_is_one_line(run_dirs, tmp_path, damage):
    path = tmp_path / "r" / "checkpoints" / "last.pt"
    path.parent.mkdir(parents=True)
    good = (run_dirs / "teacher" / "checkpoints" / "last.pt").read_bytes()
    path.write_bytes({"truncated": good[: len(good) // 2], "empty": b"", "garbage": b"\xe3" * 64}[damage])
    with pytest.raises(SSKDError) as exc:
        runs.load_checkpoint(tmp_path / "r")
    text = one_line(exc)
    assert text.startswith(f"{path}: damaged checkpoint (") and text.endswith("delete it to start over")


# ---- CIFAR-100 pickles --------------------------------------------------------------------------------


class Py2Pickler(pickle._Pickler):
    """Writes bytes as Python 2's ``str`` opcodes (SHORT_BINSTRING/BINSTRING), as the official files
    (written by Python 2's cPickle at protocol 2) hold them."""

    dispatch: ClassVar[dict] = dict(pickle._Pickler.dispatch)

    def save_bytes(self, obj):
        n = len(obj)
        self.write(
            (pickle.SHORT_BINSTRING + bytes([n]) if n < 256 else pickle.BINSTRING + struct.pack("<i", n))
            + obj
        )
        self.memoize(obj)

    dispatch[bytes] = save_bytes


def write_cifar(root: Path, *, py2: bool, numpy1_names: bool = False, n=12) -> Path:
    rng = np.random.default_rng(1)
    root.mkdir(parents=True)
    files = {
        "meta": {
            b"fine_label_names": [f"c{i:02d}".encode() for i in range(100)],
            b"coarse_label_names": [b"k"] * 20,
        }
    }
    for fname in ("train", "test"):
        files[fname] = {
            b"batch_label": fname.encode(),
            b"filenames": [f"i{i}.png".encode() for i in range(n)],
            b"fine_labels": rng.integers(0, 100, n).tolist(),
            b"coarse_labels": [0] * n,
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        }
    for fname, d in files.items():
        if py2:
            import io

            buf = io.BytesIO()
            Py2Pickler(buf, protocol=2).dump(d)
            raw = buf.getvalue()
        else:
            raw = pickle.dumps(d, protocol=2)
        if numpy1_names:  # numpy 1 names the rebuilder numpy.core.multiarray._reconstruct
            raw = raw.replace(
                b"cnumpy._core.multiarray\n_reconstruct\n", b"cnumpy.core.multiarray\n_reconstruct\n"
            )
            assert b"cnumpy.core.multiarray\n" in raw or fname == "meta"
        (root / fname).write_bytes(raw)
    return root


@pytest.mark.parametrize(
    "py2,numpy1",
    [(True, True), (True, False), (False, False)],
    ids=["python2-numpy1", "python2-numpy2", "python3-protocol2"],
)
def test_cifar_pickles_load_through_the_restricted_unpickler(tmp_path, py2, numpy1):
    src = write_cifar(tmp_path / "cifar-100-python", py2=py2, numpy1_names=numpy1)
    if py2:
        assert b"_codecs" not in (src / "train").read_bytes()
    source = cifar100_source(tmp_path)
    want = pickle.loads((src / "train").read_bytes(), encoding="bytes")
    assert source.classes[:2] == ["c00", "c01"]
    assert np.array_equal(source.arrays["train"], want[b"data"].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    assert source.splits["train"].labels == want[b"fine_labels"]


def _global(module: str, name: str, arg: str) -> bytes:
    """A protocol-0 pickle calling module.name(arg), written out by hand."""
    return f"c{module}\n{name}\n(V{arg}\ntR.".encode()


@pytest.mark.parametrize(
    "kind", ["reduce-os.system", "os.system", "builtins.eval", "subprocess.Popen", "posix.system"]
)
def test_a_crafted_cifar_pickle_is_refused_and_never_run(tmp_path, kind):
    src = write_cifar(tmp_path / "cifar-100-python", py2=False)
    marker = tmp_path / "PAYLOAD-RAN"
    if kind == "reduce-os.system":
        raw, named = pickle.dumps({b"data": Payload(marker)}, protocol=2), "system"
    elif kind == "builtins.eval":
        raw, named = _global("builtins", "eval", f"open({str(marker)!r}, 'w')"), "builtins.eval"
    else:
        module, name = kind.split(".")
        raw, named = _global(module, name, f"touch {marker}"), kind
    (src / "train").write_bytes(raw)
    with pytest.raises(SSKDError) as exc:
        cifar100_source(tmp_path)
    text = one_line(exc)
    assert text.startswith(f"{src / 'train'}: refused to load: the pickle references ")
    assert named in text and text.endswith("which the CIFAR-100 files never hold")
    assert not marker.exists()


def test_protocol2_py3_builtins_are_named_as_python3_names_them(tmp_path):
    src = write_cifar(tmp_path / "cifar-100-python", py2=False)
    (src / "meta").write_bytes(
        pickle.dumps({b"fine_label_names": eval}, protocol=2)
    )  # __builtin__.eval on disk
    assert b"__builtin__" in (src / "meta").read_bytes()
    with pytest.raises(SSKDError, match=r"meta: refused to load: the pickle references builtins\.eval, "):
        cifar100_source(tmp_path)


def test_codecs_encode_is_admitted_for_latin1_only(tmp_path):
    src = write_cifar(tmp_path / "cifar-100-python", py2=False)
    (src / "meta").write_bytes(b"c_codecs\nencode\n(Vx\nVrot13\ntR.")
    with pytest.raises(SSKDError, match=r"meta: not a readable CIFAR pickle \(.*rot13"):
        cifar100_source(tmp_path)
