"""The same-assay skip: the target assay's signal in the other cells, straight to the output.

The paper's eDICE reaches a target (c, a) only through the decoder MLP on the
contextualised embeddings of c and a. Trained with MSE and 0.3 dropout on a few dozen
tracks, that path regresses peaks toward the mean: on real Roadmap tracks the model beat
AVG (the mean of assay a over the other cells) on background bins but lost to it at every
peak set. ChromImpute, best at peaks, predicts a target from the same assay in the cells
most like the target cell. This module adds that estimate as a linear term of the output:

    out(c, a) = decoder(c_ctx, a_ctx) + sum_{h, j} w[a, h, j] * e_h(c, a)_j

where ``e_h(c, a)`` is a mean of assay a's supports over the other cells (the bin's value
and each context channel ``j``), either plain (``mean``: AVG itself) or weighted by a
learned attention of cell c on each cell (``attention``: one weighting per head, keys and
queries from the cells' embeddings, so "cells like c" is learned from all their marks).
The weights ``w`` start at zero, so a new model starts as the paper's; the decoder then
learns the residual. The term bypasses the decoder's dropout, which is what shrank peaks.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

SKIP_SCALE = 10.0
"""The skip weights are this times their parameters: Adam moves a parameter by about the
learning rate per step, and a weight must reach ~0.3-1 within one or two epochs."""

SKIP_MAX_LR = 3e-4
"""The skip weights' learning rate is at most this (the paper's), whatever the model's:
with the scale above, a larger one makes them jump (:func:`~edice_dist.trainloop.param_groups`)."""

LOGIT_CAP = 15.0
"""Attention logits are soft-capped to +-this, so that ``exp(logit - max)`` of a
supported cell never underflows float32 (e^-30 ~ 1e-13) and the weighted mean over only
the cells that observe the assay (a sum over all cells, masked) stays exact."""

TRAIN_KEPT_BYTES = 64 * 2**20
"""Most bytes of the training term's gathers and weights kept for the backward pass (an
estimate: bins x targets x cells x (channels + 4 heads) floats); past it the term is
recomputed in blocks of targets this size (see :meth:`SameAssaySkip.forward`)."""

HEAD_DIM = 16
"""Width of each head's query and key: similarity of cells needs few dimensions."""


