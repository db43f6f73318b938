"""Faults of the shard writer and the shard-folder tools (issue 19): a finished folder rewritten by
`--resume` with other settings or another source, `--overwrite`, a manifest naming paths outside its
folder or holding wrong types or a zero std, a symbolic link where an index goes, a read-only folder,
a full disk or a file-size limit while a shard is written, a FIFO named like an image."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from shards.format import load_manifest
from sskd.cli import main
from sskd.core.errors import SSKDError

REPO = Path(__file__).resolve().parents[1]


def snapshot(folder: Path) -> dict[str, str]:
    """sha256 of every file of a folder but its lock (what a refused command must leave as it was)."""
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.iterdir())
        if p.is_file() and p.name != ".lock"
    }


def same_shards(a: Path, b: Path) -> None:
    """The two folders hold byte-identical shards and indexes and the same splits in their manifests."""
    files = {p.name for p in a.iterdir() if p.suffix in (".tar", ".idx")}
    assert files == {p.name for p in b.iterdir() if p.suffix in (".tar", ".idx")} and files
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    assert load_manifest(a)["splits"] == load_manifest(b)["splits"]


def one_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [ln for ln in err.strip().splitlines() if not ln.startswith("[sskd]")]
    assert len(lines) == 1 and lines[0].startswith("sskd: error: "), err
    return lines[0]


def shard(*args) -> int:
    return main(["shard", *map(str, args), "--no-progress"])


@pytest.fixture
def finished(digits_shards, tmp_path):
    """A copy of the session's digits shards (seed 0, --max-count 256): a finished folder."""
    folder = tmp_path / "d"
    shutil.copytree(digits_shards, folder)
    return folder


# --- item 1: a finished folder is never rewritten but with --overwrite --------------------------------


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--seed", "5"], "--seed 0 then, 5 now"),
        (["--max-count", "100"], "--max-count 256 then, 100 now"),
        (["--val-fraction", "0.3"], "the source's train split has 1257 items now, 1437 then"),
    ],
)
def test_resume_of_a_finished_folder_with_other_settings_is_refused(finished, capsys, flags, named):
    before = snapshot(finished)
    assert shard("digits", finished, "--max-count", "256", "--resume", *flags) == 2
    line = one_line(capsys)
    assert named in line and "nothing was changed" in line and "--overwrite" in line, line
    assert snapshot(finished) == before  # the manifest (and every shard) byte for byte as it was


def test_resume_of_a_finished_folder_from_another_source_folder_is_refused(photo_tree, tmp_path, capsys):
    src, other, out = tmp_path / "src", tmp_path / "other", tmp_path / "out"
    shutil.copytree(photo_tree, src)
    shutil.copytree(photo_tree, other)
    assert shard("imagefolder", src, out, "--max-count", 16) == 0
    capsys.readouterr()
    before = snapshot(out)
    sorted((other / "train" / "n00000002").glob("*.JPEG"))[0].unlink()
    assert shard("imagefolder", other, out, "--max-count", 16, "--resume") == 2
    assert "the source's train split has 47 items now, 48 then" in one_line(capsys)
    victim = sorted((other / "val" / "n00000001").glob("*.JPEG"))[0]  # as many items, other bytes
    victim.write_bytes(victim.read_bytes()[:-100] + b"\xff\xd9")
    shutil.copy(
        sorted((other / "train" / "n00000001").glob("*.JPEG"))[0], other / "train" / "n00000002" / "new.JPEG"
    )
    assert shard("imagefolder", other, out, "--max-count", 16, "--resume") == 2
    line = one_line(capsys)
    assert "train split has other items now (as many, 48" in line and "val split has other items" in line, (
        line
    )
    assert snapshot(out) == before
    # the same source, or an identical copy of it elsewhere: complete, nothing to do
    assert shard("imagefolder", photo_tree, out, "--max-count", 16, "--resume") == 0
    assert "already complete" in capsys.readouterr().out
    assert snapshot(out) == before


def test_resume_of_a_finished_folder_with_the_same_settings_changes_nothing(finished, capsys):
    (finished / ".progress.json").write_text("{}")  # a run stopped between its manifest and this cleanup
    before = snapshot(finished)
    del before[".progress.json"]
    mtimes = {
        p.name: p.stat().st_mtime_ns for p in finished.iterdir() if p.name not in (".lock", ".progress.json")
    }
    assert shard("digits", finished, "--max-count", "256", "--resume") == 0
    assert "already complete" in capsys.readouterr().out
    assert snapshot(finished) == before and not (finished / ".progress.json").exists()
    assert {p.name: p.stat().st_mtime_ns for p in finished.iterdir() if p.name != ".lock"} == mtimes


