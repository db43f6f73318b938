"""CRD (Tian et al., ICLR 2020, "Contrastive Representation Distillation"): the NCE critic over a
memory bank, its loss and the bank's momentum update, as RepDistiller's ``crd/memory.py``
(``ContrastMemory``) and ``crd/criterion.py`` (``ContrastLoss``) compute them.

Notation: ``v`` are L2-normalised embeddings (b, d) of one side (student or teacher); a bank (N, d)
holds one embedding per training sample of the *other* side; ``idx`` (b, K + 1) are the bank rows
each sample is scored against: column 0 its positive, then K negatives. N is the dataset size.
"""

from __future__ import annotations

import torch

EPS = 1e-7  # RepDistiller's eps in ContrastLoss


def crd_scores(bank: torch.Tensor, v: torch.Tensor, idx: torch.Tensor, T: float) -> torch.Tensor:
    """Unnormalised critic scores ``exp(<bank[idx], v> / T)`` (the paper's h before its constant Z).

    RepDistiller ``ContrastMemory.forward``: ``out_v1 = exp(bmm(memory_v2[idx], v1) / T)`` (student
    anchor against the teacher bank) and ``out_v2`` the other way round; the caller divides by
    ``Z = mean(scores of the first batch) * N``, frozen afterwards.

    Args:
        bank: (N, d) the other side's memory (no gradient flows into it).
        v: (b, d) this side's embeddings (the gradient flows through them).
        idx: (b, K + 1) int64 bank rows, positive first.
        T: temperature (``nce_t``, 0.07).

    Returns:
        (b, K + 1) scores.
    """
    b, k1 = idx.shape
    weight = bank.index_select(0, idx.reshape(-1)).detach().view(b, k1, -1)
    return torch.exp(torch.bmm(weight, v.unsqueeze(2)).squeeze(2) / T)


def nce_contrast_loss(p: torch.Tensor, n_data: int) -> torch.Tensor:
    """The NCE loss of one anchor side (the paper's Eq. 18, as RepDistiller's ``ContrastLoss`` says).

    With the noise distribution Pn = 1/N and m = K negatives:
    ``L = -(1/b) [sum_i log(P_i0 / (P_i0 + m Pn + eps)) + sum_i sum_{j>=1} log(m Pn / (P_ij + m Pn + eps))]``.

    Args:
        p: (b, K + 1) normalised scores ``crd_scores / Z``, column 0 the positive.
        n_data: N, the number of training samples.

    Returns:
        Scalar loss.
    """
    b, m = p.shape[0], p.shape[1] - 1
    mpn = m / float(n_data)
    log_d1 = torch.log(p[:, 0] / (p[:, 0] + (mpn + EPS)))
    log_d0 = torch.log(mpn / (p[:, 1:] + (mpn + EPS)))
    return -(log_d1.sum() + log_d0.sum()) / b


def bank_rows(bank: torch.Tensor, ids: torch.Tensor, v: torch.Tensor, momentum: float) -> torch.Tensor:
    """The new bank rows of the batch: ``normalize(momentum * bank[ids] + (1 - momentum) * v)``.

    RepDistiller ``ContrastMemory.forward`` ("update memory", under no_grad, after the scores):
    the caller writes them back with ``bank.index_copy_(0, ids, rows)``; no other row changes.

    Args:
        bank: (N, d) memory of one side.
        ids: (b,) int64 dataset indices of the batch.
        v: (b, d) that side's embeddings of the batch.
        momentum: weight of the old row (``nce_m``, 0.5).

    Returns:
        (b, d) unit-norm rows (no gradient).
    """
    with torch.no_grad():
        rows = bank.index_select(0, ids) * momentum + v.detach().to(bank.dtype) * (1 - momentum)
        return rows / rows.pow(2).sum(1, keepdim=True).pow(0.5)
