"""RKD, PKT and SP: the losses against their formulas written out in plain Python, the edge cases, gradients
that reach the student only, each method through `sskd distill`, cached terms against live ones, and the
build-time check of what the relation needs from both models."""

import json
import math

import pytest
import torch

from sskd.cli import main as sskd_main
from sskd.losses.relation import pkt_loss, rkd_loss, rkd_terms, sp_loss
from sskd.models import create_model
from sskd.models.registry import MODELS
from sskd.runs import read_metrics

FAST = [
    "--no-progress",
    "--batch-size",
    "16",
    "--set",
    "run.log_every=1",
    "--set",
    "data.eval_batch_size=128",
]
TERMS = {"rkd": ("rkd", "rkd_dist", "rkd_angle"), "pkt": ("pkt",), "sp": ("sp",)}
WEIGHT = {"rkd": 1.0, "pkt": 30000.0, "sp": 3000.0}  # RepDistiller's -b for each


def run(*args) -> int:
    return sskd_main([str(a) for a in args])


@MODELS.register("resnet8_nomaps")
def _resnet8_without_maps(num_classes):
    """A resnet8 whose ``features=True`` gives no feature maps (what SP cannot work with)."""
    model = create_model("resnet8", num_classes)
    model.maps = slice(0, 0)
    return model


# -- the formulas, by hand ---------------------------------------------------------------------------


def rows(x):
    return x.reshape(x.shape[0], -1).tolist()


def smooth_l1(a, b):
    d = abs(a - b)
    return 0.5 * d * d if d < 1 else d - 0.5


def rkd_by_hand(s, t):
    """25 · smooth-L1(distances / mean positive distance) + 50 · smooth-L1(angles at every anchor), loops."""

    def dists(x):
        n = len(x)
        d = [[math.dist(x[i], x[j]) if i != j else 0.0 for j in range(n)] for i in range(n)]
        pos = [v for r in d for v in r if v > 0]
        mu = sum(pos) / len(pos)
        return [[v / mu for v in r] for r in d]

    def angles(x):
        n = len(x)

        def unit(i, j):
            v = [b - a for a, b in zip(x[i], x[j])]
            norm = math.sqrt(sum(c * c for c in v))
            return [c / norm for c in v] if norm > 0 else [0.0] * len(v)

        return [
            [[sum(a * b for a, b in zip(unit(i, j), unit(i, k))) for k in range(n)] for j in range(n)]
            for i in range(n)
        ]

    s, t = rows(s), rows(t)
    ds, dt = dists(s), dists(t)
    n = len(s)
    l_d = sum(smooth_l1(a, b) for ra, rb in zip(ds, dt) for a, b in zip(ra, rb)) / n**2
    a_s, a_t = angles(s), angles(t)
    triplets = [(i, j, k) for i in range(n) for j in range(n) for k in range(n)]
    l_a = sum(smooth_l1(a_s[i][j][k], a_t[i][j][k]) for i, j, k in triplets) / n**3
    return l_d, l_a


def pkt_by_hand(s, t, eps=1e-7):
    def probs(x):
        x = [[v / (math.sqrt(sum(c * c for c in r)) + eps) for v in r] for r in x]
        sim = [[(sum(a * b for a, b in zip(ri, rj)) + 1) / 2 for rj in x] for ri in x]
        return [[v / sum(r) for v in r] for r in sim]

    ps, pt = probs(rows(s)), probs(rows(t))
    n = len(ps)
    pairs = [(i, j) for i in range(n) for j in range(n)]
    return sum(pt[i][j] * math.log((pt[i][j] + eps) / (ps[i][j] + eps)) for i, j in pairs) / n**2


def sp_by_hand(s, t):
    def gram(x):
        g = [[sum(a * b for a, b in zip(ri, rj)) for rj in x] for ri in x]
        return [[v / math.sqrt(sum(c * c for c in r)) for v in r] for r in g]

    gs, gt = gram(rows(s)), gram(rows(t))
    n = len(gs)
    return sum((gt[i][j] - gs[i][j]) ** 2 for i in range(n) for j in range(n)) / n**2


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_the_losses_are_their_formulas():
    s, t = randn(6, 5, seed=1), randn(6, 9, seed=2)  # any widths
    l_d, l_a = rkd_by_hand(s, t)
    dist, angle = rkd_terms(s, t)
    assert (dist.item(), angle.item()) == pytest.approx((l_d, l_a), rel=1e-9)
    assert rkd_loss(s, t).item() == pytest.approx(25 * l_d + 50 * l_a, rel=1e-9)
    assert rkd_loss(s, t, w_dist=1, w_angle=0).item() == pytest.approx(l_d, rel=1e-9)
    assert pkt_loss(s, t).item() == pytest.approx(pkt_by_hand(s, t), rel=1e-9)
    s_map, t_map = randn(5, 4, 3, 3, seed=3).relu(), randn(5, 7, 2, 2, seed=4).relu()  # any channels and size
    out = sp_loss(s_map, t_map)
    assert out.ndim == 0 and out.item() == pytest.approx(sp_by_hand(s_map, t_map), rel=1e-9)
    for fn in (rkd_loss, pkt_loss, sp_loss):  # float32 by default, and float32 under bf16 autocast
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = fn(s.float(), t.float())
        assert got.dtype == torch.float32 and got.item() == pytest.approx(fn(s, t).item(), rel=1e-5)


