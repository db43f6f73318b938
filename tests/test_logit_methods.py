"""DKD, DIST and logit standardisation: every loss against the formula computed by hand (plain Python, or
Decimal where floats would underflow), their edge cases, DKD's warm-up, and kd / dkd / dist through
`sskd distill` live and from `sskd cache`."""

import json
import math
from decimal import Decimal, localcontext

import pytest
import torch

from sskd.cli import main as sskd_main
from sskd.losses.logit import dist_loss, dist_terms, dkd_loss, dkd_terms, standardize_logits
from sskd.losses.sskd import kd_loss
from sskd.methods import create_method
from sskd.methods.dist import DISTConfig
from sskd.methods.dkd import DKDConfig, warmup_factor
from sskd.models import create_model
from sskd.runs import load_model_info, read_metrics

FAST = [
    "--no-progress",
    "--batch-size",
    "16",
    "--set",
    "run.log_every=1",
    "--set",
    "data.eval_batch_size=256",
]


def run(*args) -> int:
    return sskd_main([str(a) for a in args])


# -- by hand ---------------------------------------------------------------------------------------------


def softmax_dec(row, T):
    """softmax(row / T) in 40-digit Decimal: no underflow for logits in the hundreds."""
    a = [Decimal(x) / Decimal(T) for x in row]
    m = max(a)
    e = [(x - m).exp() for x in a]
    z = sum(e)
    return [x / z for x in e]


def kl_dec(p, q):
    return sum(pi * (pi.ln() - qi.ln()) for pi, qi in zip(p, q) if pi > 0)


def dkd_by_hand(s, t, labels, T):
    """(TCKD, NCKD) of the paper, sample by sample: b = [p_y, Σ_{k≠y} p_k], q = p_{k≠y} / Σ_{k≠y} p_k."""
    with localcontext() as ctx:
        ctx.prec = 40
        tckd = nckd = Decimal(0)
        for srow, trow, y in zip(s.tolist(), t.tolist(), labels.tolist()):
            ps, pt = softmax_dec(srow, T), softmax_dec(trow, T)
            qs, qt = ([p for k, p in enumerate(q) if k != y] for q in (ps, pt))
            rest_s, rest_t = sum(qs), sum(qt)  # summed, not 1 − p_y: that rounds to 0 when p_y ~ 1
            tckd += kl_dec([pt[y], rest_t], [ps[y], rest_s])
            nckd += kl_dec([p / rest_t for p in qt], [p / rest_s for p in qs])
        n = Decimal(len(labels))
        return float(tckd / n * Decimal(T * T)), float(nckd / n * Decimal(T * T))


def softmax_py(row, T):
    m = max(row)
    e = [math.exp((x - m) / T) for x in row]
    return [x / sum(e) for x in e]


def pearson_py(u, v, eps=1e-8):
    mu, mv = sum(u) / len(u), sum(v) / len(v)
    du, dv = [x - mu for x in u], [x - mv for x in v]
    norm = math.sqrt(sum(a * a for a in du)) * math.sqrt(sum(b * b for b in dv))
    return sum(a * b for a, b in zip(du, dv)) / (norm + eps)


def dist_by_hand(s, t, tau):
    """(inter, intra): 1 − mean Pearson over the rows, then over the columns, of the softened predictions."""
    ys, yt = [softmax_py(r, tau) for r in s.tolist()], [softmax_py(r, tau) for r in t.tolist()]
    inter = 1 - sum(pearson_py(a, b) for a, b in zip(ys, yt)) / len(ys)
    cols = range(len(ys[0]))
    intra = 1 - sum(pearson_py([r[k] for r in ys], [r[k] for r in yt]) for k in cols) / len(cols)
    return inter, intra


def zscore_py(row):
    mean = sum(row) / len(row)
    std = math.sqrt(sum((x - mean) ** 2 for x in row) / (len(row) - 1))  # Bessel, as torch.std
    return [(x - mean) / (std + 1e-7) for x in row]