def test_plain_shard_into_a_finished_folder_is_refused(finished, capsys):
    before = snapshot(finished)
    assert shard("digits", finished, "--max-count", "256") == 2
    line = one_line(capsys)
    assert "holds finished shards (manifest.json); nothing was changed" in line and "--overwrite" in line, (
        line
    )
    assert shard("digits", finished, "--resume", "--overwrite") == 2
    assert "exclude each other" in one_line(capsys)
    assert snapshot(finished) == before


def test_resume_of_a_finished_folder_written_before_settings_were_recorded(finished, capsys):
    m = json.loads((finished / "manifest.json").read_text())
    del m["settings"]
    (finished / "manifest.json").write_text(json.dumps(m))
    before = snapshot(finished)
    assert shard("digits", finished, "--seed", "3", "--resume") == 2
    assert "--seed 0 then, 3 now" in one_line(capsys)
    assert shard("digits", finished, "--max-count", "100", "--resume") == 2
    assert "--max-count 100 now, but a train shard holds 256 samples" in one_line(capsys)
    assert shard("digits", finished, "--max-count", "256", "--resume") == 0
    assert snapshot(finished) == before


def test_overwrite_replaces_a_finished_folder_only_once_the_new_run_succeeds(
    finished, photo_tree, tmp_path, capsys
):
    before = snapshot(finished)
    # a run that fails midway (a corrupt image, no --skip-bad): the earlier shards are put back
    src = tmp_path / "src"
    shutil.copytree(photo_tree, src)
    (src / "train" / "n00000003" / "zz-bad.JPEG").write_bytes(b"not a jpeg")
    assert shard("imagefolder", src, finished, "--max-count", 4, "--overwrite") == 2
    line = one_line(capsys)
    assert (
        "zz-bad.JPEG: not a decodable image" in line and "the earlier shards" in line and "put back" in line
    )
    assert snapshot(finished) == before and not (finished / ".replaced").exists()
    # a file that is not a shard's: refused before anything is touched
    (finished / "notes.txt").write_text("mine")
    assert shard("digits", finished, "--seed", 5, "--overwrite") == 2
    assert "notes.txt is not one; nothing was changed" in one_line(capsys)
    (finished / "notes.txt").unlink()
    assert snapshot(finished) == before
    # a run that succeeds replaces them: nothing of the earlier run is left
    assert shard("digits", finished, "--seed", 5, "--overwrite") == 0
    m = load_manifest(finished)
    assert m["seed"] == 5 and m["settings"]["max_count"] == 512
    assert sorted(p.name for p in finished.glob("*.tar")) == [
        "train-000000.tar",
        "train-000001.tar",
        "train-000002.tar",
        "val-000000.tar",
    ]
    assert not (finished / ".replaced").exists()


def test_an_interrupted_overwrite_keeps_the_earlier_shards_aside_until_resumed(
    finished, tmp_path, monkeypatch
):
    from shards import ShardOptions, write_shards, writer
    from shards.sources import digits_source

    old_manifest = (finished / "manifest.json").read_bytes()
    real_finish, calls = writer.ShardBuilder.finish, {"n": 0}

    def dying_finish(self):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real_finish(self)

    monkeypatch.setattr(writer.ShardBuilder, "finish", dying_finish)
    src = digits_source(seed=5)
    with pytest.raises(KeyboardInterrupt):
        write_shards(src, finished, ShardOptions(seed=5, max_count=300, progress=False, overwrite=True))
    assert not (finished / "manifest.json").exists()  # the folder no longer looks complete
    assert (finished / ".replaced" / "manifest.json").read_bytes() == old_manifest
    monkeypatch.setattr(writer.ShardBuilder, "finish", real_finish)
    m = write_shards(src, finished, ShardOptions(seed=5, max_count=300, progress=False, resume=True))
    assert m["seed"] == 5 and not (finished / ".replaced").exists()
    write_shards(src, tmp_path / "ref", ShardOptions(seed=5, max_count=300, progress=False))
    same_shards(finished, tmp_path / "ref")
    assert not list(
        finished.glob("train-00000[5-9].*")
    )  # nothing of the earlier run (6 train shards) is left


