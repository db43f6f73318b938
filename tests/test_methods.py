"""Methods as modules: named terms, frozen teacher, ss_head stage, cached teacher outputs."""

import pytest
import torch

from sskd.losses import SSKDLossConfig
from sskd.methods import METHODS, create_method, method_class
from sskd.models import create_model
from sskd.models.heads import SSModel


def batch(b=4, v=4, k=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "views": torch.randn(b, v, 3, 32, 32, generator=g),
        "label": torch.randint(0, k, (b,), generator=g),
        "id": torch.arange(b),
    }


def ss(name="resnet8", k=10, seed=0):
    torch.manual_seed(seed)
    return SSModel(create_model(name, k))


def snapshot(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def test_registry_names_by_role():
    assert {"ce", "kd", "sskd", "hssakd", "hssakd_online"} <= set(METHODS["student"].names())
    assert {"ce", "hssakd"} <= set(METHODS["teacher"].names())
    assert {"sskd", "hssakd"} <= set(METHODS["head"].names())


def test_sskd_terms_and_frozen_teacher():
    teacher, student = ss(seed=1), ss(seed=2)
    method = create_method("sskd", student=student, teacher=teacher)
    method.train()
    assert not teacher.training  # stays in eval even when the method trains
    assert all(not p.requires_grad for p in teacher.parameters())
    assert not any(k.startswith("teacher") for k in method.state_dict())  # not a registered submodule
    assert {id(p) for p in method.parameters()} == {id(p) for p in student.parameters()}
    before = snapshot(teacher)
    opt = torch.optim.SGD(method.parameters(), lr=0.1)
    out = method(batch())
    assert {"loss", "logits", "ce", "kd", "tf", "ss"} <= out.keys()
    assert out["logits"].shape == (4, 10)
    cfg = SSKDLossConfig()
    total = (
        cfg.ce_weight * out["ce"]
        + cfg.kd_weight * out["kd"]
        + cfg.tf_weight * out["tf"]
        + cfg.ss_weight * out["ss"]
    )
    assert out["loss"].item() == pytest.approx(total.item(), rel=1e-6)
    out["loss"].backward()
    assert student.head.net[0].weight.grad is not None and student.backbone.fc.weight.grad is not None
    assert all(p.grad is None for p in teacher.parameters())
    opt.step()
    after = snapshot(teacher)
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights and BN running stats untouched


def test_the_teacher_is_frozen_and_outside_the_method():
    """The teacher is no part of what trains, is saved or is wrapped by DDP: the loop moves it itself."""
    teacher = ss()
    method = create_method("sskd", student=ss(seed=3), teacher=teacher)
    assert method.teacher is teacher and not teacher.training
    assert not any(p.requires_grad for p in teacher.parameters())
    ids = {id(p) for p in teacher.parameters()}
    assert not ids & {id(p) for p in method.parameters()}
    assert not any(k.startswith("teacher") for k in method.state_dict())
    method.train()
    assert not teacher.training  # train() reaches the method's modules only
    method.to(torch.float64)
    assert next(teacher.parameters()).dtype == torch.float32
    method.frozen_teacher.to(torch.float64)  # what the loop does, to the training device
    assert next(teacher.parameters()).dtype == torch.float64


def test_ss_head_stage_trains_only_the_head():
    model = ss()
    method = create_method("sskd", role="head", student=model)
    method.train()
    assert not model.backbone.training and model.head.training
    before = snapshot(model.backbone)
    head_before = model.head.net[0].weight.clone()
    opt = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=0.5, momentum=0.9)
    for i in range(2):
        out = method(batch(seed=i))
        assert {"loss", "logits", "ss", "ss_acc"} <= out.keys()
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    after = snapshot(model.backbone)
    assert all(torch.equal(before[k], after[k]) for k in before)  # backbone + classifier bit-identical
    assert not torch.equal(head_before, model.head.net[0].weight)


