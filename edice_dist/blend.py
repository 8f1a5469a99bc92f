"""The AVG blend: imputations mixed with AVG by a weight fitted on held-out tracks.

A target (c, a) missing from the consortium is a pair the model never trained on: cell c's
global row learnt c's other assays, assay a's row a's other cells. How far the decoder's
answer for such a pair can be trusted, training cannot say: on the pairs it trains on the
model always does better than AVG (the mean of assay a over the other cells). On real
Roadmap tracks the refit's imputation of a broad mark followed the cell's own active marks
rather than the mark's domains in the other cells, and AVG found 2.5 times as many of the
track's top 1 % bins (BENCHMARKS.md, "The AVG blend").

The validation tracks are held-out pairs, like the targets of imputation. When training
ends the weight

    lambda = argmin_l  sum_{val tracks, bins} ((1 - l) p + l m - y)^2
           = clip( sum (m - p)(y - p) / sum (m - p)^2, 0, 1)

is fitted from the model's prediction ``p``, AVG ``m`` and the observed ``y`` (stacking the
two predictors). One weight, pooled over every validation track: fitted per assay, on
the one validation track that small consortia hold out per assay, the weight of one assay
went from -0.73 to 0.61 between two seeds, and the pooled one from 0.34 to 0.30. Imputation
returns ``p + lambda (m - p)`` wherever another cell has the target's assay; training
never applies it, so the weights learnt are the same with and without it. A refit, which
has no held-out track left, takes the weight of its selection run; fine-tuning trains
without it and fits its own. The weight is stored per assay (:attr:`ModelConfig.blend`):
an assay added by :func:`~edice_dist.model.extend_vocab` gets none.
"""

from __future__ import annotations

import numpy as np
import torch


def blend_inputs(grid: torch.Tensor, count: torch.Tensor, q_cells: torch.Tensor,
                 q_assays: torch.Tensor) -> dict:
    """What :func:`mix` needs of a batch to form each target's AVG.

    Parameters
    ----------
    grid : (B, N, A, C) sums of the supports of each (cell, assay).
    count : (B, N, A) supports of each (cell, assay).
    q_cells, q_assays : (Qc,), (Qa,) long, the queried cells and assays.

    Returns
    -------
    dict: ``tot`` (B, Qa) and ``n`` (B, Qa), the sum and number of the supports of each
    queried assay (the bin's own value); ``own`` and ``own_n`` (B, Qc, Qa), those of the
    queried cell itself, which AVG leaves out.
    """
    g = grid[:, :, q_assays, 0]
    c = count[:, :, q_assays]
    return {"tot": g.sum(1), "n": c.sum(1), "own": g[:, q_cells], "own_n": c[:, q_cells]}


def target_weights(avg: dict, pos_c: torch.Tensor, pos_a: torch.Tensor,
                   weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each target's AVG and the weight it gets: ``weight[a]`` where another cell has the
    target's assay at the bin, else 0.

    Parameters
    ----------
    avg : from :func:`blend_inputs`.
    pos_c, pos_a : (K,) or (B, K) long, each target's position among the queried cells and
        assays.
    weight : (Qa,) the blend of each queried assay.

    Returns
    -------
    (m, lam), both (B, K).
    """
    if pos_c.dim() == 1:
        tot = avg["tot"][:, pos_a] - avg["own"][:, pos_c, pos_a]
        n = avg["n"][:, pos_a] - avg["own_n"][:, pos_c, pos_a]
    else:
        rows = torch.arange(avg["tot"].shape[0], device=pos_c.device)[:, None]
        tot = avg["tot"][rows, pos_a] - avg["own"][rows, pos_c, pos_a]
        n = avg["n"][rows, pos_a] - avg["own_n"][rows, pos_c, pos_a]
    return tot / n.clamp(min=1), weight[pos_a] * (n > 0).to(weight.dtype)


def mix(y: torch.Tensor, avg: dict, pos_c: torch.Tensor, pos_a: torch.Tensor,
        weight: torch.Tensor) -> torch.Tensor:
    """``y + lam (AVG - y)`` of each target (B, K) (:func:`target_weights`)."""
    m, lam = target_weights(avg, pos_c, pos_a, weight)
    return y + lam.to(y.dtype) * (m.to(y.dtype) - y)


def validation_sums(p: torch.Tensor, y: torch.Tensor, m: torch.Tensor,
                    has_avg: torch.Tensor) -> torch.Tensor:
    """Per validation track, the two sums the fit needs.

    Parameters
    ----------
    p, y, m : (B, V) float64, prediction, observation and AVG at B bins of V tracks.
    has_avg : (V,) bool, tracks whose assay another input cell has (others add nothing).

    Returns
    -------
    (V, 2) float64: sum (m - p)(y - p), sum (m - p)^2.
    """
    r = (m - p) * has_avg.to(p.dtype)
    return torch.stack([(r * (y - p)).sum(0), (r * r).sum(0)], dim=1)


def fit(sums: np.ndarray, n_assays: int) -> tuple[float, ...]:
    """The blend of every assay of the vocabulary from :func:`validation_sums`: the one
    least-squares weight of all the validation tracks together.

    Parameters
    ----------
    sums : (V, 2) summed over the validation bins of every worker.
    n_assays : assays in the vocabulary.

    Returns
    -------
    ``n_assays`` equal weights in [0, 1]; zeros when no validation track has AVG.
    """
    num, den = np.asarray(sums, dtype=np.float64).reshape(-1, 2).sum(axis=0)
    lam = float(np.clip(num / den, 0.0, 1.0)) if den > 0 else 0.0
    return (lam,) * n_assays


def describe(blend, assays: list[str]) -> str:
    """``0.31`` when every assay has one weight, else ``H3K27me3 0.41, H3K4me3 0.05``;
    ``none`` without a blend."""
    if not blend or not any(blend):
        return "none"
    if len(set(blend)) == 1:
        return f"{blend[0]:.2f}"
    return ", ".join(f"{a} {v:.2f}" for a, v in zip(assays, blend, strict=True))
