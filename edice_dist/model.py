"""The eDICE model (SPEC section 2): contextualised cell and assay embeddings per bin.

Everything is per 25 bp bin. For a batch of B bins with T observed tracks (columns), each
column belongs to one cell (``track_cells``) and one assay (``track_assays``); a boolean
``support`` mask says which columns are inputs at each bin. Targets are any (cell, assay)
pairs of the vocabulary.

Beyond the paper, for consortia of individuals (``cell_type@individual`` cells): with
``individual_bias`` the cell-side attention adds one learned logit per head between two
cells of one person. A tissue of a donor with no observed track (leave-tissue-out) has no
signal of its own; the bias lets it read the donor's other tissues, which carry the
donor's private elements that averages over other people miss. The logit is shared by
everyone, so it transfers to a donor the model never saw, and it is part of the attention
that fine-tuning freezes (SPEC 2.7).
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields, replace
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from .blend import blend_inputs, mix
from .context import check as check_context
from .context import n_channels
from .sameassay import SameAssaySkip


@dataclass(frozen=True)
class ModelConfig:
    """Architecture; the defaults are the paper's."""

    n_cells: int  # cell keys in the vocabulary (one global embedding row each)
    n_assays: int  # assays in the vocabulary
    embed_dim: int = 256  # d: width of every embedding
    n_heads: int = 4  # attention heads per side
    ffn_dim: int = 128  # hidden width of the feed-forward net after attention
    decoder_hidden: int = 2048  # width of each decoder hidden layer
    decoder_layers: int = 2  # hidden layers in the decoder MLP
    decoder_dropout: float = 0.3  # after each decoder hidden layer
    attn_dropout: float = 0.1  # on both residual branches of the attention blocks
    context: tuple[int, ...] = ()  # half-widths (bins) of window means added as inputs
    individual_bias: bool = False  # learned attention bias between cells of one individual
    same_assay: Literal["none", "mean", "attention"] = "none"  # :mod:`edice_dist.sameassay`
    cell_individuals: tuple[str, ...] = ()  # per cell row, its individual ('' for none)
    # Per assay, the weight of AVG in the imputed output, fitted on the validation tracks
    # when training ends (:mod:`edice_dist.blend`); empty: none. Training never applies it.
    blend: tuple[float, ...] = ()

    def __post_init__(self):
        try:  # a list from JSON; sorted, so that (4, 20) and [20, 4] are one model
            object.__setattr__(self, "context", check_context(self.context))
        except (TypeError, ValueError) as e:
            raise ValueError(f"context: {e}") from None
        object.__setattr__(self, "cell_individuals", tuple(self.cell_individuals))
        if self.cell_individuals and len(self.cell_individuals) != self.n_cells:
            raise ValueError(f"cell_individuals names {len(self.cell_individuals)} cells, "
                             f"the vocabulary has {self.n_cells}")
        if self.n_cells < 1 or self.n_assays < 1:
            raise ValueError("the vocabulary needs at least one cell and one assay")
        if self.embed_dim % self.n_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by n_heads {self.n_heads}")
        if self.decoder_layers < 1:
            raise ValueError("decoder_layers must be >= 1")
        object.__setattr__(self, "blend", tuple(float(v) for v in self.blend))
        if self.blend and (len(self.blend) != self.n_assays
                           or not all(0 <= v <= 1 for v in self.blend)):
            raise ValueError(f"blend must hold one weight in [0, 1] per assay "
                             f"({self.n_assays}), got {list(self.blend)}")
        if self.same_assay not in SAME_ASSAY:
            raise ValueError(f"same_assay must be one of {', '.join(SAME_ASSAY)}, "
                             f"got {self.same_assay!r}")

    @property
    def n_channels(self) -> int:
        """Input values per support track and bin (:mod:`edice_dist.context`)."""
        return n_channels(self.context)

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


SAME_ASSAY = ("none", "mean", "attention")
"""Ways of reading the target assay's signal in the other cells straight into the output
(:class:`SameAssaySkip`): not at all (the paper), their plain mean (AVG), or their mean
weighted by a learned attention between the target cell and each other cell."""