class SameAssaySkip(nn.Module):
    """Per-target linear read-out of the target assay's (weighted) mean over other cells.

    Parameters
    ----------
    mode : "mean" or "attention"
    n_assays : assays in the vocabulary (one weight vector each).
    n_channels : values per support and bin (the bin, then the context window means).
    d : embedding width (queries and keys are projected from it).
    n_heads : weightings of the cells (``attention``; ``mean`` has one).
    """

    recompute = True
    """Training recomputes the per-bin term's activations in the backward pass (False:
    keeps them; ``benchmarks/bench_step_ab.py --a-skip-kept`` times both)."""

    def __init__(self, mode: str, n_assays: int, n_channels: int, d: int, n_heads: int):
        super().__init__()
        self.mode = mode
        self.heads = n_heads if mode == "attention" else 1
        self.weight = nn.Parameter(torch.zeros(n_assays, self.heads, n_channels))
        if mode == "attention":
            self.query = nn.Linear(d, self.heads * HEAD_DIM)
            self.key = nn.Linear(d, self.heads * HEAD_DIM)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Zero read-out weights (the model starts as the paper's); Glorot-uniform queries
        and keys with zero biases, as every dense layer of the model."""
        nn.init.zeros_(self.weight)
        if self.mode == "attention":
            for layer in (self.query, self.key):
                nn.init.xavier_uniform_(layer.weight)
                nn.init.zeros_(layer.bias)

    def prepare(self, grid: torch.Tensor, count: torch.Tensor, h_c: torch.Tensor,
                c_ctx: torch.Tensor, q_assays: torch.Tensor) -> tuple:
        """What :meth:`forward` needs of a batch: the queried assays' per-cell means and
        observed masks, and (``attention``) the queries of the queried cells and the keys
        of every cell.

        Parameters
        ----------
        grid : (B, N, A, C) sums of the supports of each (cell, assay), zero elsewhere.
        count : (B, N, A) supports of each (cell, assay).
        h_c : (B, N, d) every cell's embedding before the attention (keys).
        c_ctx : (B, Qc, d) contextualised queried cells (queries).
        q_assays : (Qa,) long, the queried assays.

        Returns
        -------
        dict: ``g`` (B, Qa, N, C) the mean of each cell's supports of each queried assay;
        ``s`` (B, Qa, N) 1 where the cell observes it; ``q`` (B, Qc, H, HEAD_DIM) and ``k``
        (B, N, H, HEAD_DIM), None for ``mean``. :meth:`forward` caches in it what all the
        targets of a batch share.
        """
        cnt = count[:, :, q_assays].transpose(1, 2)
        g = grid[:, :, q_assays].transpose(1, 2) / cnt.clamp(min=1)[..., None]
        state = {"g": g, "s": (cnt > 0).to(g.dtype), "q": None, "k": None}
        if self.mode == "attention":
            B, Qc, _ = c_ctx.shape
            state["q"] = self.query(c_ctx).view(B, Qc, self.heads, HEAD_DIM) / math.sqrt(HEAD_DIM)
            state["k"] = self.key(h_c).view(B, h_c.shape[1], self.heads, HEAD_DIM)
        return state

    @staticmethod
    def _weights(logits: torch.Tensor) -> torch.Tensor:
        """Unnormalised attention weights over the last axis (cells), soft-capped."""
        logits = LOGIT_CAP * torch.tanh(logits / LOGIT_CAP)
        return torch.exp(logits - logits.amax(dim=-1, keepdim=True))

    def _all_pairs(self, g, s, q, k) -> torch.Tensor:
        """(B, Qc, Qa, H, C + 1): for every queried cell and assay, each head's weighted
        sums of the assay's per-cell means (C) and of its observed mask (1). The weights
        depend on the cell only, so imputing many targets costs one batched product."""
        B, Qc, H, _ = q.shape
        Qa, N, C = g.shape[1:]
        p = self._weights(torch.einsum("bchd,bnhd->bchn", q, k))  # (B, Qc, H, N)
        gs = torch.cat([g, s[..., None]], dim=-1).permute(0, 2, 1, 3)  # (B, N, Qa, C + 1)
        out = torch.bmm(p.reshape(B, Qc * H, N), gs.reshape(B, N, Qa * (C + 1)))
        return out.view(B, Qc, H, Qa, C + 1).transpose(2, 3)

    def forward(self, state: tuple, pos_c: torch.Tensor, pos_a: torch.Tensor,
                q_assays: torch.Tensor) -> torch.Tensor:
        """The skip term of each target.

        Parameters
        ----------
        state : from :meth:`prepare`.
        pos_c, pos_a : (K,) or (B, K) long, each target's position among the queried cells
            and assays.
        q_assays : (Qa,) long.

        Returns
        -------
        (B, K)
        """
        g, s, q, k = state["g"], state["s"], state["q"], state["k"]
        if q is None:  # AVG: the plain mean over the cells that observe the assay
            if pos_c.dim() == 1:
                gk, sk = g[:, pos_a], s[:, pos_a]  # (B, K, N, C), (B, K, N)
            else:
                rows = torch.arange(g.shape[0], device=g.device)[:, None]
                gk, sk = g[rows, pos_a], s[rows, pos_a]
            est = (gk.sum(2) / sk.sum(2).clamp(min=1)[..., None])[:, :, None]
        elif pos_c.dim() == 1:  # the same targets at every bin: all pairs in one product
            if "all" not in state:
                # The term of every (queried cell, queried assay) at once: one gather of
                # (B, K) per block of targets, where gathering each target's (H, C + 1)
                # sums per block cost a fifth of an imputation with thousands of targets.
                e = self._all_pairs(g, s, q, k)  # (B, Qc, Qa, H, C + 1)
                est = e[..., :-1] / e[..., -1:].clamp(min=1e-30)
                w = SKIP_SCALE * self.weight[q_assays]  # (Qa, H, C)
                state["all"] = (est * w.to(est.dtype)).sum(dim=(-1, -2))  # (B, Qc, Qa)
            return state["all"][:, pos_c, pos_a]
        else:  # per-bin targets (training batches)
            # In training, past a budget, in blocks of targets recomputed in the backward
            # pass rather than kept: the (bins, targets, cells, channels) gathers, (bins,
            # targets, heads, cells) weights and their gradients grow with the cells, 240
            # MB a step at 125 cell types (BENCHMARKS.md, issue 22); recomputing them in 3
            # blocks costs ~6 % of a reduced model's step there, so smaller vocabularies
            # keep them. Each target's term is its own: the terms are the same to the
            # bit, the gradients summed over blocks the same to rounding.
            B, K = pos_c.shape
            per_target = 4 * B * g.shape[2] * (g.shape[3] + 4 * self.heads)
            step = max(1, TRAIN_KEPT_BYTES // per_target)
            if not (torch.is_grad_enabled() and self.recompute) or step >= K:
                return self._per_bin(g, s, q, k, pos_c, pos_a, q_assays)
            step = -(-K // -(-K // step))  # even blocks
            return torch.cat([checkpoint(self._per_bin, g, s, q, k, pos_c[:, j:j + step],
                                         pos_a[:, j:j + step], q_assays, use_reentrant=False)
                              for j in range(0, K, step)], dim=1)
        w = SKIP_SCALE * self.weight[q_assays][pos_a]  # (K or B x K, 1, C)
        return (est * w.to(est.dtype)).sum(dim=(-1, -2))

    def _per_bin(self, g, s, q, k, pos_c, pos_a, q_assays) -> torch.Tensor:
        """The attention skip term of per-bin targets (B, K): the weights of each target's
        own cell over the cells observing its assay."""
        rows = torch.arange(g.shape[0], device=g.device)[:, None]
        gk, sk, qk = g[rows, pos_a], s[rows, pos_a], q[rows, pos_c]
        p = self._weights(torch.einsum("bkhd,bnhd->bkhn", qk, k))
        num = torch.einsum("bkhn,bknc->bkhc", p, gk)
        den = torch.einsum("bkhn,bkn->bkh", p, sk)
        est = num / den.clamp(min=1e-30)[..., None]
        w = SKIP_SCALE * self.weight[q_assays][pos_a]  # (B, K, H, C)
        return (est * w.to(est.dtype)).sum(dim=(-1, -2))
