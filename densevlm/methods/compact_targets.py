"""Compact teacher targets: each region's teacher class distribution kept as its top-k classes plus a uniform tail.

DenseVLM's loss needs only the teacher's class distribution of each region, p_T = softmax(cos / T) over a fixed
vocabulary (T = 0.01). At that temperature p_T is sharp: a few classes carry almost all of its mass. A compact
target keeps, per region, the k largest probabilities and their class ids, and the *tail mass* tau (what the other
V - k classes carry together).

The loss on a compact target is the loss on this distribution (**top-k plus a uniform tail**)::

    p~_j = p_j              for the k stored classes j
    p~_j = tau / (V - k)    for each of the other V - k classes

Why this completion, and not the renormalised top-k (p_j / (1 - tau) on the k classes, zero elsewhere):

- The stored probabilities are used as they are. The region's confidence max p~ = max p and its arg-max class
  (hence DenseVLM's keep test ``max p > threshold`` and its thing / stuff split) are exactly the full
  distribution's for any k >= 1; renormalising inflates the confidence by 1 / (1 - tau) and moves regions near
  the threshold across it.
- It is the maximum-entropy distribution that agrees with what is stored (the k probabilities and the tail mass):
  it assumes nothing about how the tail is spread, and its total mass is exactly 1 with no zero entries (the
  KL against the student stays finite and its gradient pulls no tail class towards -inf).
- Its loss error is bounded by the tail mass. With L(p) = KL(p || q_S) and S the student logits::

      0 <= tau * KL(p_tail / tau || uniform) <= tau * log(V - k)            (entropy part)
      |sum_tail (p_j - tau / (V - k)) log q_j| <= tau * (max_tail S - min_tail S)   (cross-entropy part)

  so |L(p) - L(p~)| <= tau * (log(V - k) + max_tail S - min_tail S) per region, and the error of the gradient
  w.r.t. the student's logits is p~ - p, of L1 norm at most 2 tau. For a thing region DenseVLM's KL is over the
  thing classes renormalised, which divides tau by the thing mass (> the 0.3 threshold).
- When k = V there is no tail and p~ = p: the loss is the full-distribution loss (to float rounding).

:func:`compact_distribution` turns teacher logits into (ids, probs, tail); :func:`compact_logits` turns those back
into log p~ over the vocabulary, which the objective consumes like the teacher logits of exact targets.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

#: The batch keys a dataset reading a compact target store fills (per drawn cell; zero for padding).
BATCH_IDS, BATCH_PROBS, BATCH_TAIL = "teacher_topk_ids", "teacher_topk_probs", "teacher_tail"


@dataclass
class CompactDistribution:
    """Per region: ``ids`` (R, k) the top-k class ids (descending probability), ``probs`` (R, k) float32 their
    probabilities, ``tail`` (R,) float32 the mass of the other V - k classes."""

    ids: torch.Tensor
    probs: torch.Tensor
    tail: torch.Tensor

    def __len__(self) -> int:
        return len(self.tail)


def id_dtype(vocab_size: int) -> torch.dtype:
    """The narrowest signed integer dtype holding class ids of a vocabulary of ``vocab_size`` classes."""
    return torch.int16 if vocab_size <= torch.iinfo(torch.int16).max + 1 else torch.int32


def check_k(k: int, vocab_size: int, what: str = "teacher_targets.k") -> None:
    """A clear error unless 1 <= k <= vocab_size."""
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= vocab_size:
        raise ValueError(f"{what}: expected an integer in [1, {vocab_size}] (the vocabulary has {vocab_size} "
                         f"classes), got {k!r}")


@torch.no_grad()
def compact_distribution(logits: torch.Tensor, k: int) -> CompactDistribution:
    """The top-k classes of ``softmax(logits)`` (..., V) per row, and the tail mass of the rest.

    The tail is computed from the logits (``exp(logsumexp(tail) - logsumexp(all))``), not as 1 - sum(top-k), so a
    tail of 1e-30 is not rounded to zero or below.
    """
    vocab_size = logits.shape[-1]
    check_k(k, vocab_size)
    logits = logits.float()
    lse = logits.logsumexp(-1, keepdim=True)
    top, ids = logits.topk(k, dim=-1, sorted=True)
    probs = (top - lse).exp()
    if k == vocab_size:
        tail = torch.zeros(logits.shape[:-1], dtype=torch.float32, device=logits.device)
    else:
        rest = logits.scatter(-1, ids, float("-inf"))
        tail = (rest.logsumexp(-1, keepdim=True) - lse).exp().squeeze(-1)
    return CompactDistribution(ids.to(id_dtype(vocab_size)), probs, tail)


def compact_logits(dist: CompactDistribution, vocab_size: int) -> torch.Tensor:
    """(R, V) float32 log p~ of top-k plus a uniform tail (see the module docstring): the stored log-probabilities at
    the stored ids, log(tail / (V - k)) elsewhere (-inf where the tail is zero, as when k = V)."""
    ids, probs, tail = dist.ids.long(), dist.probs.float(), dist.tail.float()
    k = ids.shape[-1]
    check_k(k, vocab_size, "compact targets' k")
    if len(ids) and int(ids.max()) >= vocab_size:
        raise ValueError(f"compact targets hold class id {int(ids.max())}, the vocabulary has {vocab_size} classes")
    fill = (tail / max(1, vocab_size - k)).log() if k < vocab_size else torch.full_like(tail, float("-inf"))
    out = fill.unsqueeze(-1).expand(len(tail), vocab_size).clone()
    return out.scatter(-1, ids, probs.log())


def tail_stats(tail: torch.Tensor) -> dict[str, float]:
    """Max and mean tail mass (what the compact targets drop from the teacher's distribution) over cells."""
    tail = tail.float().flatten()
    return {"tail_mass_max": float(tail.max()) if len(tail) else 0.0,
            "tail_mass_mean": float(tail.mean()) if len(tail) else 0.0, "cells": len(tail)}
