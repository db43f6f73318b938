"""``sskd analyze similarity | tsne | selection`` and the measures behind them (:mod:`sskd.experiments.analyze`)."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from sskd.cli import main as sskd_main
from sskd.experiments.analyze import Collected, class_kl, collect, linear_cka, selection_batch

FAST = [
    "--no-progress",
    "--batch-size",
    "32",
    "--set",
    "run.log_every=1",
    "--set",
    "data.eval_batch_size=128",
]


def run(*args) -> int:
    return sskd_main([str(a) for a in args])


# -- references written from the formulas -----------------------------------------------------------


def cka_reference(x: np.ndarray, y: np.ndarray) -> float:
    """Kornblith et al. 2019 in its kernel form: HSIC(K, L) = tr(K H L H) / (n-1)², K = X Xᵀ, L = Y Yᵀ."""
    n = len(x)
    h = np.eye(n) - np.ones((n, n)) / n
    k, lm = x @ x.T, y @ y.T

    def hsic(a, b):
        return np.trace(a @ h @ b @ h) / (n - 1) ** 2

    return hsic(k, lm) / np.sqrt(hsic(k, k) * hsic(lm, lm))


def kl_reference(t: np.ndarray, s: np.ndarray) -> float:
    """mean_i sum_k p_t log(p_t / p_s), p = softmax at T = 1, natural log."""
    t, s = t.astype(np.float64), s.astype(np.float64)
    p_t = np.exp(t - t.max(1, keepdims=True))
    p_t /= p_t.sum(1, keepdims=True)
    p_s = np.exp(s - s.max(1, keepdims=True))
    p_s /= p_s.sum(1, keepdims=True)
    return float(np.mean(np.sum(p_t * np.log(p_t / p_s), axis=1)))


# -- pure functions ----------------------------------------------------------------------------------


def test_linear_cka_against_the_formula():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 12))
    y = x[:, :5] @ rng.normal(size=(5, 7)) + 0.5 * rng.normal(size=(60, 7))  # related, another width
    assert linear_cka(x, y) == pytest.approx(cka_reference(x, y), rel=1e-9)
    assert 0 < linear_cka(x, y) < 1
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    q, _ = np.linalg.qr(rng.normal(size=(12, 12)))  # an orthogonal rotation of the features
    assert linear_cka(x @ q, y) == pytest.approx(linear_cka(x, y), rel=1e-9)
    assert linear_cka(3.7 * x, 0.01 * y) == pytest.approx(linear_cka(x, y), rel=1e-9)  # isotropic scaling
    assert linear_cka(x + 5.0, y) == pytest.approx(
        linear_cka(x, y), rel=1e-9
    )  # centring: offsets do not count
    wide = rng.normal(size=(60, 300))  # wider than the sample count
    assert linear_cka(x, wide) == pytest.approx(cka_reference(x, wide), rel=1e-9)
    assert linear_cka(torch.from_numpy(x).float(), torch.from_numpy(y).float()) == pytest.approx(
        cka_reference(x, y), rel=1e-5
    )  # tensors are accepted too
    with pytest.raises(Exception, match="rows"):
        linear_cka(x, y[:10])


def test_class_kl_against_the_formula():
    rng = np.random.default_rng(1)
    t, s = rng.normal(size=(40, 10)) * 3, rng.normal(size=(40, 10)) * 3
    assert class_kl(t, t) == 0.0
    assert class_kl(t, s) == pytest.approx(kl_reference(t, s), rel=1e-10)
    assert class_kl(t, s) > 0
    assert class_kl(t, t + 4.0) == pytest.approx(0.0, abs=1e-12)  # a shift of all logits is the same softmax
    assert class_kl(t, s) != pytest.approx(class_kl(s, t))  # the teacher is the first argument


def test_selection_batch_counts():
    torch.manual_seed(0)
    b, v, d = 16, 4, 8
    base = torch.randn(b, 1, d)
    perfect = base.repeat(1, v, 1) + 0.01 * torch.randn(b, v, d)  # every transformed row near its own image
    got = selection_batch(perfect, 0.75)
    assert got["rows"].tolist() == [b] * (v - 1)
    assert got["correct"].tolist() == [b] * (v - 1) and got["kept"].tolist() == [b] * (v - 1)
    noise = torch.randn(b, v, d)
    got = selection_batch(noise, 0.5)
    from sskd.losses import select_rows, similarity_matrix

    sim = similarity_matrix(noise[:, 1:].reshape(-1, d), noise[:, 0])
    target = torch.arange(b).repeat_interleave(v - 1)
    keep = select_rows(sim, target, 0.5).reshape(b, v - 1)
    assert got["kept"].tolist() == keep.sum(0).tolist()
    assert got["correct"].tolist() == (sim.argmax(1) == target).reshape(b, v - 1).sum(0).tolist()


def test_help_texts(capsys):
    for args, needles in (
        (["analyze"], ["similarity", "tsne", "selection", "example:"]),
        (["analyze", "similarity"], ["temperature 1", "natural log", "linear CKA", "example:"]),
        (["analyze", "tsne"], ["random_state", "example:"]),
        (["analyze", "selection"], ["select_rows", "ss_ratio", "example:"]),
    ):
        with pytest.raises(SystemExit) as exc:
            run(*args, "--help")
        assert exc.value.code == 0
        text = " ".join(capsys.readouterr().out.split())
        for needle in needles:
            assert needle in text, (args, needle)


# -- on tiny trained runs ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def runs(digits_shards, tmp_path_factory):
    """A tiny teacher, its SS head (an SSModel run) and another model of another width."""
    root = tmp_path_factory.mktemp("analyze-runs")
    assert (
        run(
            "train-teacher",
            "--shards",
            digits_shards,
            "--arch",
            "resnet8",
            "--out",
            root / "t",
            "--max-steps",
            3,
            *FAST,
        )
        == 0
    )
    assert (
        run(
            "train-ss-head",
            "--teacher",
            root / "t",
            "--shards",
            digits_shards,
            "--out",
            root / "t-ss",
            "--max-steps",
            2,
            *FAST,
        )
        == 0
    )
    assert (
        run(
            "train-teacher",
            "--shards",
            digits_shards,
            "--arch",
            "wrn_16_2",
            "--out",
            root / "other",
            "--max-steps",
            2,
            *FAST,
        )
        == 0
    )
    return root


def _val_collect(runs_root, names, shards):
    from pipelines import ViewLoader
    from sskd.runs.models import load_run_model

    models = [load_run_model(runs_root / n)[0] for n in names]
    loader = ViewLoader(shards, "val", batch_size=128, views=None, train=False)
    return collect(models, loader)


def _n_val(shards) -> int:
    return json.loads((Path(shards) / "manifest.json").read_text())["splits"]["val"]["num_samples"]


def test_similarity_of_a_model_with_itself(runs, digits_shards, tmp_path):
    n_val = _n_val(digits_shards)
    assert (
        run(
            "analyze",
            "similarity",
            "--teacher",
            runs / "t",
            "--student",
            runs / "t",
            "--shards",
            digits_shards,
            "--no-progress",
            "--json",
            tmp_path / "self.json",
        )
        == 0
    )
    same = json.loads((tmp_path / "self.json").read_text())
    assert {"kl", "cka", "count", "teacher", "student"} <= same.keys()
    assert same["kl"] == pytest.approx(0.0, abs=1e-12) and same["cka"] == pytest.approx(1.0, abs=1e-9)
    assert same["count"] == n_val
    # The SS-head teacher answers features=True with its backbone's: the same model as t.
    assert (
        run(
            "analyze",
            "similarity",
            "--teacher",
            runs / "t-ss",
            "--student",
            runs / "t",
            "--shards",
            digits_shards,
            "--no-progress",
            "--json",
            tmp_path / "wrapped.json",
        )
        == 0
    )
    wrapped = json.loads((tmp_path / "wrapped.json").read_text())
    assert wrapped["kl"] == pytest.approx(0.0, abs=1e-12) and wrapped["cka"] == pytest.approx(1.0, abs=1e-9)


def test_similarity_of_two_models_equals_numpy(runs, digits_shards, tmp_path):
    n_val = _n_val(digits_shards)
    # Another model of another feature width (resnet8: 64, wrn_16_2: 128).
    assert (
        run(
            "analyze",
            "similarity",
            "--teacher",
            runs / "t-ss",
            "--student",
            runs / "other",
            "--shards",
            digits_shards,
            "--no-progress",
            "--json",
            tmp_path / "other.json",
        )
        == 0
    )
    other = json.loads((tmp_path / "other.json").read_text())
    assert other["teacher"] == str(runs / "t-ss") and other["student"] == str(runs / "other")
    t, s = _val_collect(runs, ["t-ss", "other"], digits_shards)
    assert isinstance(t, Collected) and t.feat.shape[1] != s.feat.shape[1] and t.count == n_val
    assert other["kl"] > 0
    assert other["kl"] == pytest.approx(kl_reference(t.logits, s.logits), rel=1e-6)
    assert other["cka"] == pytest.approx(
        cka_reference(t.feat.astype(np.float64), s.feat.astype(np.float64)), rel=1e-6
    )
    assert 0 < other["cka"] < 1


def test_tsne_writes_a_png(runs, digits_shards, tmp_path):
    out = tmp_path / "pics" / "tsne.png"
    assert (
        run(
            "analyze",
            "tsne",
            "--model",
            runs / "other",
            "--shards",
            digits_shards,
            "--out",
            out,
            "--max-samples",
            60,
            "--no-progress",
            "--json",
            tmp_path / "tsne.json",
        )
        == 0
    )
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    img = plt.imread(out)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    assert img[..., :3].std() > 0  # not a blank picture
    result = json.loads((tmp_path / "tsne.json").read_text())
    assert result["path"] == str(out) and result["count"] == 60
    assert isinstance(result["kl_divergence"], float) and result["kl_divergence"] >= 0
    assert not list(out.parent.glob(".*.partial"))  # written atomically: no temporary left behind


def test_selection_matches_select_rows_by_hand(runs, digits_shards, tmp_path):
    from einops import rearrange

    from pipelines import ViewLoader
    from pipelines.plan import ViewConfig
    from sskd.losses import select_rows
    from sskd.runs.models import load_run_model

    assert (
        run(
            "analyze",
            "selection",
            "--teacher",
            runs / "t-ss",
            "--shards",
            digits_shards,
            "--batch-size",
            32,
            "--max-batches",
            1,
            "--no-progress",
            "--json",
            tmp_path / "sel.json",
        )
        == 0
    )
    result = json.loads((tmp_path / "sel.json").read_text())
    names = ViewConfig.parse("rotation").ss_views  # SSKD's default views (the run's data.views is auto)
    assert result["view_names"] == list(names) and sorted(result["views"]) == sorted(names)
    assert result["batches"] == 1 and result["count"] == 32 and result["keep_ratio"] == 0.75
    for entry in [*result["views"].values(), result["overall"]]:
        assert 0 <= entry["ss_acc"] <= 1 and 0 <= entry["keep"] <= 1
        assert entry["keep"] >= entry["ss_acc"]  # every row ranked right is kept
    assert result["overall"]["rows"] == 32 * len(names)

    # The same batch by hand: epoch 0 of the training views, the teacher's SS embeddings, cosine matrix.
    model = load_run_model(runs / "t-ss")[0].eval()
    loader = ViewLoader(digits_shards, "train", batch_size=32, views="rotation", train=True, seed=0)
    batch = next(iter(loader.epoch(0)))
    b, v = batch["views"].shape[:2]
    with torch.no_grad():
        z = rearrange(
            model(rearrange(batch["views"], "b v c h w -> (b v) c h w")).embed, "(b v) d -> b v d", b=b
        )
    zn = torch.nn.functional.normalize(z, dim=-1)
    sim = torch.einsum("bvd,cd->bvc", zn[:, 1:], zn[:, 0]).reshape(b * (v - 1), b)  # rows (image, view)
    target = torch.arange(b).repeat_interleave(v - 1)
    keep = select_rows(sim, target, 0.75)
    assert result["overall"]["keep"] == pytest.approx(keep.float().mean().item())
    assert result["overall"]["ss_acc"] == pytest.approx((sim.argmax(1) == target).float().mean().item())
    per_view = keep.reshape(b, v - 1).float().mean(0).tolist()
    assert [result["views"][n]["keep"] for n in names] == pytest.approx(per_view)


def test_selection_refuses_a_teacher_without_ss_head(runs, digits_shards, capsys):
    assert (
        run("analyze", "selection", "--teacher", runs / "t", "--shards", digits_shards, "--no-progress") == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sskd: error:")
    assert "no SS head" in err[0] and f"sskd train-ss-head --teacher {runs / 't'}" in err[0]


def test_bad_inputs_are_one_line_errors(runs, digits_shards, tmp_path, capsys):
    empty = tmp_path / "empty-run"
    empty.mkdir()
    fake = tmp_path / "t100"
    shutil.copytree(runs / "t", fake)
    info = json.loads((fake / "model.json").read_text())
    info["num_classes"] = 100
    (fake / "model.json").write_text(json.dumps(info))
    no_val = tmp_path / "no-val"
    shutil.copytree(digits_shards, no_val)
    manifest = json.loads((no_val / "manifest.json").read_text())
    del manifest["splits"]["val"]
    (no_val / "manifest.json").write_text(json.dumps(manifest))
    rot = tmp_path / "t-ss-rot"  # an SS head of another pretext task: its rows are no similarity rows
    shutil.copytree(runs / "t-ss", rot)
    info = json.loads((rot / "model.json").read_text())
    info["wrapper_args"] = {"pretext": "rotation"}
    (rot / "model.json").write_text(json.dumps(info))
    cases = [
        (["selection", "--teacher", rot, "--shards", digits_shards], "trained for the rotation pretext task"),
        (
            ["similarity", "--teacher", empty, "--student", runs / "t", "--shards", digits_shards],
            "missing model.json",
        ),
        (
            ["tsne", "--model", fake, "--shards", digits_shards, "--out", tmp_path / "x.png"],
            "model.json: num_classes is 100",
        ),
        (
            ["similarity", "--teacher", runs / "t", "--student", runs / "t", "--shards", no_val],
            "manifest.json: no 'val' split",
        ),
        (["selection", "--teacher", fake, "--shards", digits_shards], "no SS head"),
    ]
    for args, needle in cases:
        assert run("analyze", *args, "--no-progress") == 2, args
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("sskd: error:") and needle in err[0], (args, err)
    assert not (tmp_path / "x.png").exists()