def test_contrastive_target_layout_matches_eq5():
    """ss_head loss equals Eq. 5 computed directly from the per-view embeddings."""
    from sskd.losses import contrastive_loss, similarity_matrix

    model = ss().eval()
    method = create_method("sskd", role="head", student=model)
    b = batch(b=3, v=3)
    out = method(b)
    with torch.no_grad():
        z = torch.stack([model(b["views"][:, j]).embed for j in range(3)], dim=1)  # (b, v, d)
        rows = torch.cat([z[i, 1:] for i in range(3)])  # image-major: (i, view 1), (i, view 2), ...
        target = torch.tensor([0, 0, 1, 1, 2, 2])
        expected = contrastive_loss(similarity_matrix(rows, z[:, 0]), target, 1.0)
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize(
    "name, role, terms",
    [("ce", "student", {"ce"}), ("kd", "student", {"ce", "kd"}), ("ce", "teacher", {"ce"})],
)
def test_normal_view_methods(name, role, terms):
    teacher = create_model("resnet8", 10).eval() if name == "kd" else None
    method = create_method(name, role=role, student=create_model("resnet8", 10), teacher=teacher)
    assert method.views is None  # the normal view only
    out = method(batch(v=1))
    assert terms <= out.keys() and out["loss"].ndim == 0


def test_cached_teacher_outputs_give_the_live_terms():
    teacher, student = ss(seed=1), ss(seed=2)
    live = create_method("sskd", student=student, teacher=teacher).eval()
    cached = create_method("sskd", student=student, teacher=None).eval()
    b = batch()
    with torch.no_grad():
        out = teacher(b["views"].flatten(0, 1))
        b_cached = dict(b, t_logits=out.logits.view(4, 4, -1).half(), t_embed=out.embed.view(4, 4, -1).half())
        a, c = live(b), cached(b_cached)
    for k in ("ce", "kd", "tf", "ss", "loss"):
        assert c[k].item() == pytest.approx(a[k].item(), rel=2e-3, abs=1e-4), k


def test_sskd_without_ss_views_reduces_to_ce_plus_kd():
    method = create_method("sskd", student=ss(seed=2), teacher=ss(seed=1))
    out = method(batch(v=1))
    assert out["tf"].item() == 0.0 and out["ss"].item() == 0.0
    assert out["loss"].item() == pytest.approx((0.1 * out["ce"] + 0.9 * out["kd"]).item(), rel=1e-6)


def test_global_ss_batch_uses_the_gathered_columns():
    """With a gather (all ranks' normal-view embeddings), L_ss is Eq. 6 over the global columns."""
    from sskd.losses import similarity_matrix, ss_kd_loss

    teacher, student = ss(seed=1), ss(seed=2)
    b = batch(b=3, v=3)
    g = torch.Generator().manual_seed(9)
    other_s, other_t = torch.randn(2, 64, generator=g), torch.randn(2, 64, generator=g)

    def gather(z):  # as rank 1 of 2 whose peer holds 2 samples: peer rows first, offset 2
        other = (other_s, other_t)[
            gather.calls % 2
        ]  # the method gathers the student's columns, then the teacher's
        gather.calls += 1
        return torch.cat([other, z]), 2

    gather.calls = 0
    method = method_class("student", "sskd")(student, teacher, gather=gather).eval()  # as a run builds it
    with torch.no_grad():
        out = method(b)
        s_out, t_out = student(b["views"].flatten(0, 1)), teacher(b["views"].flatten(0, 1))
        zs, zt = s_out.embed.view(3, 3, -1), t_out.embed.view(3, 3, -1)

        def rows(z):
            return torch.cat([z[i, 1:] for i in range(3)])

        target = torch.tensor([0, 0, 1, 1, 2, 2]) + 2
        expected = ss_kd_loss(
            similarity_matrix(rows(zs), torch.cat([other_s, zs[:, 0]])),
            similarity_matrix(rows(zt), torch.cat([other_t, zt[:, 0]])),
            target,
            0.5,
            0.75,
        )
    assert out["ss"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_create_method_takes_num_classes_with_a_deprecation_warning():
    """``num_classes=`` is accepted still but ignored: a method takes the class count from its models."""
    with pytest.warns(DeprecationWarning, match="num_classes"):
        method = create_method(
            "kd", student=create_model("resnet8", 10), teacher=create_model("resnet8", 10), num_classes=10
        )
    assert not hasattr(method, "num_classes")
    assert method(batch(v=1))["logits"].shape == (4, 10)
