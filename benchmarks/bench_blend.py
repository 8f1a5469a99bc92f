"""The AVG blend of trained model folders, fitted again from their selection runs.

    python benchmarks/bench_blend.py --store STORE MODEL_DIR [MODEL_DIR ...]

For each model folder trained with the refit (its selection run in ``MODEL_DIR/select``):
the selection model's predictions on its validation bins, without any blend, then the
least-squares weight of AVG per validation track and pooled over all of them, as
training fits it when it ends (:mod:`edice_dist.blend`). The pooled weight is what a
model trained with ``avg_blend=true`` carries; on a folder trained so, the printed weight
equals the recorded one. A folder trained before the blend existed gets the weight it
would have had: the same seed gives the same weights on a CPU, and training never applies
the blend, so this tells what the default changes on benchmarks already run.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from edice_dist import blend  # noqa: E402
from edice_dist.checkpoint import load_model  # noqa: E402
from edice_dist.sampler import avg_weights, read_validation, validation_plan  # noqa: E402
from edice_dist.store import open_store  # noqa: E402
from edice_dist.train import SELECT_DIR  # noqa: E402


def validation_sums(model_dir: str, store: str, batch: int = 512) -> tuple[np.ndarray, list]:
    """(V, 2) sums of :func:`edice_dist.blend.validation_sums` of the selection run of
    ``model_dir`` and the assay of each validation track."""
    sel, meta = load_model(os.path.join(model_dir, SELECT_DIR))
    sel.set_blend(())
    st = open_store(store)
    tcfg = meta["train_config"]
    inputs, val = meta["data"]["inputs"]["columns"], meta["data"]["val"]["columns"]
    xv, yv = read_validation(st, validation_plan(st, tcfg["val_bins"], tcfg["seed"]), inputs,
                             val, context=tuple(tcfg["context"]))
    ci = {c: i for i, c in enumerate(meta["cell_keys"])}
    ai = {a: i for i, a in enumerate(meta["assays"])}
    tc = np.array([ci[st.tracks[i].cell_key] for i in inputs + val])
    ta = np.array([ai[st.tracks[i].assay] for i in inputs + val])
    n = len(inputs)
    w = torch.from_numpy(avg_weights(tc[:n], ta[:n], tc[n:], ta[n:])).double()
    cols = [torch.from_numpy(v) for v in (tc[:n], ta[:n], tc[n:], ta[n:])]
    sums = torch.zeros(len(val), 2, dtype=torch.float64)
    with torch.no_grad():
        for i in range(0, len(xv), batch):
            x = torch.from_numpy(np.asarray(xv[i:i + batch], dtype=np.float32))
            p = sel(x, torch.ones(x.shape[:2], dtype=torch.bool), *cols).double()
            m = (x[..., 0] if x.dim() == 3 else x).double() @ w
            y = torch.from_numpy(np.asarray(yv[i:i + batch])).double()
            sums += blend.validation_sums(p, y, m, w.sum(0) > 0)
    return sums.numpy(), [st.tracks[i].assay for i in val]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--store", required=True, help="the track store the models trained on")
    ap.add_argument("models", nargs="+", help="model folders trained with the refit")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    for d in a.models:
        sums, assays = validation_sums(d, a.store)
        per = ", ".join(f"{name} {s0 / s1:+.3f}" for (s0, s1), name in zip(sums, assays,
                                                                         strict=True) if s1)
        num, den = sums.sum(0)
        print(f"{d}: pooled weight {num / den:+.3f} -> blend {blend.fit(sums, 1)[0]:.2f}; "
              f"per validation track (unclipped): {per}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