def kd_by_hand(s_rows, t_rows, T):
    total = 0.0
    for srow, trow in zip(s_rows, t_rows):
        ps, pt = softmax_py(srow, T), softmax_py(trow, T)
        total += sum(p * math.log(p / q) for p, q in zip(pt, ps))
    return total / len(s_rows) * T * T


def randn(*shape, seed=0, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


# -- DKD ---------------------------------------------------------------------------------------------------


def test_dkd_is_alpha_tckd_plus_beta_nckd_by_hand():
    s, t = randn(5, 7, seed=0, scale=2), randn(5, 7, seed=1, scale=2)
    labels = torch.tensor([0, 3, 6, 2, 3])
    for T in (1.0, 4.0):
        tckd, nckd = dkd_by_hand(s, t, labels, T)
        got = dkd_terms(s, t, labels, T)
        assert got[0].item() == pytest.approx(tckd, rel=1e-5)
        assert got[1].item() == pytest.approx(nckd, rel=1e-5)
        assert dkd_loss(s, t, labels, 1.0, 8.0, T).item() == pytest.approx(tckd + 8 * nckd, rel=1e-5)
        assert dkd_loss(s, t, labels, 0.5, 2.0, T).item() == pytest.approx(0.5 * tckd + 2 * nckd, rel=1e-5)
    # The paper's identity, per sample: KD = TCKD + (1 − p_t,y) · NCKD.
    for i in range(5):
        si, ti, yi = s[i : i + 1], t[i : i + 1], labels[i : i + 1]
        tckd, nckd = dkd_terms(si, ti, yi, 4.0)
        pt_y = torch.softmax(ti / 4.0, 1)[0, yi].item()
        assert kd_loss(si, ti, 4.0).item() == pytest.approx((tckd + (1 - pt_y) * nckd).item(), rel=1e-5)
    assert dkd_loss(t, t, labels, 1.0, 8.0, 4.0).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("case", ["label_on_top", "tiny", "huge", "student_sure"])
def test_dkd_stays_finite_and_exact_at_the_extremes(case):
    """mdistiller's log of summed probabilities is +inf once a mass underflows (it is in the
    "huge" and "student_sure" cases): here every case is finite and equals the 40-digit value."""
    labels = torch.tensor([1, 4, 0, 2])
    if case == "label_on_top":  # teacher and student both put the label first, by a wide margin
        s, t = randn(4, 6, seed=2), randn(4, 6, seed=3)
        s[range(4), labels] += 15.0
        t[range(4), labels] += 25.0
        T = 1.0
    elif case == "tiny":
        s, t, T = randn(4, 6, seed=4, scale=1e-6), randn(4, 6, seed=5, scale=1e-6), 4.0
    elif case == "huge":  # ~20·N(0, 1) at T = 1 and the label 150 below: the student's p_y is 0 in float32
        s, t, T = randn(4, 6, seed=6, scale=20), randn(4, 6, seed=7, scale=20), 1.0
        s[range(4), labels] = -150.0
    else:  # the student's non-target mass is exp(-200): 0 in float32
        s, t, T = torch.zeros(4, 6), randn(4, 6, seed=8), 1.0
        s[range(4), labels] = 200.0
    s.requires_grad_(True)
    tckd, nckd = dkd_terms(s, t, labels, T)
    (tckd + nckd).backward()
    want = dkd_by_hand(s.detach(), t, labels, T)
    assert math.isfinite(tckd.item()) and math.isfinite(nckd.item()) and torch.isfinite(s.grad).all()
    # abs: KL of near-equal distributions (tiny logits) is ~1e-13, below float32's rounding of log p − log q.
    assert tckd.item() == pytest.approx(want[0], rel=1e-4, abs=1e-6)
    assert nckd.item() == pytest.approx(want[1], rel=1e-4, abs=1e-6)


def test_dkd_warmup_factor_over_epochs():
    # mdistiller: min(e / 20, 1) for the 1-based epoch e; our epochs are 0-based.
    assert [warmup_factor(e, 20) for e in (0, 1, 9, 18, 19, 20, 239)] == [0.05, 0.1, 0.5, 0.95, 1.0, 1.0, 1.0]
    assert warmup_factor(0, 0) == 1.0 and warmup_factor(2, 4) == 0.75
    torch.manual_seed(0)
    teacher = create_model("resnet8", 10).eval()
    method = create_method(
        "dkd",
        student=create_model("resnet8", 10),
        teacher=teacher,
        cfg=DKDConfig(ce_weight=0.5),
    ).eval()
    batch = {
        "views": randn(4, 1, 3, 32, 32, seed=9),
        "label": torch.tensor([1, 2, 3, 4]),
        "id": torch.arange(4),
    }
    for epoch, factor in ((0, 0.05), (4, 0.25), (19, 1.0), (100, 1.0)):
        method.set_epoch(epoch)
        with torch.no_grad():
            out = method(batch)
        assert out["dkd"].item() == pytest.approx(out["tckd"].item() + 8.0 * out["nckd"].item(), rel=1e-6)
        want = 0.5 * out["ce"].item() + factor * out["dkd"].item()
        assert out["loss"].item() == pytest.approx(want, rel=1e-6)


# -- DIST --------------------------------------------------------------------------------------------------


def test_dist_is_tau2_beta_inter_plus_gamma_intra_by_hand():
    s, t = randn(6, 5, seed=10, scale=3), randn(6, 5, seed=11, scale=3)
    for tau in (1.0, 4.0):
        inter, intra = dist_by_hand(s, t, tau)
        got = dist_terms(s, t, tau)
        assert got[0].item() == pytest.approx(inter, rel=1e-5)
        assert got[1].item() == pytest.approx(intra, rel=1e-5)
        assert dist_loss(s, t, 1.0, 1.0, tau).item() == pytest.approx(tau**2 * (inter + intra), rel=1e-5)
        want = tau**2 * (2 * inter + 0.5 * intra)
        assert dist_loss(s, t, 2.0, 0.5, tau).item() == pytest.approx(want, rel=1e-5)


def test_dist_of_identical_predictions_is_zero():
    z = randn(8, 10, seed=12, scale=3)
    for other in (z, z + 7.0):  # a per-row shift leaves the softmax as it is
        assert dist_loss(other, z, 1.0, 1.0, 4.0).item() == pytest.approx(0.0, abs=1e-4)  # eps leaves ~1e-5
        assert dist_loss(other, z, 1.0, 1.0, 1.0).item() == pytest.approx(0.0, abs=1e-6)


def test_dist_with_a_constant_row_or_column_is_not_nan():
    s, t = randn(4, 5, seed=13), randn(4, 5, seed=14)
    s[2] = 0.0  # uniform prediction: its centred row is 0 and correlates 0 (eps), not 0/0
    s.requires_grad_(True)
    loss = dist_loss(s, t, 1.0, 1.0, 4.0)
    loss.backward()
    inter, intra = dist_by_hand(s.detach(), t, 4.0)
    assert torch.isfinite(s.grad).all() and loss.item() == pytest.approx(16 * (inter + intra), rel=1e-5)
    one = randn(1, 5, seed=15).requires_grad_(True)  # a batch of one: every column is constant
    loss = dist_loss(one, randn(1, 5, seed=16), 1.0, 1.0, 4.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(one.grad).all()
    assert dist_terms(one, randn(1, 5, seed=16), 4.0)[1].item() == pytest.approx(1.0)  # intra: every ρ is 0


# -- logit standardisation ---------------------------------------------------------------------------------


def test_standardize_is_the_zscore_and_ignores_shift_and_scale():
    z = randn(3, 6, seed=17, scale=4)
    want = [zscore_py(r) for r in z.tolist()]
    assert torch.allclose(standardize_logits(z), torch.tensor(want), atol=1e-6)
    for a, c in ((3.0, 5.0), (0.01, -2.0), (50.0, 100.0)):
        assert torch.allclose(standardize_logits(a * z + c), standardize_logits(z), atol=1e-4)
    assert torch.equal(standardize_logits(torch.full((2, 5), 3.0)), torch.zeros(2, 5))  # constant: 0, not NaN


def test_kd_loss_standardize_is_kd_of_the_zscores():
    s, t = randn(4, 6, seed=18, scale=3), randn(4, 6, seed=19, scale=5)
    zs, zt = [zscore_py(r) for r in s.tolist()], [zscore_py(r) for r in t.tolist()]
    for T in (2.0, 4.0):
        want = kd_by_hand(zs, zt, T)
        assert kd_loss(s, t, T, standardize=True).item() == pytest.approx(want, rel=1e-5)
        assert kd_loss(10 * s - 3, t, T, standardize=True).item() == pytest.approx(want, rel=1e-4)
        assert torch.equal(kd_loss(s, t, T, standardize=False), kd_loss(s, t, T))  # off: plain KD, bitwise
    # In DKD and DIST the flag Z-scores both networks' logits before the temperature softmax.
    labels = torch.tensor([0, 5, 2, 2])
    cases = (
        ("dkd", DKDConfig(T=2.0, standardize=True), lambda a, b: dkd_loss(a, b, labels, 1, 8, 2.0)),
        ("dist", DISTConfig(tau=2.0, standardize=True), lambda a, b: dist_loss(a, b, 1, 1, 2.0)),
    )
    for method, cfg, fn in cases:
        want = fn(standardize_logits(s), standardize_logits(t)).item()
        # The logits as the "student" (an identity) and as cached teacher outputs (b, 1, K).
        m = create_method(method, student=torch.nn.Identity(), teacher=None, cfg=cfg)
        out = m({"views": s[:, None], "label": labels, "t_logits": t[:, None]})
        assert out[method].item() == pytest.approx(want, rel=1e-6), method


def test_bad_values_are_refused_naming_the_key():
    from sskd.core.errors import SSKDError
    from sskd.engine.config import load_config

    for method, item, needle in (
        ("dkd", "dkd.T=0", "dkd.T must be > 0"),
        ("dkd", "dkd.warmup=-1", "dkd.warmup"),
        ("dist", "dist.tau=0", "dist.tau must be > 0"),
        ("kd", "kd.standardize=maybe", "kd.standardize"),
    ):
        with pytest.raises(SSKDError, match=needle):
            load_config(None, [f"student.method={method}", item])
    cfg = load_config(None, ["student.method=dkd", "dkd.standardize=true", "dkd.beta=72"])
    assert cfg.section("dkd").standardize is True and cfg.section("dkd").beta == 72.0


def test_kd_dist_dkd_share_the_logit_family_and_kd_is_listed_first():
    """:class:`LogitMethod` lives in ``sskd.methods.families`` and is still importable from
    ``sskd.methods.kd``; ``sskd methods`` lists KD before the methods built on it."""
    from sskd.methods import METHODS, describe
    from sskd.methods.families import LogitMethod
    from sskd.methods.kd import LogitMethod as from_kd

    assert from_kd is LogitMethod
    assert all(issubclass(METHODS["student"].get(n), LogitMethod) for n in ("kd", "dist", "dkd"))
    names = [r["name"] for r in describe("student")]
    assert names.index("kd") < names.index("dist") < names.index("dkd")


# -- through the commands ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def teacher(digits_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("logit_teacher") / "t"
    assert (
        run(
            "train-teacher",
            "--shards",
            digits_shards,
            "--arch",
            "resnet8",
            "--out",
            out,
            "--max-steps",
            2,
            *FAST,
        )
        == 0
    )
    return out


@pytest.mark.parametrize(
    "method, extra, terms",
    [
        ("dkd", [], {"ce", "dkd", "tckd", "nckd"}),
        ("dkd", ["--set", "dkd.standardize=true"], {"ce", "dkd", "tckd", "nckd"}),
        ("dist", [], {"ce", "dist", "inter", "intra"}),
        ("kd", ["--set", "kd.standardize=true"], {"ce", "kd"}),
    ],
)
def test_two_optimizer_steps_through_distill(method, extra, terms, teacher, digits_shards, tmp_path):
    out = tmp_path / "s"
    assert (
        run(
            "distill",
            "--method",
            method,
            "--teacher",
            teacher,
            "--student",
            "resnet8",
            "--shards",
            digits_shards,
            "--out",
            out,
            "--max-steps",
            2,
            *FAST,
            *extra,
        )
        == 0
    )
    rows = [r for r in read_metrics(out) if r["kind"] == "train"]
    assert [r["step"] for r in rows] == [1, 2] and terms <= rows[0].keys()
    assert all(math.isfinite(r[k]) for r in rows for k in terms | {"loss"})
    assert load_model_info(out)["method"] == method
    if extra:
        saved = (out / "config.yaml").read_text()
        assert f"{method}:" in saved and "standardize: true" in saved


@pytest.mark.parametrize(
    "method, extra", [("kd", []), ("dkd", ["--set", "dkd.standardize=true"]), ("dist", [])]
)
def test_cached_teacher_gives_the_live_terms(method, extra, teacher, digits_shards, tmp_path):
    from pipelines import ViewLoader
    from sskd.cache import CacheReader
    from sskd.runs.models import load_run_model

    cache = tmp_path / "c"
    assert (
        run(
            "cache",
            "--method",
            method,
            "--teacher",
            teacher,
            "--shards",
            digits_shards,
            "--epochs",
            1,
            "--out",
            cache,
            "--batch-size",
            256,
            "--no-progress",
        )
        == 0
    )
    manifest = json.loads((cache / "manifest.json").read_text())
    assert declared(manifest) == [{"name": "logits", "shape": [10], "topk": True}]  # may be stored as top-K
    assert manifest["topk"] is None  # here dense (fp16)
    t, _ = load_run_model(teacher)
    torch.manual_seed(0)
    student = create_model("resnet8", 10)
    live = create_method(method, student=student, teacher=t).eval()
    cached = create_method(method, student=student, teacher=None).eval()
    for m in (live, cached):
        m.cfg.standardize = bool(extra)
        m.set_epoch(3)
    batch = next(iter(ViewLoader(digits_shards, "train", batch_size=64, views=None).epoch(0)))
    stored = CacheReader(cache).lookup(batch["id"], 0)
    with torch.no_grad():
        want = t(batch["views"][:, 0])
        # The cache holds the live teacher's logits to fp16 rounding (< 2^-11 relative) ...
        assert torch.allclose(stored["t_logits"][:, 0], want, rtol=2e-3, atol=1e-3)
        a, c = live(batch), cached({**batch, **stored})
    terms = [k for k, v in a.items() if k != "logits"]
    assert c["ce"].item() == a["ce"].item()  # no teacher output enters the CE
    for k in terms:  # ... so every term agrees to that rounding
        assert c[k].item() == pytest.approx(a[k].item(), rel=5e-3, abs=1e-4), k
    if method != "dkd":  # the same path for all three: once is enough
        return
    # And `sskd distill` trains from it (no teacher model built).
    out = tmp_path / "s"
    assert (
        run(
            "distill",
            "--method",
            method,
            "--teacher",
            teacher,
            "--cache",
            cache,
            "--student",
            "resnet8",
            "--shards",
            digits_shards,
            "--out",
            out,
            "--max-steps",
            1,
            *FAST,
            *extra,
        )
        == 0
    )
    assert load_model_info(out)["cache"] == str(cache)


def declared(manifest: dict) -> list[dict]:
    """A cache manifest's outputs as the method declares them (name, shape, whether top-K may store them),
    each checked to be stored exactly (fp16): the digits' 10 classes never get a compact default."""
    assert all(o["storage"]["kind"] == "fp16" and o["storage"]["dim"] is None for o in manifest["outputs"])
    return [{k: o[k] for k in ("name", "shape", "topk")} for o in manifest["outputs"]]