INDIVIDUAL_LOGIT_SCALE = 30.0
"""The individual bias is this times its parameter. Adam moves a parameter by about the
learning rate per step whatever its scale, and a logit must reach 1-3 to matter: unscaled,
the bias stayed under 0.25 in a short run and changed nothing (BENCHMARKS.md,
Personalised imputation)."""


def keep_mask(shape: torch.Size, p: float, device: torch.device,
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverted-dropout multipliers: 0 with probability ``p``, else ``1 / (1 - p)``.

    On CPUs torch's ``bernoulli_`` draws one random number per element and made dropout
    cost more than the decoder's matrix products (BENCHMARKS.md, Training speed); here
    four 16-bit draws come out of each 64-bit draw of the same seeded generator, so runs
    stay reproducible. ``p`` is rounded to a multiple of 1/65536.
    """
    if device.type != "cpu":  # one fused kernel on GPUs
        keep = torch.rand(shape, device=device) >= p
        return keep.to(dtype).mul_(1 / (1 - p))
    n = math.prod(shape)
    # The full 64-bit range: a bare random_() leaves the top bit 0, biasing every 4th draw.
    r = torch.empty(-(-n // 4), dtype=torch.int64, device=device).random_(-2**63, 2**63 - 1)
    drop = round(p * 65536)
    keep = r.view(torch.int16)[:n].view(shape) >= drop - 32768
    return keep.to(dtype).mul_(65536 / (65536 - drop))


def relu_drop(a: torch.Tensor, p: float) -> torch.Tensor:
    """``dropout(relu(a))`` as ``relu(a * m)`` (equal, since m >= 0): autograd then keeps
    only the multipliers and the output. Measured fastest of the forms tried on CPUs
    (BENCHMARKS.md, Training speed)."""
    if not p:
        return F.relu(a)
    return (a * keep_mask(a.shape, p, a.device, a.dtype)).relu_()


class SignalEmbedder(nn.Module):
    """h = ReLU(W y + b) + u: a signal embedding plus one learned global row per node."""

    def __init__(self, n_nodes: int, in_dim: int, d: int):
        super().__init__()
        self.linear = nn.Linear(in_dim, d)
        self.table = nn.Embedding(n_nodes, d)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        """y: (B, n_nodes, in_dim) -> (B, n_nodes, d)."""
        return F.relu(self.linear(y)) + self.table.weight


class ContextBlock(nn.Module):
    """Multi-head self-attention over one side's nodes, then a feed-forward net; residuals
    around both, dropout on both residual branches, no layer norm (as in the paper)."""

    def __init__(self, d: int, n_heads: int, ffn_dim: int, dropout: float):
        super().__init__()
        self.n_heads = n_heads
        self.in_proj = nn.Linear(d, 3 * d)
        self.out_proj = nn.Linear(d, d)
        self.ffn = nn.Sequential(nn.Linear(d, ffn_dim), nn.ReLU(), nn.Linear(ffn_dim, d))
        self.dropout = nn.Dropout(dropout)

    def forward(self, h: torch.Tensor, has_key: torch.Tensor, query: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
        """
        Parameters
        ----------
        h : (B, N, d) node embeddings.
        has_key : (B, N) bool, nodes with at least one support (the only valid keys).
        query : (Q,) long, the nodes whose contextualised embedding is needed.
        bias : optional (n_heads, Q, N) float, added to the attention logits.

        Returns
        -------
        (B, Q, d)
        """
        B, N, d = h.shape
        hd = d // self.n_heads
        wq, wk, wv = self.in_proj.weight.split(d)
        bq, bk, bv = self.in_proj.bias.split(d)
        hq = h[:, query]
        q = F.linear(hq, wq, bq).view(B, -1, self.n_heads, hd).transpose(1, 2)
        k = F.linear(h, wk, bk).view(B, N, self.n_heads, hd).transpose(1, 2)
        v = F.linear(h, wv, bv).view(B, N, self.n_heads, hd).transpose(1, 2)
        # A bin with no key at all would give NaN; let it attend everywhere and zero it below.
        any_key = has_key.any(dim=1)
        mask = (has_key | ~any_key[:, None])[:, None, None, :]
        if bias is not None:
            mask = torch.where(mask, bias[None].to(q.dtype),
                               torch.tensor(float("-inf"), dtype=q.dtype, device=q.device))
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        attn = attn.transpose(1, 2).reshape(B, -1, d)
        attn = self.out_proj(attn) * any_key[:, None, None].to(attn.dtype)
        x = hq + self.dropout(attn)
        return x + self.dropout(self.ffn(x))


class EDICE(nn.Module):
    """eDICE: embed cells and assays from the observed signal, contextualise each side by
    attention, decode any (cell, assay) pair with an MLP.

    The decoder's first layer acts on concat(cell, assay); it is stored as one Linear but
    applied as ``W1c c + W1a a`` so that each cell and each assay is projected once per bin
    (SPEC section 5) rather than once per target.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        d, ch = cfg.embed_dim, cfg.n_channels
        self.cell_embed = SignalEmbedder(cfg.n_cells, cfg.n_assays * ch, d)
        self.assay_embed = SignalEmbedder(cfg.n_assays, cfg.n_cells * ch, d)
        self.cell_context = ContextBlock(d, cfg.n_heads, cfg.ffn_dim, cfg.attn_dropout)
        self.assay_context = ContextBlock(d, cfg.n_heads, cfg.ffn_dim, cfg.attn_dropout)
        hidden = [nn.Linear(2 * d, cfg.decoder_hidden)]
        hidden += [nn.Linear(cfg.decoder_hidden, cfg.decoder_hidden) for _ in range(cfg.decoder_layers - 1)]
        self.decoder = nn.ModuleList(hidden)
        self.output = nn.Linear(cfg.decoder_hidden, 1)
        self.same_assay_skip = None
        if cfg.same_assay != "none":
            # Built on a forked generator, initialised last (reset_parameters): the
            # paper's parts of a seeded model start as they would without it.
            with torch.random.fork_rng(devices=[]):
                self.same_assay_skip = SameAssaySkip(cfg.same_assay, cfg.n_assays,
                                                     cfg.n_channels, d, cfg.n_heads)
        names = {n: i for i, n in enumerate(sorted(set(cfg.cell_individuals) - {""}))}
        groups = [names.get(n, -1) for n in cfg.cell_individuals] or [-1] * cfg.n_cells
        self.register_buffer("cell_group", torch.tensor(groups, dtype=torch.long),
                             persistent=False)
        self.register_buffer("blend", torch.zeros(0), persistent=False)
        self.set_blend(cfg.blend)
        self.individual_logit = None
        if cfg.individual_bias and names:
            # One logit per head, added where a cell attends to a cell of its own individual:
            # it learns how much a person's other tissues say about a tissue, so it also
            # holds for a person the model never saw (SPEC 2.7). Only with individuals in
            # the vocabulary, so that no parameter goes without a gradient.
            self.individual_logit = nn.Parameter(torch.zeros(cfg.n_heads))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The reference implementation's initialisation (Keras defaults): every dense
        weight Glorot-uniform with zero bias, the query, key and value projections each as
        its own d x d layer, and the global embeddings U(-0.05, 0.05).

        torch's defaults differ: N(0, 1) embedding rows swamp the signal embedding
        ReLU(W y + b) at the start (its entries are ~0.1), and Kaiming-uniform dense
        layers start the decoder at a smaller scale; both trained measurably worse on
        held-out tracks (BENCHMARKS.md, Quality).
        """
        d = self.cfg.embed_dim
        skip = self.same_assay_skip
        paper = [m for m in self.modules()
                 if skip is None or all(m is not s for s in skip.modules())]
        for m in paper:
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.uniform_(m.weight, -0.05, 0.05)
        for block in (self.cell_context, self.assay_context):
            for w in block.in_proj.weight.split(d):
                nn.init.xavier_uniform_(w)
        if skip is not None:  # last, so that the paper's parts start as without it
            skip.reset_parameters()

    def set_blend(self, blend) -> None:
        """Set the per-assay weights of AVG in the output (:mod:`edice_dist.blend`);
        empty or all zero: none. They are part of the config, not of the weights."""
        blend = tuple(float(v) for v in blend)
        self.cfg = replace(self.cfg, blend=blend if any(blend) else ())
        ref = self.cell_group.device
        self.blend = torch.tensor(self.cfg.blend, dtype=torch.float32, device=ref)

    def n_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # -- the steps, public so that fast inference can reuse them --------------------------

    def support_grid(self, x, support, track_cells, track_assays):
        """The supports laid out per (cell, assay).

        Parameters
        ----------
        x : (B, T) or (B, T, C) float, observed values (arcsinh); C = ``cfg.n_channels``
            (the bin's value, then its window means: :mod:`edice_dist.context`).
        support : (B, T) bool.
        track_cells, track_assays : (T,) long, vocabulary index of each column.

        Returns
        -------
        grid : (B, n_cells, n_assays, C), sum of the supports of each (cell, assay).
        count : (B, n_cells, n_assays), number of supports of each (cell, assay).
        """
        cfg = self.cfg
        x = x[..., None] if x.dim() == 2 else x
        B, C = x.shape[0], x.shape[2]
        if C != cfg.n_channels:
            raise ValueError(f"the model takes {cfg.n_channels} value(s) per track and bin "
                             f"(context {cfg.context}), got {C}")
        # Unsupported columns may hold anything (NaN padding included) and may repeat a
        # real column's (cell, assay): zero them and accumulate, so they add nothing.
        vals = torch.where(support[..., None], x, torch.zeros((), dtype=x.dtype, device=x.device))
        flat = track_cells * cfg.n_assays + track_assays
        grid = x.new_zeros(B, cfg.n_cells * cfg.n_assays, C).index_add_(1, flat, vals)
        count = x.new_zeros(B, cfg.n_cells * cfg.n_assays).index_add_(1, flat, support.to(x.dtype))
        return (grid.view(B, cfg.n_cells, cfg.n_assays, C),
                count.view(B, cfg.n_cells, cfg.n_assays))

    @staticmethod
    def _node_vectors(grid, count):
        B, n_cells, n_assays, _ = grid.shape
        nc, na = count.sum(2), count.sum(1)
        y_cells = (grid / nc.clamp(min=1)[:, :, None, None]).reshape(B, n_cells, -1)
        y_assays = (grid.transpose(1, 2) / na.clamp(min=1)[:, :, None, None]).reshape(
            B, n_assays, -1)
        return y_cells, y_assays, nc, na

    def node_inputs(self, x, support, track_cells, track_assays):
        """Per-cell and per-assay input vectors (SPEC 2.1).

        Parameters
        ----------
        x, support, track_cells, track_assays : as :meth:`support_grid`.

        Returns
        -------
        y_cells : (B, n_cells, n_assays * C), each cell's supports divided by N_c
            (assay-major: the C values of assay 0, then of assay 1, ...).
        y_assays : (B, n_assays, n_cells * C), each assay's supports divided by N_a.
        n_cells_sup : (B, n_cells) support counts N_c; n_assays_sup : (B, n_assays).
        """
        return self._node_vectors(*self.support_grid(x, support, track_cells, track_assays))

    def encode(self, x, support, track_cells, track_assays, query_cells, query_assays):
        """Contextualised embeddings of the queried cells (B, Qc, d) and assays (B, Qa, d),
        and what :class:`~edice_dist.sameassay.SameAssaySkip` needs of the batch (None
        without the skip)."""
        grid, count = self.support_grid(x, support, track_cells, track_assays)
        y_c, y_a, nc, na = self._node_vectors(grid, count)
        h_c = self.cell_embed(y_c)
        h_a = self.assay_embed(y_a)
        c_ctx = self.cell_context(h_c, nc > 0, query_cells, self.individual_bias(query_cells))
        a_ctx = self.assay_context(h_a, na > 0, query_assays)
        skip = None
        if self.same_assay_skip is not None:
            skip = self.same_assay_skip.prepare(grid, count, h_c, c_ctx, query_assays)
        if self.blend.numel() and not self.training:
            skip = {} if skip is None else skip
            skip["avg"] = blend_inputs(grid, count, query_cells, query_assays)
        return c_ctx, a_ctx, skip

    def skip_term(self, state: dict | None, pos_c: torch.Tensor, pos_a: torch.Tensor,
                  q_assays: torch.Tensor) -> torch.Tensor | None:
        """The same-assay skip of each target (B, K); None without the skip."""
        if state is None or self.same_assay_skip is None:
            return None
        return self.same_assay_skip(state, pos_c, pos_a, q_assays)

    def blend_avg(self, y: torch.Tensor, state: dict | None, pos_c: torch.Tensor,
                  pos_a: torch.Tensor, q_assays: torch.Tensor) -> torch.Tensor:
        """The output ``y`` (B, K) mixed with AVG where the model has a blend (imputation
        only): ``y + blend[a] (AVG - y)`` wherever another cell has the target's assay
        (:mod:`edice_dist.blend`)."""
        if state is None or "avg" not in state:
            return y
        return mix(y, state["avg"], pos_c, pos_a, self.blend[q_assays])

    def output_terms(self, y: torch.Tensor, state: dict | None, pos_c: torch.Tensor,
                     pos_a: torch.Tensor, q_assays: torch.Tensor) -> torch.Tensor:
        """The decoder's output ``y`` (B, K) plus the same-assay skip, then the blend."""
        skip = self.skip_term(state, pos_c, pos_a, q_assays)
        y = y if skip is None else y + skip.to(y.dtype)
        return self.blend_avg(y, state, pos_c, pos_a, q_assays)

    def contextualise(self, x, support, track_cells, track_assays, query_cells, query_assays):
        """Contextualised embeddings of the queried cells (B, Qc, d) and assays (B, Qa, d)."""
        return self.encode(x, support, track_cells, track_assays, query_cells, query_assays)[:2]

    def individual_bias(self, query_cells: torch.Tensor) -> torch.Tensor | None:
        """(n_heads, Q, n_cells) attention-logit bias between each queried cell and every
        cell of the same individual; None when the model has none to add."""
        if self.individual_logit is None:
            return None
        g = self.cell_group
        gq = g[query_cells]
        same = (gq[:, None] == g[None, :]) & (gq >= 0)[:, None]
        logit = INDIVIDUAL_LOGIT_SCALE * self.individual_logit
        return logit[:, None, None] * same.to(logit.dtype)

    def first_layer_halves(self, c_ctx, a_ctx):
        """The decoder's first layer split: (B, Qc, H) from cells, (B, Qa, H) from assays,
        the bias on the assay half."""
        d = self.cfg.embed_dim
        w = self.decoder[0].weight
        return F.linear(c_ctx, w[:, :d]), F.linear(a_ctx, w[:, d:], self.decoder[0].bias)

    def decode_hidden(self, z: torch.Tensor) -> torch.Tensor:
        """From the first layer's pre-activation (..., H) to the output (...): ReLU and
        dropout (training only) after each hidden layer (:func:`relu_drop`)."""
        p = self.cfg.decoder_dropout if self.training else 0.0
        z = relu_drop(z, p)
        for layer in self.decoder[1:]:
            z = relu_drop(layer(z), p)
        return self.output(z).squeeze(-1)

    def forward(self, x, support, track_cells, track_assays, target_cells, target_assays):
        """Predict targets in arcsinh space.

        Parameters
        ----------
        x : (B, T) or (B, T, C) float, observed values of the T columns (anything where not
            supported), with the context channels when the model has some.
        support : (B, T) bool, columns used as inputs at each bin.
        track_cells, track_assays : (T,) long.
        target_cells, target_assays : (K,) long (same targets at every bin) or (B, K).

        Returns
        -------
        (B, K) predictions, arcsinh(-log10 p).
        """
        # Under a bf16 autocast on a CPU only the decoder runs in bf16: torch's CPU attention
        # backward and gathers are several times slower in bf16 than in float32, while
        # the decoder's products are ~4x faster (BENCHMARKS.md, Training speed).
        fp32 = torch.autocast("cpu", enabled=False) if x.device.type == "cpu" else nullcontext()
        with fp32:
            q_cells, pos_c = torch.unique(target_cells, return_inverse=True)
            q_assays, pos_a = torch.unique(target_assays, return_inverse=True)
            c_ctx, a_ctx, state = self.encode(x, support, track_cells, track_assays, q_cells,
                                              q_assays)
            pc, pa = self.first_layer_halves(c_ctx, a_ctx)
            if pos_c.dim() == 1:
                z = pc[:, pos_c] + pa[:, pos_a]
            else:  # per-bin targets: row b*Q + pos of the flattened halves
                B, Qc, H = pc.shape
                rows = torch.arange(B, device=pc.device)[:, None]
                z = (pc.reshape(-1, H).index_select(0, (rows * Qc + pos_c).flatten())
                     + pa.reshape(-1, H).index_select(
                         0, (rows * pa.shape[1] + pos_a).flatten())).view(*pos_c.shape, H)
            skip = self.skip_term(state, pos_c, pos_a, q_assays)
        out = self.decode_hidden(z)
        out = out if skip is None else out + skip.to(out.dtype)
        return self.blend_avg(out, state, pos_c, pos_a, q_assays)


def extend_vocab(model: EDICE, n_cells: int, n_assays: int,
                 like: list[list[int]] | None = None,
                 individuals: list[str] | None = None) -> EDICE:
    """A copy of ``model`` whose vocabulary grows to ``n_cells`` x ``n_assays`` (new
    entries appended after the old ones), for transfer learning (SPEC 2.7).

    The signal embedders get zero input columns for the new assays (cell side) and the
    new cells (assay side), so on inputs restricted to the old vocabulary every old node
    embeds exactly as before. New global embedding rows start at the mean of the old
    rows: a new cell type starts as "an average cell type" rather than at noise.

    Parameters
    ----------
    like : optional, one list per new cell row: the old rows whose mean it starts from
        instead (a new individual's liver from the other individuals' livers); an empty
        list means all old rows.
    individuals : optional, the individual of each new cell row ('' for none).

    Returns
    -------
    EDICE
        A new module (same device and dtype as ``model``); ``model`` is left untouched.
    """
    cfg = model.cfg
    if n_cells < cfg.n_cells or n_assays < cfg.n_assays:
        raise ValueError(
            f"extend_vocab only grows a vocabulary ({cfg.n_cells} x {cfg.n_assays} -> "
            f"{n_cells} x {n_assays})"
        )
    ref = next(model.parameters())
    n_new = n_cells - cfg.n_cells
    inds = tuple(cfg.cell_individuals or [""] * cfg.n_cells) + tuple(individuals or [""] * n_new)
    if len(inds) != n_cells:
        raise ValueError(f"individuals names {len(individuals or [])} new cells, not {n_new}")
    # A new assay has no fitted blend: it reads out as the model alone.
    blend = tuple(cfg.blend) + (0.0,) * (n_assays - cfg.n_assays) if cfg.blend else ()
    new = EDICE(replace(cfg, n_cells=n_cells, n_assays=n_assays, blend=blend,
                        cell_individuals=inds if any(inds) else ())).to(ref.device, ref.dtype)
    old_state = model.state_dict()
    state = new.state_dict()
    with torch.no_grad():
        for name, value in old_state.items():
            target = state[name]
            if target.shape == value.shape:
                target.copy_(value)
            elif name in ("cell_embed.linear.weight", "assay_embed.linear.weight"):
                target.zero_()
                target[:, : value.shape[1]] = value
            elif name == "same_assay_skip.weight":  # a new assay reads out as the average
                target[: value.shape[0]] = value
                target[value.shape[0]:] = value.mean(dim=0)
            elif name in ("cell_embed.table.weight", "assay_embed.table.weight"):
                target[: value.shape[0]] = value
                target[value.shape[0]:] = value.mean(dim=0)
                rows = like if name == "cell_embed.table.weight" else None
                for i, old in enumerate(rows or []):
                    if old:
                        target[value.shape[0] + i] = value[list(old)].mean(dim=0)
            else:  # pragma: no cover - every other parameter is vocabulary-free
                raise RuntimeError(f"unexpected shape change of {name}")
    new.load_state_dict(state)
    new.train(model.training)
    return new


def decoder_macs(cfg: ModelConfig) -> int:
    """Multiply-adds of the decoder per (target, bin) with the split first layer."""
    h = cfg.decoder_hidden
    return h * h * (cfg.decoder_layers - 1) + h


def first_layer_macs(cfg: ModelConfig) -> int:
    """Multiply-adds of one half of the first layer for one node and bin."""
    return cfg.embed_dim * cfg.decoder_hidden


def init_seed(seed: int) -> None:
    """Seed every generator that model construction and training touch."""
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