# --- item 3: no path from a manifest leads out of its folder; no write through a symbolic link --------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("index", "../../escaped.idx"),
        ("index", "ABSOLUTE"),
        ("file", "../d2/train-000000.tar"),
        ("index", "sub/x.idx"),
        ("file", ".."),
    ],
)
def test_reindex_refuses_a_manifest_path_outside_the_folder(finished, tmp_path, capsys, field, value):
    outside, absolute = tmp_path.parent / "escaped.idx", tmp_path / "absolute.idx"
    value = str(absolute) if value == "ABSOLUTE" else value
    m = json.loads((finished / "manifest.json").read_text())
    m["splits"]["train"]["shards"][1][field] = value
    (finished / "manifest.json").write_text(json.dumps(m))
    (finished / "train-000001.idx").unlink()  # reindex would write it
    before = snapshot(finished)
    assert main(["shard", "reindex", str(finished)]) == 2
    line = one_line(capsys)
    assert (
        f"manifest.json: manifest field splits.train.shards[1].{field} is {json.dumps(value)}: not a plain file "
        "name inside the shard folder" in line
    ), line
    assert snapshot(finished) == before and not outside.exists() and not absolute.exists()
    with pytest.raises(SSKDError, match=r"shards\[1\]"):  # every reader loads the manifest through it
        load_manifest(finished)


def test_reindex_replaces_a_symlinked_index_instead_of_writing_through_it(finished, tmp_path, capsys):
    target = tmp_path / "precious.txt"
    target.write_text("not an index")
    (finished / "train-000001.idx").unlink()
    (finished / "train-000001.idx").symlink_to(target)
    assert main(["shard", "reindex", str(finished)]) == 0
    assert "1 rebuilt (train-000001.idx)" in capsys.readouterr().out
    assert target.read_text() == "not an index"
    assert not (finished / "train-000001.idx").is_symlink()
    from shards.verify import verify

    assert verify(finished, dali=False, log=lambda *_: None) == []


# --- items 5 and 11: a manifest's types and values are checked at load --------------------------------


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        (lambda m: [m], "not an sskd shard manifest (a JSON list, expected an object)"),
        (
            lambda m: dict(m, num_classes="ten"),
            'manifest field num_classes is "ten", expected a positive integer',
        ),
        (
            lambda m: dict(m, num_classes=11),
            "manifest field num_classes is 11, expected the number of classes (10)",
        ),
        (lambda m: dict(m, std=[0, 0, 0]), "manifest field std is [0, 0, 0], expected positive numbers"),
        (
            lambda m: dict(m, std=[0.2, -0.1, 0.2]),
            "manifest field std is [0.2, -0.1, 0.2], expected positive numbers",
        ),
        (
            lambda m: dict(m, std=[0.2, float("inf"), 0.2]),
            "manifest field std is [0.2, Infinity, 0.2], expected finite",
        ),
        (
            lambda m: dict(m, mean=[float("nan"), 0.5, 0.5]),
            "manifest field mean is [NaN, 0.5, 0.5], expected finite",
        ),
        (
            lambda m: dict(m, mean=[0.5, 0.5]),
            "manifest field mean is [0.5, 0.5], expected a list of 3 numbers",
        ),
        (lambda m: dict(m, layout="flat"), 'manifest field layout is "flat", expected "cifar" or "imagenet"'),
        (lambda m: dict(m, classes="0123456789"), 'manifest field classes is "0123456789", expected a list'),
        (lambda m: dict(m, image_ext="gif"), 'manifest field image_ext is "gif", expected "jpg" or "png"'),
        (lambda m: dict(m, splits=[]), "manifest field splits is [], expected an object of splits"),
        (lambda m: {k: v for k, v in m.items() if k != "std"}, "manifest field 'std' is missing"),
        (
            lambda m: _shard0(m, samples="256"),
            'manifest field splits.train.shards[0].samples is "256", expected an int',
        ),
        (
            lambda m: _shard0(m, first_id=True),
            "manifest field splits.train.shards[0].first_id is true, expected an int",
        ),
        (
            lambda m: _shard0(m, samples=None, drop="samples"),
            "manifest field splits.train.shards[0].samples is missing",
        ),
    ],
)
def test_a_bad_manifest_is_one_line_naming_the_field(finished, capsys, edit, needle):
    m = json.loads((finished / "manifest.json").read_text())
    (finished / "manifest.json").write_text(json.dumps(edit(m)))
    with pytest.raises(SSKDError) as err:
        load_manifest(finished)
    assert str(err.value).startswith(f"{finished / 'manifest.json'}: ") and needle in str(err.value), str(
        err.value
    )
    assert main(["shard", "verify", str(finished), "--no-dali"]) == 2
    assert needle in one_line(capsys)


def _shard0(m, drop=None, **fields):
    entry = dict(m["splits"]["train"]["shards"][0], **fields)
    if drop:
        del entry[drop]
    m["splits"]["train"]["shards"][0] = entry
    return m


# --- item 11: a read-only folder, a full disk, a file-size limit -------------------------------------


