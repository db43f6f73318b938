"""Every SSKD loss against a from-the-formula computation on small tensors (Sec. 3, Eqs. 2, 4-8)."""

import math

import pytest
import torch

from sskd.losses import (
    SSKDLossConfig,
    contrastive_loss,
    kd_loss,
    select_rows,
    similarity_matrix,
    ss_kd_loss,
    sskd_total,
    target_rank,
    transformed_kd_loss,
)


def kl_rows_by_hand(s, t, T):
    """KL(softmax(t/T) || softmax(s/T)) row by row with plain Python math."""
    out = []
    for srow, trow in zip(s.tolist(), t.tolist()):
        es = [math.exp(x / T) for x in srow]
        et = [math.exp(x / T) for x in trow]
        ps = [e / sum(es) for e in es]
        pt = [e / sum(et) for e in et]
        out.append(sum(p * math.log(p / q) for p, q in zip(pt, ps)))
    return out


def test_kd_loss_is_eq2():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    for T in (1.0, 4.0):
        expected = sum(kl_rows_by_hand(s, t, T)) / 5 * T * T
        assert kd_loss(s, t, T).item() == pytest.approx(expected, rel=1e-5)
    assert kd_loss(t, t, 4.0).item() == pytest.approx(0.0, abs=1e-6)


def test_kd_loss_golden_value():
    s = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 1.0]])
    t = torch.tensor([[3.0, 2.0, 1.0], [0.0, 1.0, 0.0]])
    # (KL rows [1,2,3]||[3,2,1] and [0,0,1]||[0,1,0] at T=4, by plain math in python3) / 2 * 16
    assert kd_loss(s, t, 4.0).item() == pytest.approx(0.8327889, abs=1e-6)


def test_similarity_matrix_is_cosine():
    g = torch.Generator().manual_seed(1)
    zv, zn = torch.randn(6, 4, generator=g), torch.randn(3, 4, generator=g)
    sim = similarity_matrix(zv, zn)
    assert sim.shape == (6, 3)
    for i in range(6):
        for j in range(3):
            cos = (zv[i] @ zn[j]) / (zv[i].norm() * zn[j].norm())
            assert sim[i, j].item() == pytest.approx(cos.item(), abs=1e-6)


def test_contrastive_loss_is_eq5():
    sim = torch.tensor([[0.9, 0.1, -0.2], [0.3, 0.8, 0.0], [0.5, 0.4, 0.6], [0.0, 0.2, 0.1]])
    target = torch.tensor([0, 1, 2, 0])
    tau = 0.5
    by_hand = []
    for row, t in zip(sim.tolist(), target.tolist()):
        e = [math.exp(x / tau) for x in row]
        by_hand.append(-math.log(e[t] / sum(e)))
    assert contrastive_loss(sim, target, tau).item() == pytest.approx(sum(by_hand) / 4, rel=1e-6)


def test_target_rank_and_ties():
    scores = torch.tensor([[0.9, 0.5, 0.1], [0.2, 0.7, 0.7], [0.3, 0.3, 0.3], [0.1, 0.2, 0.9]])
    target = torch.tensor([0, 2, 1, 0])
    # row 1: target 2 tied with column 1, which comes first -> rank 1; row 2: three-way tie -> rank 1
    assert target_rank(scores, target).tolist() == [0, 1, 1, 2]


