"""Top-1 / top-5 over exactly the evaluation set, whatever the number of ranks.

The eval loader yields every validation sample exactly once across ranks (no padded duplicates), so
summing the per-rank counts gives the exact set; the total count is checked against the manifest.
"""

from __future__ import annotations

from typing import Any

import torch

from sskd.core.errors import SSKDError
from sskd.models.base import logits_of


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader, accelerator) -> dict[str, Any]:
    """Evaluate ``model`` on ``loader`` (view 0); returns ``{"top1", "top5", "count"}`` in percent."""
    model.eval()  # the caller puts its method back in train mode (it knows which parts stay frozen)
    counts = torch.zeros(3, dtype=torch.float64, device=accelerator.device)
    for batch in loader.epoch(0):
        x = batch["views"][:, 0]
        with accelerator.autocast():
            logits = logits_of(model(x)).float()
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices
        hit = top == batch["label"][:, None]
        counts += torch.stack([hit[:, 0].sum(), hit.any(1).sum(), torch.tensor(len(x))]).to(counts)
    counts = accelerator.reduce(counts, "sum")
    top1, top5, n = counts.tolist()
    if int(n) != loader.num_samples:
        raise SSKDError(f"evaluation saw {int(n)} samples but the split has {loader.num_samples}")
    return {"top1": round(100 * top1 / n, 3), "top5": round(100 * top5 / n, 3), "count": int(n)}