def _mount_tmpfs(where: Path, options: str) -> None:
    where.mkdir(parents=True, exist_ok=True)
    try:
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired):
        done = None
    if done is None or done.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")


def _umount(where: Path) -> None:
    if subprocess.run(["umount", str(where)], capture_output=True, timeout=30).returncode:
        subprocess.run(["umount", "-l", str(where)], capture_output=True, timeout=30)  # busy: detach it


def test_shard_into_a_read_only_folder(tmp_path, capsys):
    ro = tmp_path / "ro"
    if os.geteuid() != 0:  # permissions stop a user
        ro.mkdir()
        ro.chmod(0o555)
    else:  # root passes every permission check, not a read-only mount
        _mount_tmpfs(ro, "ro,size=1M")
    try:
        for out in (ro, ro / "new"):
            assert shard("digits", out) == 2
            assert one_line(capsys).startswith(f"sskd: error: {out}: cannot write the shard folder here (")
    finally:
        if os.geteuid() == 0:
            _umount(ro)
        else:
            ro.chmod(0o755)


def test_a_full_disk_while_writing_a_shard_keeps_what_is_finished(digits_shards, tmp_path, capsys):
    disk = tmp_path / "disk"
    _mount_tmpfs(disk, "size=2500k")
    try:
        out = disk / "d"
        assert shard("digits", out, "--max-count", 256) == 2
        line = one_line(capsys)
        assert (
            line.startswith(f"sskd: error: {out}/train-0000")
            and ".tar: cannot write it (No space left" in line
        )
        assert "--resume" in line
        assert not list(out.glob(".*.partial")) and not (out / "manifest.json").exists()
        progress = json.loads((out / ".progress.json").read_text())
        finished = [e["file"] for e in progress["splits"]["train"]]
        assert finished and all((out / f).is_file() for f in finished)
        subprocess.run(
            ["mount", "-o", "remount,size=40M", str(disk)], check=True, capture_output=True, timeout=30
        )
        assert shard("digits", out, "--max-count", 256, "--resume") == 0
        same_shards(out, digits_shards)  # byte-identical to an uninterrupted run
    finally:
        _umount(disk)


def test_a_file_size_limit_while_writing_a_shard(digits_shards, tmp_path, capsys):
    out = tmp_path / "d"
    # the writer alone (importing the whole CLI takes seconds on a loaded machine); its SSKDError is the
    # CLI's one line, anything else a traceback and another exit status
    code = (
        "import resource, signal, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"  # writes past the limit fail with EFBIG
        "resource.setrlimit(resource.RLIMIT_FSIZE, (400_000, 400_000))\n"
        "from shards.writer import write_digits\n"
        "from sskd.core.errors import SSKDError\n"
        "try:\n"
        f"    write_digits({str(out)!r}, max_count=256, progress=False)\n"
        "except SSKDError as exc:\n"
        "    sys.exit(f'sskd: error: {exc}')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    line = done.stderr.strip().splitlines()[-1]
    assert line.startswith(f"sskd: error: {out}/train-000000.tar: cannot write it (File too large)"), line
    assert "ulimit -f" in line
    assert (
        not list(out.glob(".*.partial"))
        and not list(out.glob("*.tar"))
        and not (out / "manifest.json").exists()
    )
    assert shard("digits", out, "--max-count", 256, "--resume") == 0
    same_shards(out, digits_shards)


# --- item 12: a FIFO (or socket, device) named like an image is never opened -------------------------


def test_a_fifo_named_like_an_image_is_refused_or_skipped(photo_tree, tmp_path, capsys):
    import signal

    src = tmp_path / "src"
    shutil.copytree(photo_tree, src)
    fifo = src / "train" / "n00000001" / "x.JPEG"
    os.mkfifo(fifo)

    def hung(*_):
        raise TimeoutError("sskd shard opened the FIFO and hangs")

    old = signal.signal(signal.SIGALRM, hung)
    signal.alarm(60)  # opening or reading the FIFO would block for ever: fail instead
    try:
        assert shard("imagefolder", src, tmp_path / "a", "--max-count", 16) == 2
        assert one_line(capsys) == (
            f"sskd: error: {fifo}: not a regular file (a FIFO), not an image; remove it, or "
            "use --skip-bad to skip it"
        )
        assert shard("imagefolder", src, tmp_path / "b", "--max-count", 16, "--skip-bad") == 0
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    m = load_manifest(tmp_path / "b")
    assert m["splits"]["train"]["num_samples"] == 48
    assert m["splits"]["train"]["skipped"] == [{"path": str(fifo), "reason": "not a regular file (a FIFO)"}]