def test_edge_cases():
    # RKD with duplicate points: zero distances and zero difference vectors give no NaN and finite gradients
    s = randn(4, 6, seed=5)[[0, 0, 1, 2, 2, 3]].float().requires_grad_()
    t = randn(4, 8, seed=6)[[0, 1, 1, 2, 3, 3]].float()
    loss = rkd_loss(s, t)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
    one = torch.ones(1, 6, requires_grad=True)  # a batch of one: no pair at all, 0 rather than NaN
    assert rkd_loss(one, torch.ones(1, 3)).item() == 0
    # PKT: identical embeddings, or the same cosines at another width, give 0
    x = randn(7, 5, seed=7)
    assert pkt_loss(x, x.clone()).item() == 0
    q, _ = torch.linalg.qr(randn(12, 5, seed=8))  # orthonormal columns: x qᵀ keeps every inner product
    assert pkt_loss(x, x @ q.t()).item() == pytest.approx(0, abs=1e-12)
    # SP: scaling either map changes nothing
    s_map, t_map = randn(5, 4, 3, 3, seed=9).relu(), randn(5, 6, 3, 3, seed=10).relu()
    ref = sp_loss(s_map, t_map).item()
    assert ref > 0
    for a, b in [(1e3, 1.0), (1.0, 1e-3), (7.5, 0.2)]:
        assert sp_loss(a * s_map, b * t_map).item() == pytest.approx(ref, rel=1e-9)
    assert sp_loss(s_map, 3 * s_map).item() == pytest.approx(0, abs=1e-15)


@pytest.mark.parametrize("fn", [rkd_loss, pkt_loss, sp_loss])
def test_gradients_reach_the_student_only(fn):
    s = randn(6, 4, 2, 2, seed=11).relu().requires_grad_()
    t = randn(6, 3, 2, 2, seed=12).relu().requires_grad_()
    fn(s, t).backward()
    assert t.grad is None and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0


def test_rkd_pkt_sp_share_the_relation_family_and_rkd_is_listed_first():
    """:class:`RelationMethod` lives in ``sskd.methods.families`` and is still importable from
    ``sskd.methods.rkd``; ``sskd methods`` lists RKD before PKT and SP."""
    from sskd.methods import METHODS, describe
    from sskd.methods.families import CEKDConfig, RelationMethod
    from sskd.methods.rkd import RelationMethod as from_rkd

    assert from_rkd is RelationMethod
    for n in ("rkd", "pkt", "sp"):
        cls = METHODS["student"].get(n)
        assert issubclass(cls, RelationMethod) and issubclass(cls.Config, CEKDConfig)
    names = [r["name"] for r in describe("student")]
    assert names.index("rkd") < names.index("pkt") < names.index("sp")


@pytest.mark.parametrize("name", ["rkd", "pkt", "sp"])
def test_method_terms_and_gradients(name):
    """The method's terms are the functions' on the model features; a teacher of another width gets no
    gradient."""
    from sskd.methods import create_method

    torch.manual_seed(0)
    # feat 64 vs 128, last map 64 vs 128 channels
    student, teacher = create_model("resnet8", 10), create_model("wrn_16_2", 10)
    method = create_method(name, student=student, teacher=teacher)
    method.cfg.kd_weight = 0.5
    g = torch.Generator().manual_seed(1)
    batch = {
        "views": torch.randn(4, 1, 3, 32, 32, generator=g),
        "label": torch.tensor([1, 2, 3, 1]),
        "id": torch.arange(4),
    }
    out = method(batch)
    assert {"loss", "logits", "ce", "kd", *TERMS[name]} == out.keys()
    with torch.no_grad():
        fs, ft = student(batch["views"][:, 0], features=True), teacher(batch["views"][:, 0], features=True)
    pick = (lambda f: f.maps[-1]) if name == "sp" else (lambda f: f.feat)
    want = {"rkd": rkd_loss, "pkt": pkt_loss, "sp": sp_loss}[name](pick(fs), pick(ft))
    assert out[name].item() == pytest.approx(want.item(), rel=1e-5)
    total = out["ce"] + 0.5 * out["kd"] + WEIGHT[name] * out[name]
    assert out["loss"].item() == pytest.approx(total.item(), rel=1e-5)
    out["loss"].backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in student.parameters())


# -- through the commands ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def teacher(digits_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("relation") / "t"
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


