"""The loss of eq. 1 and the class weights of eq. 4 (seed §3.3.4), with the cap the seed leaves out."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def class_weights(counts: np.ndarray, cap: float | None = None) -> np.ndarray:
    """Eq. 4: ``n_tot / n_k`` per class; 0 for a class without training pixels (it is never a target).

    ``cap``: no weight above ``cap`` times the smallest positive one, so a class with a handful of
    pixels (2 pixels gave a weight of ~3,200 on real data) cannot dominate the loss.
    """
    counts = np.asarray(counts, dtype=np.float64)
    with np.errstate(divide="ignore"):
        w = np.where(counts > 0, counts.sum() / counts, 0.0)
    if cap is not None and (w > 0).any():
        w = np.minimum(w, cap * w[w > 0].min())
    return w.astype(np.float32)


def weighted_sparse_ce(logits: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Eq. 1 averaged over all pixels: ``-sum w_k y_k log p_k``, ``target`` -1 = unlabelled.

    Unlabelled pixels are an all-zero one-hot vector in the paper, so their term and its gradient are
    exactly zero (``where``, not multiplication, so even an infinite log-probability stays out).
    """
    logp = F.log_softmax(logits.float(), dim=1)
    labelled = target >= 0
    idx = target.clamp(min=0)
    nll = -logp.gather(1, idx.unsqueeze(1)).squeeze(1)
    per_pixel = torch.where(labelled, weights[idx] * nll, torch.zeros((), device=nll.device))
    return per_pixel.sum() / target.numel()
