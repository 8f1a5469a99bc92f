"""A trained model on one chunk of bins on one device: the fast inference path.

Per batch of bins the attention runs once for all targets (only the target cells and
assays are queries), the decoder's first layer is applied once per cell and once per
assay (``W1c c + W1a a``, SPEC section 5), and the remaining decoder layers run as large
matrix products over every (bin, target) row. On a GPU, and on CPUs with native bf16
(AVX-512 BF16 / AMX), the whole decoder runs in bfloat16 with float32 accumulation; the
signal embedders and the attention stay in float32. Its cost in accuracy is measured on
held-out tracks (BENCHMARKS.md, Imputation).

Pure: no Ray, no storage. :mod:`edice_dist.impute` drives it.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .blend import target_weights
from .model import EDICE, decoder_macs, first_layer_macs, keep_mask

# Decoder rows (bins x targets) per matrix product. Large enough that the products run
# near the device's matmul peak, small enough that the activations stay in cache-sized
# blocks on a CPU (measured in benchmarks/bench_impute.py).
ROWS_CPU = 8192
ROWS_CUDA = 65536
MIN_BATCH_BINS = 128
"""The fewest bins of a batch sized from the target count (``rows // n_targets`` is 4 at
2,000 targets), unless the encoder's activations would pass :data:`ENCODE_BYTES`. Each
batch encodes every support once for all targets, a fixed cost per batch: 32-bin batches
imputed a 250-track, 494-target consortium 1.2x slower than 128-bin ones. The encoder's
activations grow with bins x cells x cells, though: at 125 cell types, ~1.5 MB per bin
with the reduced model of BENCHMARKS.md's issue-22 section, and its batches there have
32 bins (:func:`encode_batch_bins`)."""

SMALLEST_BATCH_BINS = 32
"""The fewest bins of a batch whatever the budget: below it the fixed cost per batch
dominates."""

ENCODE_BYTES = 64 * 2**20
"""Budget for the encoder's activations of one batch (float32) on a CPU, per imputation
actor or training worker."""

ENCODE_BYTES_CUDA = 2 * 2**30
"""The same on a GPU, whose memory holds little else and whose kernels want long batches
(not measured: no GPU was available)."""


def encode_bytes_per_bin(cfg, n_supports: int, n_query_cells: int, n_query_assays: int) -> int:
    """Bytes of the encoder's largest live activations per bin of a batch: the attention
    logits and weights of both sides, the same-assay skip's weights and sums over every
    queried (cell, assay), the embeddings, the support grid and the first layer's halves.

    An estimate from the shapes (float32, ~3 live copies of each product: the product,
    its elementwise transform, the result). At 125 cell types x 24 assays with the reduced
    model of BENCHMARKS.md's issue-22 section it gives 1.48 MiB per bin; an actor's peak
    grew by 1.51 MiB per bin of its batches there."""
    N, A, C, H, d = cfg.n_cells, cfg.n_assays, cfg.n_channels, cfg.n_heads, cfg.embed_dim
    qc, qa = n_query_cells, n_query_assays
    attn = 3 * H * (qc * N + qa * A)
    skip = 0
    if cfg.same_assay != "none":
        skip = 3 * H * qc * N + N * qa * (C + 1) + 3 * qc * H * qa * (C + 1)
    embed = 6 * (N + A) * d
    grid = 3 * N * A * C + 2 * n_supports * C
    first = (qc + qa) * cfg.decoder_hidden
    return 4 * (attn + skip + embed + grid + first)


def encode_batch_bins(cfg, n_supports: int, n_query_cells: int, n_query_assays: int,
                      most: int = MIN_BATCH_BINS, least: int = SMALLEST_BATCH_BINS,
                      device: str | torch.device = "cpu") -> int:
    """Bins of a batch whose encoder activations fit the device's budget
    (:data:`ENCODE_BYTES`, :data:`ENCODE_BYTES_CUDA`): ``most`` when it fits, else the
    largest power of two in [``least``, ``most``] that does (``least`` when none does).
    Imputation and validation size their batches with it."""
    per_bin = encode_bytes_per_bin(cfg, n_supports, n_query_cells, n_query_assays)
    budget = ENCODE_BYTES_CUDA if torch.device(device).type == "cuda" else ENCODE_BYTES
    fit = max(1, budget // max(per_bin, 1))
    if fit >= most:
        return int(most)
    return int(max(least, 1 << (int(fit).bit_length() - 1)))


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``device`` as given, else CUDA when available, else the CPU."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@functools.cache
def cpu_has_fast_bf16() -> bool:
    """True when the CPU multiplies bf16 matrices natively (AVX-512 BF16 or AMX).

    Without them torch emulates bf16 and is slower than float32."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


