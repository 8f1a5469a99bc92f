"""The model folder: what `edice train` writes and `edice impute` reads.

```
MODEL_DIR/
  model.pt       the model to use (best validation loss): state dict + everything below
  model.json     the same information without weights, for people and `edice info`
  history.tsv    one line per epoch (written by training)
```
"""

from __future__ import annotations

import io
import json

import torch

from . import __version__, storage
from .errors import InputError
from .model import EDICE, ModelConfig

FORMAT = "edice-model"
FORMAT_VERSION = 1


def save_model(model_dir: str, model: EDICE, info: dict) -> None:
    """Write ``model.pt`` and ``model.json`` atomically.

    ``info`` must hold ``cell_keys``, ``assays``, ``transform`` and may hold anything
    JSON-serialisable (train config, store fingerprint, epoch, metrics).
    """
    for key in ("cell_keys", "assays", "transform"):
        if key not in info:
            raise ValueError(f"model info lacks {key!r}")
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "tool_version": __version__,
            "model_config": model.cfg.to_dict(), **info}
    buf = io.BytesIO()
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save({"meta": meta, "state_dict": state}, buf)
    storage.makedirs(model_dir)
    storage.write_bytes_atomic(storage.join(model_dir, "model.pt"), buf.getvalue())
    storage.write_text_atomic(storage.join(model_dir, "model.json"),
                              json.dumps(meta, indent=2, default=str) + "\n")


def load_meta(model_dir: str) -> dict:
    """The metadata of a saved model (no weights)."""
    path = storage.join(model_dir, "model.pt")
    return _load(path, model_dir)["meta"]


def _load(path: str, model_dir: str) -> dict:
    if not storage.exists(path):
        raise InputError(
            f"No trained model at {model_dir} (expected {path}). Train one with `edice train`, "
            "or point --model at a model folder."
        )
    try:
        obj = torch.load(io.BytesIO(storage.read_bytes(path)), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for truncated/corrupt files
        raise InputError(
            f"Model file {path} is unreadable or partial ({type(e).__name__}: {e}). "
            "Re-run `edice train` (add --resume to continue from its checkpoints)."
        ) from None
    if not isinstance(obj, dict) or obj.get("meta", {}).get("format") != FORMAT:
        raise InputError(f"{path} is not an edice model file.")
    if int(obj["meta"].get("format_version", 0)) > FORMAT_VERSION:
        raise InputError(f"{path} was written by a newer edice-dist; upgrade to read it.")
    return obj


def load_model(model_dir: str, device: str | torch.device = "cpu") -> tuple[EDICE, dict]:
    """Load ``MODEL_DIR/model.pt`` in eval mode on ``device``.

    Returns
    -------
    (model, meta) where meta holds ``cell_keys``, ``assays``, ``transform``, ``model_config``
    and the training provenance.
    """
    obj = _load(storage.join(model_dir, "model.pt"), model_dir)
    meta = obj["meta"]
    model = EDICE(ModelConfig.from_dict(meta["model_config"]))
    try:
        model.load_state_dict(obj["state_dict"])
    except RuntimeError as e:
        raise InputError(f"Weights in {model_dir} do not fit its own config: {e}") from None
    return model.to(device).eval(), meta


def describe(model_dir: str) -> str:
    """What `edice info MODEL_DIR` prints."""
    meta = load_meta(model_dir)
    cfg = meta["model_config"]
    n_params = EDICE(ModelConfig.from_dict(cfg)).n_parameters()
    lines = [
        f"model        {model_dir}",
        f"format       {meta['format']} v{meta['format_version']} (edice-dist {meta.get('tool_version')})",
        f"architecture d={cfg['embed_dim']}, {cfg['n_heads']} heads, ffn {cfg['ffn_dim']}, "
        f"decoder {cfg['decoder_layers']}x{cfg['decoder_hidden']}; {n_params:,} parameters",
        f"vocabulary   {len(meta['cell_keys'])} cell types, {len(meta['assays'])} assays "
        f"({', '.join(meta['assays'])})",
        f"transform    {meta['transform']}",
    ]
    for key in ("epoch", "best_val_mse", "store", "trained", "parent_model"):
        if key in meta:
            lines.append(f"{key:<12} {meta[key]}")
    if "train_config" in meta:
        tc = meta["train_config"]
        lines.append("train config " + ", ".join(f"{k}={v}" for k, v in tc.items()))
    return "\n".join(lines)
