"""The model folder: what `edice train` writes and `edice impute` reads.

```
MODEL_DIR/
  model.pt, model.json   the model to use (best validation loss, or with refit the refit's
                         last epoch): state dict + metadata; model.json is the metadata
                         without weights, for people and `edice info`
  history.tsv            one line per epoch (written by training)
  train.json             the training run's config, data and status ("running" / "finished")
  ray/run-NNN/epoch_EEEE/  per-epoch checkpoints (state.pt, metrics.json) of each
                         invocation; Ray Train keeps the best and the latest per run
  select/                with refit (the default): the model-selection run, a model
                         folder of its own; the folder above is the refit on every track
```
"""

from __future__ import annotations

import hashlib
import io
import json

import torch

from . import __version__, blend, storage
from .errors import InputError
from .model import EDICE, ModelConfig
from .tracks import check_vocabulary

FORMAT = "edice-model"
FORMAT_VERSION = 1
RECORD = "train.json"
HISTORY = "history.tsv"
STATE = "state.pt"
METRICS = "metrics.json"
HISTORY_COLUMNS = ("epoch", "train_loss", "val_mse", "val_pearson", "avg_mse", "bins_per_s",
                   "seconds", "best")


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


def model_sha256(model_dir: str) -> str:
    """sha256 of ``model.pt``: what identifies a trained model."""
    h = hashlib.sha256()
    h.update(storage.read_bytes(storage.join(model_dir, "model.pt")))
    return h.hexdigest()


def load_meta(model_dir: str) -> dict:
    """The metadata of a saved model (no weights)."""
    path = storage.join(model_dir, "model.pt")
    return _load(path, model_dir)["meta"]


def _load(path: str, model_dir: str) -> dict:
    """The contents of ``model.pt``, checked: its format and version, and the names of its
    vocabulary (they become file names of imputed tracks) by the one name rule."""
    if not storage.exists(path):
        if storage.exists(storage.join(model_dir, RECORD)):
            raise InputError(
                f"The training in {model_dir} has not finished: it has no {path} yet. Re-run "
                "the same `edice train` (or `edice finetune`) command to finish it."
            )
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
    meta = obj["meta"]
    if int(meta.get("format_version", 0)) > FORMAT_VERSION:
        raise InputError(f"{path} was written by a newer edice-dist; upgrade to read it.")
    for key in ("cell_keys", "assays"):
        if not isinstance(meta.get(key), list) or not meta[key]:
            raise InputError(f"Model file {path} has no {key} list in its metadata: it is "
                             "damaged. Train the model again.")
    check_vocabulary(meta["cell_keys"], meta["assays"], f"Model {path}")
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
        f"decoder {cfg['decoder_layers']}x{cfg['decoder_hidden']}, context "
        f"{list(cfg.get('context') or []) or 'none'}, same-assay skip "
        f"{cfg.get('same_assay', 'none')}; {n_params:,} parameters",
        f"vocabulary   {len(meta['cell_keys'])} cell types, {len(meta['assays'])} assays "
        f"({', '.join(meta['assays'])})",
        f"transform    {meta['transform']}",
    ]
    if cfg.get("blend"):
        lines.append(f"AVG blend    {blend.describe(cfg['blend'], meta['assays'])} (weight of "
                     "AVG in the output, fitted on the validation tracks)")
    people = sorted(set(cfg.get("cell_individuals") or []) - {""})
    if people:
        bias = "with" if cfg.get("individual_bias") else "without"
        lines.append(f"individuals  {len(people)} ({', '.join(people)}), {bias} the "
                     "individual attention bias")
    for key in ("epoch", "best_val_mse", "store", "trained", "parent_model"):
        if key in meta:
            lines.append(f"{key:<12} {meta[key]}")
    if "train_config" in meta:
        tc = meta["train_config"]
        lines.append("train config " + ", ".join(f"{k}={v}" for k, v in tc.items()))
    return "\n".join(lines)


# -- training: the run record, epoch checkpoints, history ------------------------------


def read_record(out: str) -> dict | None:
    """``train.json`` of the model folder ``out``; None when there is none."""
    return storage.read_json(storage.join(out, RECORD), "Train into a new --out folder.")


def write_record(out: str, record: dict) -> None:
    storage.write_text_atomic(storage.join(out, RECORD), json.dumps(record, indent=2) + "\n")


def epoch_checkpoints(out: str) -> list[dict]:
    """Every epoch checkpoint in ``out/ray`` with its metrics, oldest first."""
    found = []
    root = storage.join(out, "ray")
    for run in storage.list_dir(root):
        if not run.startswith("run-"):
            continue
        for name in storage.list_dir(storage.join(root, run)):
            if not name.startswith("epoch_"):
                continue
            path = storage.join(root, run, name)
            try:
                metrics = json.loads(storage.read_text(storage.join(path, METRICS)))
            except (OSError, json.JSONDecodeError, FileNotFoundError):
                metrics = None
            found.append({"run": run, "name": name, "path": path, "metrics": metrics,
                          "epoch": int(name.split("_")[1])})
    found.sort(key=lambda c: (c["epoch"], c["run"]))
    return found


def load_state(path: str) -> dict:
    """A checkpoint's ``state.pt``; InputError when it is unreadable or partial."""
    f = storage.join(path, STATE)
    try:
        state = torch.load(io.BytesIO(storage.read_bytes(f)), map_location="cpu", weights_only=True)
        for key in ("model", "optimizer", "epoch", "history", "config"):
            state[key]  # noqa: B018 - a missing key means a partial or foreign file
    except Exception as e:  # torch raises many types for truncated files
        raise InputError(
            f"Checkpoint {f} is unreadable or partial ({type(e).__name__}: {e}). Delete the "
            f"folder {path} to resume from the checkpoint before it, or train into a new "
            "--out folder."
        ) from None
    return state


def latest_checkpoint(out: str) -> dict | None:
    """The newest complete checkpoint (None when there is none); InputError when the newest
    one is partial."""
    found = epoch_checkpoints(out)
    cks = [c for c in found if c["metrics"] is not None]
    partial = [c for c in found if c["metrics"] is None]
    if partial and (not cks or partial[-1]["epoch"] > cks[-1]["epoch"]):
        c = partial[-1]
        raise InputError(
            f"Checkpoint {c['path']} is partial (no {METRICS}). Delete that folder to resume "
            "from the checkpoint before it, or train into a new --out folder."
        )
    return cks[-1] if cks else None


def next_run_name(out: str) -> str:
    runs = [n for n in storage.list_dir(storage.join(out, "ray")) if n.startswith("run-")]
    nums = [int(n[4:]) for n in runs if n[4:].isdigit()]
    return f"run-{max(nums, default=0) + 1:03d}"


def write_history(out: str, history: list[dict]) -> None:
    lines = ["\t".join(HISTORY_COLUMNS)]
    for row in history:
        vals = []
        for k in HISTORY_COLUMNS:
            v = row.get(k, "")
            vals.append(f"{v:.6g}" if isinstance(v, float) else str(v))
        lines.append("\t".join(vals))
    storage.write_text_atomic(storage.join(out, HISTORY), "\n".join(lines) + "\n")

