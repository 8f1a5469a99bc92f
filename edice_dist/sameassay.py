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

SKIP_SCALE = 10.0
"""The skip weights are this times their parameters: Adam moves a parameter by about the
learning rate per step, and a weight must reach ~0.3-1 within one or two epochs."""

LOGIT_CAP = 15.0
"""Attention logits are soft-capped to +-this, so that ``exp(logit - max)`` of a
supported cell never underflows float32 (e^-30 ~ 1e-13) and the weighted mean over only
the cells that observe the assay (a sum over all cells, masked) stays exact."""

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
        (g, s, q, k): g (B, Qa, N, C) the mean of each cell's supports of each queried
        assay; s (B, Qa, N) 1 where the cell observes it; q (B, Qc, H, HEAD_DIM) and
        k (B, N, H, HEAD_DIM), None for ``mean``.
        """
        cnt = count[:, :, q_assays].transpose(1, 2)
        g = grid[:, :, q_assays].transpose(1, 2) / cnt.clamp(min=1)[..., None]
        s = (cnt > 0).to(g.dtype)
        if self.mode == "mean":
            return g, s, None, None
        B, Qc, _ = c_ctx.shape
        q = self.query(c_ctx).view(B, Qc, self.heads, HEAD_DIM) / math.sqrt(HEAD_DIM)
        return g, s, q, self.key(h_c).view(B, h_c.shape[1], self.heads, HEAD_DIM)

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
        g, s, q, k = state
        if pos_c.dim() == 1:
            gk, sk = g[:, pos_a], s[:, pos_a]  # (B, K, N, C), (B, K, N)
            qk = None if q is None else q[:, pos_c]  # (B, K, H, HEAD_DIM)
        else:  # per-bin targets
            rows = torch.arange(g.shape[0], device=g.device)[:, None]
            gk, sk = g[rows, pos_a], s[rows, pos_a]
            qk = None if q is None else q[rows, pos_c]
        if qk is None:  # AVG: the plain mean over the cells that observe the assay
            est = (gk.sum(2) / sk.sum(2).clamp(min=1)[..., None])[:, :, None]
        else:  # each head's weighted mean over them; 0 where none does
            logits = LOGIT_CAP * torch.tanh(torch.einsum("bkhd,bnhd->bkhn", qk, k) / LOGIT_CAP)
            p = torch.exp(logits - logits.amax(dim=-1, keepdim=True))
            num = torch.einsum("bkhn,bknc->bkhc", p, gk)
            den = torch.einsum("bkhn,bkn->bkh", p, sk)
            est = num / den.clamp(min=1e-30)[..., None]
        w = SKIP_SCALE * self.weight[q_assays][pos_a]  # (K or B x K, H, C)
        return (est * w.to(est.dtype)).sum(dim=(-1, -2))