def test_select_rows_official_rule():
    # ranks: rows 0,3 correct (0); wrong rows 1 (rank 2), 2 (rank 1), 4 (rank 1), 5 (rank 3)
    scores = torch.tensor(
        [[5.0, 1, 0, 0], [0, 5, 4, 1], [4, 5, 0, 0], [0, 0, 0, 9], [1, 2, 3, 0], [1, 2, 3, 4]]
    )
    target = torch.tensor([0, 3, 0, 3, 1, 0])
    assert target_rank(scores, target).tolist() == [0, 2, 1, 0, 1, 3]

    def keep(r):
        return select_rows(scores, target, r).tolist()

    assert keep(0.0) == [True, False, False, True, False, False]
    assert keep(1.0) == [True] * 6
    # 4 wrong rows, ratio 0.5 -> int(2.0) = 2 kept: the two of rank 1 (rows 2 and 4)
    assert keep(0.5) == [True, False, True, True, True, False]
    # ratio 0.75 -> int(3.0) = 3: rank-1 rows and then rank 2 (row 1); rank 3 dropped
    assert keep(0.75) == [True, True, True, True, True, False]
    # ratio 0.3 -> int(1.2) = 1: of the two rank-1 rows the earlier one (row 2)
    assert keep(0.3) == [True, False, True, True, False, False]


def test_select_rows_all_correct_and_all_wrong():
    eye = torch.eye(4) * 3
    assert select_rows(eye, torch.arange(4), 0.0).all()
    wrong_target = torch.tensor([1, 2, 3, 0])
    assert not select_rows(eye, wrong_target, 0.0).any()
    assert select_rows(eye, wrong_target, 1.0).all()


def test_ss_kd_loss_is_eq6_over_kept_rows():
    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(6, 3, generator=g), torch.randn(6, 3, generator=g)
    target = torch.tensor([0, 1, 2, 0, 1, 2])
    T = 0.5
    keep = select_rows(t, target, 0.75)
    expected = sum(k for k, m in zip(kl_rows_by_hand(s, t, T), keep.tolist()) if m) / int(keep.sum()) * T * T
    assert ss_kd_loss(s, t, target, T, 0.75).item() == pytest.approx(expected, rel=1e-5)


def test_transformed_kd_loss_is_eq7():
    g = torch.Generator().manual_seed(3)
    s, t = torch.randn(8, 5, generator=g), torch.randn(8, 5, generator=g)
    labels = torch.randint(0, 5, (8,), generator=g)
    for ratio in (0.0, 0.5, 1.0):
        keep = select_rows(t, labels, ratio)
        rows = [k for k, m in zip(kl_rows_by_hand(s, t, 4.0), keep.tolist()) if m]
        expected = sum(rows) / len(rows) * 16 if rows else 0.0
        assert transformed_kd_loss(s, t, labels, 4.0, ratio).item() == pytest.approx(
            expected, rel=1e-5, abs=1e-7
        )


def test_no_kept_rows_gives_zero_with_gradient_not_nan():
    s = torch.randn(4, 4, requires_grad=True)
    t = torch.eye(4) * 5
    wrong = torch.tensor([1, 2, 3, 0])
    loss = ss_kd_loss(s, t, wrong, 0.5, 0.0)
    assert loss.item() == 0.0 and not torch.isnan(loss)
    loss.backward()
    assert s.grad is not None and torch.equal(s.grad, torch.zeros_like(s))


def test_gradients_flow_to_the_student_only():
    s = torch.randn(6, 3, requires_grad=True)
    t = torch.randn(6, 3, requires_grad=True)
    (kd_loss(s, t, 4.0) + ss_kd_loss(s, t, torch.tensor([0, 1, 2, 0, 1, 2]), 0.5, 1.0)).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None


def test_eq8_total_and_official_defaults():
    cfg = SSKDLossConfig()
    assert (cfg.ce_weight, cfg.kd_weight, cfg.tf_weight, cfg.ss_weight) == (0.1, 0.9, 2.7, 10.0)
    assert (cfg.kd_T, cfg.tf_T, cfg.ss_T, cfg.ss_ratio, cfg.tf_ratio) == (4.0, 4.0, 0.5, 0.75, 1.0)
    terms = {k: torch.tensor(v) for k, v in {"ce": 1.0, "kd": 2.0, "tf": 3.0, "ss": 4.0}.items()}
    assert sskd_total(terms, cfg).item() == pytest.approx(0.1 + 1.8 + 8.1 + 40.0)