def resolve_dtype(device: torch.device, dtype: str | torch.dtype | None = None) -> torch.dtype:
    """The decoder's compute dtype: ``dtype`` as given (``"float32"``, ``"bfloat16"``),
    else bf16 on CUDA and on CPUs with native bf16, float32 otherwise.

    ``EDICE_PREDICT_DTYPE`` overrides the default (not an explicit ``dtype``).
    """
    if dtype is None:
        dtype = os.environ.get("EDICE_PREDICT_DTYPE") or None
    if dtype is None:
        fast = device.type == "cuda" or (device.type == "cpu" and cpu_has_fast_bf16())
        return torch.bfloat16 if fast else torch.float32
    if isinstance(dtype, torch.dtype):
        out = dtype
    else:
        names = {"float32": torch.float32, "fp32": torch.float32,
                 "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
        if str(dtype) not in names:
            raise ValueError(f"dtype must be float32 or bfloat16, got {dtype!r}")
        out = names[str(dtype)]
    if out not in (torch.float32, torch.bfloat16):
        raise ValueError(f"dtype must be float32 or bfloat16, got {out}")
    return out


def _decode(pc, pa, pos_c, pos_a, hidden, w_out, b_out):
    """The decoder from the first-layer halves, as one graph for ``torch.compile``.

    pc : (Qc, B, H), pa : (Qa, B, H) in the compute dtype; pos_c, pos_a : (k,) long.
    Returns (k, B) float32.
    """
    z = (pc[pos_c] + pa[pos_a]).relu_().flatten(0, 1)
    for w, b in hidden:
        z = F.linear(z, w, b).relu_()
    return F.linear(z, w_out, b_out).float().view(pos_c.shape[0], -1)


def _decode_eager(pc, pa, pos_c: list[int], pos_a: list[int], hidden, w_out, b_out,
                  fused=None, drop: float = 0.0):
    """:func:`_decode` without its gathers: each target's row block is one add of two
    node rows into place (the gather + add + copy passes over the decoder's largest
    tensor cost as much as its products on a CPU; BENCHMARKS.md, Imputation).
    ``fused``: a linear + ReLU in one call (:func:`_fused_linear_relu`), for ``hidden``
    weights packed for it. ``drop``: the training-time dropout after every hidden layer,
    for Monte Carlo samples (``relu(a) * m == relu(a * m)`` as ``m >= 0``, so a fused ReLU
    can be masked after the fact)."""
    k, (_, B, H) = len(pos_c), pc.shape
    z = torch.empty((k, B, H), dtype=pc.dtype, device=pc.device)
    for i, (c, a) in enumerate(zip(pos_c, pos_a, strict=True)):
        torch.add(pc[c], pa[a], out=z[i])
    z = z.relu_().view(k * B, H)
    for layer in [None, *hidden]:
        if layer is not None:
            w, b = layer
            z = fused(z, w, b) if fused is not None else F.linear(z, w, b).relu_()
        if drop:
            z = z.mul_(keep_mask(z.shape, drop, z.device, z.dtype))
    return F.linear(z, w_out, b_out).float().view(k, B)


@functools.cache
def _fused_linear_relu():
    """oneDNN's linear with the ReLU fused in (the op torch.compile emits on CPUs), or None
    where this torch build lacks it. In bf16 on a CPU the separate ReLU pass cost ~40 % of
    a hidden layer's time (BENCHMARKS.md, Imputation)."""
    try:
        op, pack = torch.ops.mkldnn._linear_pointwise, torch.ops.mkldnn._reorder_linear_weight
        x, w = torch.ones(3, 4, dtype=torch.bfloat16), torch.ones(2, 4, dtype=torch.bfloat16)
        b = torch.zeros(2, dtype=torch.bfloat16)
        if not torch.equal(op(x, pack(w, 3), b, "relu", [], ""), F.linear(x, w, b).relu_()):
            return None
    except (AttributeError, RuntimeError):
        return None
    return (lambda z, w, b: op(z, w, b, "relu", [], "")), pack


@dataclass
class Predictor:
    """A model ready for fast inference on one device.

    Attributes
    ----------
    model : EDICE
        In eval mode, float32, on ``device``.
    device : torch.device
    dtype : torch.dtype
        Compute dtype of the whole decoder, its first layer and output included
        (products accumulate in float32 either way).
    first : (weight of the cell half, weight of the assay half, bias)
        The decoder's first layer split (SPEC section 5), cast to ``dtype`` once.
    hidden : list of (weight, bias)
        Decoder layers after the first, cast to ``dtype`` once.
    output : (weight, bias) of the output layer, in ``dtype``.
    fused : the fused linear + ReLU the ``hidden`` weights are packed for (bf16 on CPUs),
        or None.
    compiled : bool
        Whether the decoder runs through ``torch.compile`` (one fused pass for the
        gather + add + ReLU of the first layer; falls back to eager on any failure).
    """

    model: EDICE
    device: torch.device
    dtype: torch.dtype
    first: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    hidden: list[tuple[torch.Tensor, torch.Tensor]]
    output: tuple[torch.Tensor, torch.Tensor]
    fused: object = None
    compiled: bool = False
    _fn: object = None

    @property
    def rows(self) -> int:
        return ROWS_CUDA if self.device.type == "cuda" else ROWS_CPU

    def first_layer(self, c_ctx: torch.Tensor, a_ctx: torch.Tensor):
        """The first layer's halves, node-major: (Qc, B, H) and (Qa, B, H) in ``dtype``.

        Transposing the embeddings (d wide) rather than the halves (H wide) to node-major
        moves H/d times less data; a block's rows are then (target, bin), the output's
        order."""
        wc, wa, b = self.first
        # Contiguous first: a strided 3-d input makes linear a slow batched product.
        c = c_ctx.transpose(0, 1).to(self.dtype, memory_format=torch.contiguous_format)
        a = a_ctx.transpose(0, 1).to(self.dtype, memory_format=torch.contiguous_format)
        return F.linear(c, wc), F.linear(a, wa, b)

    def decode(self, pc, pa, pos_c, pos_a, drop: float = 0.0):
        """Predictions (k, B) float32 of the targets at positions ``pos_c``/``pos_a`` of
        the queried cells and assays (long tensors); ``drop`` > 0 draws one Monte Carlo
        dropout sample instead (always eager)."""
        if drop:
            return _decode_eager(pc, pa, pos_c.tolist(), pos_a.tolist(), self.hidden,
                                 *self.output, fused=self.fused, drop=drop)
        if self.compiled:
            if self._fn is None:
                self._fn = torch.compile(_decode, dynamic=False)
            try:
                return self._fn(pc, pa, pos_c, pos_a, self._plain_hidden(), *self.output)
            except Exception as e:  # noqa: BLE001 - a missing compiler must not stop a run
                import warnings

                warnings.warn(f"torch.compile of the decoder failed ({type(e).__name__}: {e}); "
                              "running eager", stacklevel=2)
                self.compiled = False
        return _decode_eager(pc, pa, pos_c.tolist(), pos_a.tolist(), self.hidden, *self.output,
                             fused=self.fused)

    def _plain_hidden(self):
        """The hidden layers as plain tensors (the compiler does its own packing)."""
        return [(layer.weight.detach().to(self.dtype), layer.bias.detach().to(self.dtype))
                for layer in self.model.decoder[1:]] if self.fused else self.hidden


def _want_compile(model: EDICE, device: torch.device, dtype: torch.dtype, compile) -> bool:
    if compile is None:
        env = os.environ.get("EDICE_COMPILE", "")
        if env:
            return env not in ("0", "false", "no")
        # On a CPU with native bf16 the matrix products are so fast that the unfused
        # element-wise first layer costs as much as they do; small models are not worth
        # the compile time (benchmarks/bench_impute.py).
        return (device.type == "cpu" and dtype == torch.bfloat16
                and model.cfg.decoder_hidden >= 1024)
    return bool(compile)


def prepare(model: EDICE | Predictor, device=None, dtype=None, compile: bool | None = None) -> Predictor:
    """Move ``model`` to ``device`` in eval mode and cast the decoder once.

    ``compile`` None: ``EDICE_COMPILE`` (0/1) when set, else on for CPU + bf16 + decoders of
    width >= 1024. A :class:`Predictor` passes through unchanged when ``device``, ``dtype``
    and ``compile`` are None or agree with it.
    """
    if isinstance(model, Predictor):
        same_dev = device is None or torch.device(device) == model.device
        same_dt = dtype is None or resolve_dtype(model.device, dtype) == model.dtype
        same_c = compile is None or bool(compile) == model.compiled
        if same_dev and same_dt and same_c:
            return model
        model = model.model
    dev = resolve_device(device)
    dt = resolve_dtype(dev, dtype)
    model = model.to(dev).eval()
    d = model.cfg.embed_dim

    def cast(t):
        return t.detach().to(dt)

    w1 = model.decoder[0].weight
    first = (cast(w1[:, :d]), cast(w1[:, d:]), cast(model.decoder[0].bias))
    hidden = [(cast(layer.weight), cast(layer.bias)) for layer in model.decoder[1:]]
    output = (cast(model.output.weight), cast(model.output.bias))
    compiled = _want_compile(model, dev, dt, compile)
    fused = None
    if dev.type == "cpu" and dt == torch.bfloat16 and not compiled and _fused_linear_relu():
        fused, pack = _fused_linear_relu()
        hidden = [(pack(w, ROWS_CPU), b) for w, b in hidden]
    return Predictor(model, dev, dt, first, hidden, output, fused, compiled)


def _check_index(name: str, idx: np.ndarray, n: int, what: str) -> None:
    if idx.size and (idx.min() < 0 or idx.max() >= n):
        raise ValueError(f"{name} holds {what} indices outside 0..{n - 1}")


def plan_batches(n_targets: int, rows: int, batch_bins: int | None = None) -> tuple[int, int]:
    """(bins per batch, targets per block) so that a block has about ``rows`` decoder rows;
    the blocks split the targets evenly (every block is padded to the same size)."""
    if batch_bins is None:
        batch_bins = max(MIN_BATCH_BINS, rows // n_targets)
    if batch_bins <= 0:
        raise ValueError("batch_bins must be positive")
    k_max = max(1, rows // batch_bins)
    n_blocks = -(-n_targets // k_max)
    return batch_bins, -(-n_targets // n_blocks)


def predict_chunk(
    model: EDICE | Predictor,
    x: np.ndarray,
    support_cols,
    track_cells,
    track_assays,
    target_cells,
    target_assays,
    batch_bins: int | None = None,
    device=None,
    dtype=None,
    samples: int = 0,
    seed: int = 0,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Predict every target at every bin of a chunk, and optionally the spread of the
    prediction.

    Parameters
    ----------
    model : EDICE or Predictor
        A trained model (see :func:`prepare`; an EDICE is prepared on each call).
    x : np.ndarray, shape (n_bins, T) or (n_bins, T, C)
        Observed values of the chunk's T store columns, arcsinh(-log10 p), with the
        model's context channels when it has some (:func:`edice_dist.context.read_window`).
        Non-finite values count as 0 (missing data, SPEC section 3).
    support_cols : array-like of int, shape (S,)
        Columns of ``x`` used as supports at every bin (S >= 1).
    track_cells, track_assays : array-like of int, shape (T,)
        Vocabulary index of each column's cell and assay (only the support columns' are
        read; others may be -1).
    target_cells, target_assays : array-like of int, shape (K,)
        Vocabulary indices of the targets.
    batch_bins : int, optional
        Bins per forward batch; by default enough that each decoder product has about
        ``ROWS_CPU`` (CPU) or ``ROWS_CUDA`` (GPU) rows of (bin, target) and at least
        :data:`MIN_BATCH_BINS`, unless the encoder's activations would pass
        :data:`ENCODE_BYTES` (:func:`encode_batch_bins`).
    device, dtype :
        See :func:`resolve_device` and :func:`resolve_dtype`.
    samples : int
        Monte Carlo dropout samples per bin for the spread (0: none; else at least 2).
        Each sample runs the decoder with the dropout it was trained with
        (``decoder_dropout``) on the same attention output, so a spread costs about
        ``samples`` decoder passes.
    seed : int
        Seeds the dropout masks, so that a chunk's spread is the same on every run.

    Returns
    -------
    np.ndarray, shape (K, n_bins), float32
        Predictions in arcsinh space; equal to ``model(x, ...)`` in float32. Without
        dropout: the spread does not change them.
    np.ndarray, shape (K, n_bins), float32
        Only when ``samples`` > 0: the standard deviation of the samples, in arcsinh units.
    """
    pred = prepare(model, device, dtype)
    m, dev, cfg = pred.model, pred.device, pred.model.cfg
    x = np.asarray(x)
    if x.ndim not in (2, 3):
        raise ValueError(f"x must be (n_bins, T) or (n_bins, T, C), got shape {x.shape}")
    n_bins, T = x.shape[:2]
    support_cols = np.asarray(support_cols, dtype=np.int64).reshape(-1)
    track_cells = np.asarray(track_cells, dtype=np.int64).reshape(-1)
    track_assays = np.asarray(track_assays, dtype=np.int64).reshape(-1)
    target_cells = np.asarray(target_cells, dtype=np.int64).reshape(-1)
    target_assays = np.asarray(target_assays, dtype=np.int64).reshape(-1)
    if support_cols.size == 0:
        raise ValueError("support_cols is empty: at least one observed track is needed")
    if len(track_cells) != T or len(track_assays) != T:
        raise ValueError(f"track_cells and track_assays must have x's {T} columns, got "
                         f"{len(track_cells)} and {len(track_assays)}")
    if len(target_cells) != len(target_assays) or len(target_cells) == 0:
        raise ValueError("target_cells and target_assays must be non-empty and of equal length")
    _check_index("support_cols", support_cols, T, "column")
    _check_index("track_cells[support_cols]", track_cells[support_cols], cfg.n_cells, "cell")
    _check_index("track_assays[support_cols]", track_assays[support_cols], cfg.n_assays, "assay")
    _check_index("target_cells", target_cells, cfg.n_cells, "cell")
    _check_index("target_assays", target_assays, cfg.n_assays, "assay")
    if samples == 1 or samples < 0:
        raise ValueError(f"samples must be 0 (no spread) or at least 2, got {samples}")
    if samples and not cfg.decoder_dropout:
        raise ValueError("the model has no decoder dropout (decoder_dropout 0): Monte Carlo "
                         "samples of it would all be equal")
    K = len(target_cells)
    q_cells, pos_c = np.unique(target_cells, return_inverse=True)
    q_assays, pos_a = np.unique(target_assays, return_inverse=True)
    if batch_bins is None:  # the decoder's rows, as far as the encoder's budget allows
        batch_bins = encode_batch_bins(cfg, support_cols.size, len(q_cells), len(q_assays),
                                       most=max(MIN_BATCH_BINS, pred.rows // K), device=dev)
    batch_bins, k_block = plan_batches(K, pred.rows, batch_bins)
    if not pred.compiled:  # padding only buys static shapes for the compiler
        batch_bins = min(batch_bins, max(n_bins, 1))

    whole = support_cols.size == T and np.array_equal(support_cols, np.arange(T))
    tc = torch.as_tensor(track_cells[support_cols], device=dev)
    ta = torch.as_tensor(track_assays[support_cols], device=dev)
    k_pad = -K % k_block
    if k_pad:  # repeat the first target to fill the last block; computed and dropped
        pos_c = np.concatenate([pos_c, np.full(k_pad, pos_c[0])])
        pos_a = np.concatenate([pos_a, np.full(k_pad, pos_a[0])])
    q_cells, q_assays = torch.as_tensor(q_cells, device=dev), torch.as_tensor(q_assays, device=dev)
    pos_c, pos_a = torch.as_tensor(pos_c, device=dev), torch.as_tensor(pos_a, device=dev)

    out = np.empty((K, n_bins), dtype=np.float32)
    spread = np.empty((K, n_bins), dtype=np.float32) if samples else None
    # The masks come from a generator of their own: the caller's random state is kept.
    with torch.inference_mode(), torch.random.fork_rng(
            devices=[dev] if dev.type == "cuda" else [], enabled=bool(samples)):
        if samples:
            torch.manual_seed(seed)
        for b0 in range(0, n_bins, batch_bins):
            b1 = min(b0 + batch_bins, n_bins)
            xb = _support_batch(x, b0, b1, None if whole else support_cols,
                                batch_bins if pred.compiled else 0).to(dev, non_blocking=True)
            sup = torch.ones(xb.shape[:2], dtype=torch.bool, device=dev)
            c_ctx, a_ctx, skip = m.encode(xb, sup, tc, ta, q_cells, q_assays)
            pc, pa = pred.first_layer(c_ctx, a_ctx)
            for k0 in range(0, K, k_block):
                k1 = min(k0 + k_block, K)
                pk_c, pk_a = pos_c[k0:k0 + k_block], pos_a[k0:k0 + k_block]
                y = pred.decode(pc, pa, pk_c, pk_a)
                if skip is not None:  # float32: a few multiply-adds per target and cell
                    y = m.output_terms(y.T, skip, pk_c, pk_a, q_assays).T
                out[k0:k1, b0:b1] = y[: k1 - k0, : b1 - b0].cpu().numpy()
                if samples:
                    sd = _mc_spread(pred, pc, pa, pk_c, pk_a, samples, cfg.decoder_dropout)
                    if skip is not None and "avg" in skip:  # the blend scales the decoder
                        lam = target_weights(skip["avg"], pk_c, pk_a, m.blend[q_assays])[1]
                        sd = sd * (1 - lam.T)
                    spread[k0:k1, b0:b1] = sd[: k1 - k0, : b1 - b0].cpu().numpy()
    return (out, spread) if samples else out


def _support_batch(x: np.ndarray, b0: int, b1: int, cols, pad_to: int) -> torch.Tensor:
    """Bins ``[b0, b1)`` of the support columns ``cols`` (all when None) of ``x`` as a
    float32 tensor, non-finite values as 0, zero bins appended up to ``pad_to`` (the
    compiler's static shape).

    Per batch rather than for the whole chunk up front: a chunk of 1,000 tracks with its
    context channels is 260 MB, and each whole-chunk copy (the column selection, then the
    NaN cleaning) added that much to every imputation actor."""
    xb = np.array(x[b0:b1] if cols is None else x[b0:b1, cols], dtype=np.float32)
    np.nan_to_num(xb, copy=False, nan=0.0, posinf=0.0, neginf=0.0)
    if pad_to > len(xb):
        xb = np.concatenate([xb, np.zeros((pad_to - len(xb), *xb.shape[1:]), np.float32)])
    return torch.from_numpy(xb)


def _mc_spread(pred: Predictor, pc, pa, pos_c, pos_a, samples: int, drop: float):
    """Standard deviation (k, B) float32 of ``samples`` dropout draws of the decoder.

    Sums of the draws and of their squares (float32; the values are arcsinh-scale, O(1-10),
    so the difference of moments loses nothing that matters at ``samples`` <= 100s)."""
    s1 = s2 = None
    for _ in range(samples):
        y = pred.decode(pc, pa, pos_c, pos_a, drop=drop)
        s1 = y if s1 is None else s1.add_(y)
        s2 = y * y if s2 is None else s2.addcmul_(y, y)
    mean = s1 / samples
    var = (s2 / samples - mean * mean).clamp_(min=0) * (samples / (samples - 1))
    return var.sqrt_()


def flops_per_bin(model: EDICE, n_targets: int, n_query_cells: int, n_query_assays: int) -> float:
    """Floating-point operations (2 per multiply-add) of :func:`predict_chunk` per bin.

    Counts the decoder (per target), the first-layer halves (per queried node) and the
    embedding + attention + feed-forward of both sides (per node and query).
    """
    cfg = model.cfg
    d, f = cfg.embed_dim, cfg.ffn_dim
    nc, na = cfg.n_cells, cfg.n_assays
    embed = 2 * nc * na * d  # both sides' signal embedders
    kv = (nc + na) * 2 * d * d  # key and value projections of every node
    per_query = 2 * d * d + 2 * d * f  # query and output projections, feed-forward
    attn = (embed + kv + n_query_cells * (per_query + 2 * nc * d)
            + n_query_assays * (per_query + 2 * na * d))
    first = (n_query_cells + n_query_assays) * first_layer_macs(cfg)
    dec = n_targets * decoder_macs(cfg)  # hidden layers after the first, and the output
    return 2.0 * (attn + first + dec)