@pytest.mark.parametrize("name", ["rkd", "pkt", "sp"])
def test_distill_two_steps(name, teacher, digits_shards, tmp_path):
    args = [
        "distill",
        "--method",
        name,
        "--teacher",
        teacher,
        "--student",
        "resnet8",
        "--shards",
        digits_shards,
        "--out",
        tmp_path / name,
        "--max-steps",
        2,
        *FAST,
    ]
    if name == "pkt":  # combined with KD through its own section
        args += ["--set", "pkt.kd_weight=0.9"]
    assert run(*args) == 0
    recs = [r for r in read_metrics(tmp_path / name) if r["kind"] == "train"]
    assert [r["step"] for r in recs] == [1, 2]
    first = recs[0]
    assert {"ce", "kd", *TERMS[name]} <= first.keys()
    kd_weight = 0.9 if name == "pkt" else 0.0
    want = first["ce"] + kd_weight * first["kd"] + WEIGHT[name] * first[name]
    # the log rounds every term to 6 decimals: PKT's (~1e-5, hence its weight 30000) keeps one digit or two
    assert first["loss"] == pytest.approx(want, rel=1e-4, abs=WEIGHT[name] * 6e-7)
    if name == "rkd":
        assert first["rkd"] == pytest.approx(25 * first["rkd_dist"] + 50 * first["rkd_angle"], rel=1e-4)


@pytest.mark.parametrize("name", ["rkd", "pkt", "sp"])
def test_cached_terms_equal_live_terms(name, teacher, digits_shards, tmp_path, capsys):
    from pipelines import ViewLoader
    from sskd.cache import CacheReader
    from sskd.methods import create_method
    from sskd.runs.models import load_run_model

    cache = tmp_path / "c"
    assert (
        run(
            "cache",
            "--method",
            name,
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
    feature = (
        {"name": "map", "shape": [64, 8, 8], "topk": False}
        if name == "sp"
        else {"name": "feat", "shape": [64], "topk": False}
    )
    manifest = json.loads((cache / "manifest.json").read_text())
    assert declared(manifest) == [{"name": "logits", "shape": [10], "topk": True}, feature]
    t, _ = load_run_model(teacher)
    torch.manual_seed(0)
    student = create_model("resnet8", 10)
    live = create_method(name, student=student, teacher=t).eval()
    cached = create_method(name, student=student, teacher=None).eval()
    batch = next(iter(ViewLoader(digits_shards, "train", batch_size=50).epoch(0)))
    with torch.no_grad():
        a, c = live(batch), cached({**batch, **CacheReader(cache).lookup(batch["id"], 0)})
    for k in ("ce", "kd", *TERMS[name], "loss"):
        assert c[k].item() == pytest.approx(a[k].item(), rel=5e-3, abs=1e-6), k  # fp16 teacher outputs
    if name == "rkd":  # `distill --cache` builds without a teacher model and starts from the same student
        common = [
            "distill",
            "--method",
            name,
            "--teacher",
            teacher,
            "--student",
            "resnet8",
            "--shards",
            digits_shards,
            "--max-steps",
            1,
            *FAST,
        ]
        assert run(*common, "--cache", cache, "--out", tmp_path / "cached") == 0
        assert run(*common, "--out", tmp_path / "live") == 0
        first = [
            next(r for r in read_metrics(tmp_path / d) if r["kind"] == "train") for d in ("cached", "live")
        ]
        assert first[0]["ce"] == first[1]["ce"]  # the same student on the same batch
        assert first[0]["rkd"] == pytest.approx(first[1]["rkd"], rel=5e-3)
    if name == "sp":  # the dry run prints the map's disk cost
        capsys.readouterr()
        assert (
            run(
                "cache",
                "--dry-run",
                "--method",
                name,
                "--teacher",
                teacher,
                "--shards",
                digits_shards,
                "--epochs",
                1,
            )
            == 0
        )
        assert "map 64x8x8" in capsys.readouterr().out


def test_what_the_relation_cannot_pair_is_one_line(teacher, digits_shards, tmp_path, capsys):
    common = ["distill", "--teacher", teacher, "--shards", digits_shards, "--max-steps", 1, *FAST]
    assert run(*common, "--method", "sp", "--student", "resnet8_nomaps", "--out", tmp_path / "sp") == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--method sp" in err, err
    assert "student resnet8_nomaps gives none, teacher resnet8 gives 2x64x8x8" in err
    # RKD reads the pooled feature, which that student still has: it trains
    assert run(*common, "--method", "rkd", "--student", "resnet8_nomaps", "--out", tmp_path / "rkd") == 0
    # a wrapped teacher (an SS-head run) answers features=True with its backbone's features
    from sskd.methods.rkd import StudentRKD
    from sskd.models.heads import SSModel

    wrapped = SSModel(create_model("resnet8", 10)).eval()
    x = torch.randn(2, 1, 3, 32, 32)
    with torch.no_grad():
        got, want = StudentRKD.teacher_outputs(wrapped, x), wrapped.backbone(x[:, 0], features=True)
    assert torch.equal(got["feat"][:, 0], want.feat) and torch.equal(got["logits"][:, 0], want.logits)


def declared(manifest: dict) -> list[dict]:
    """A cache manifest's outputs as the method declares them (name, shape, whether top-K may store them),
    each checked to be stored exactly (fp16): the digits' 10 classes never get a compact default."""
    assert all(o["storage"]["kind"] == "fp16" and o["storage"]["dim"] is None for o in manifest["outputs"])
    return [{k: o[k] for k in ("name", "shape", "topk")} for o in manifest["outputs"]]
