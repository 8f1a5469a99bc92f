"""Train and run the authors' eDICE (TensorFlow, alex-hh/eDICE) on an exported matrix.

Run by :func:`benchmarks.reference.run_reference` with the reference's own Python (it needs
TensorFlow 2.15 and numpy < 2, so it cannot share edice-dist's environment)::

    REF_PYTHON benchmarks/_reference_driver.py --reference /path/to/eDICE \\
        --input in.npz --settings settings.json --out preds.npz --timings timings.json

This file imports nothing from edice-dist and nothing outside the standard library, numpy
and the reference checkout (put on ``sys.path`` from ``--reference``). It uses the
authors' own functions as their ``scripts/train_eDICE.py`` does:

- the model from ``edice.models.model_utils.load_model`` (``CellAssayCrossFactoriser``,
  compiled with Keras' Adam and the "mse" loss);
- training batches from their ``TrainInMemGenerator`` (all bins in memory, permuted at
  construction and after every epoch; per bin a uniform random ``n_targets``-subset of the
  tracks as targets and the rest as supports), fed to ``model.fit`` as their
  ``dataset_fit`` does (Keras' default ``shuffle=True`` also shuffles the batch order);
- the weights of the last epoch, as their script predicts with (its ``ModelCheckpoint``
  saves the best epoch to disk but the model in memory is never reloaded);
- predictions from batches built like their ``ValInMemGenerator`` (every input track as a
  support at every bin, the same targets at every bin), through ``model.predict``.

Their script also evaluates a validation split after every epoch; nothing here needs it
(the last epoch is kept either way), so it is skipped and the epoch times are training only.

Input ``--input`` (npz): ``x`` (n_bins, T) float32 arcsinh values, ``cell_ids``,
``assay_ids`` (T,), ``target_cell_ids``, ``target_assay_ids`` (K,), ``n_cells``,
``n_assays``. Output ``--out`` (npz): ``predictions`` (K, n_bins) float32 in arcsinh space.
``--timings`` (JSON): wall-clock stamps (``time.time()``, comparable with the parent's)
and per-epoch and prediction rates; see :func:`main`.
"""

from __future__ import annotations

# Before any other import: the parent measures start-up from its own launch stamp, and this
# tells how much of it was the interpreter starting.
import time

T_START = time.time()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402


def _cpu_self() -> float:
    """CPU seconds of this process so far, all threads (TensorFlow's included)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reference", required=True, help="checkout of alex-hh/eDICE")
    p.add_argument("--input", required=True)
    p.add_argument("--settings", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--timings", required=True)
    return p.parse_args()


def main() -> None:
    """Train, predict, write predictions and timings.

    Timings JSON keys: ``t_start`` (interpreter up), ``t_imported`` (TensorFlow and the
    reference imported), ``t_data`` (matrix loaded), ``t_model`` (model built),
    ``t_generator`` (training generator made: its first permutation copies the matrix),
    ``t_first_step_begin`` / ``t_first_step_end`` (first training batch; the end includes
    tracing the training step), ``t_train_end`` and ``cpu_train_end_s`` (this process's
    CPU seconds from its start to the end of training); ``epochs`` (one dict per epoch: seconds,
    bins, bins_per_s, cpu_s, bins_per_cpu_s, loss, first_step_s); ``predict`` (seconds,
    cpu_s, target_bins, target_bins_per_s, warmup_s); ``n_parameters``, ``threads``,
    versions; ``t_end``, ``cpu_total_s``.
    """
    args = _parse()
    with open(args.settings) as f:
        s = json.load(f)
    timings: dict = {"t_start": T_START}

    import numpy as np
    import tensorflow as tf

    threads = s.get("threads")
    if threads:
        # Must precede the first TensorFlow op. By default TensorFlow picks its own pools
        # (all cores), which is what a user of the reference code gets.
        tf.config.threading.set_intra_op_parallelism_threads(int(threads))
        tf.config.threading.set_inter_op_parallelism_threads(int(threads))

    sys.path.insert(0, os.path.abspath(args.reference))
    from edice.data_loaders.data_generators import TrainInMemGenerator, ValInMemGenerator
    from edice.models.model_utils import load_model

    # The authors' script seeds numpy only (np.random.seed(args.seed)); Python's random
    # (Keras' batch-order shuffle of a Sequence) and TensorFlow's (initialisers, dropout)
    # are left unseeded there. We seed all three so that a run can be repeated.
    seed = int(s.get("seed", 0))
    np.random.seed(seed)
    random.seed(seed)
    tf.random.set_seed(seed)
    timings["t_imported"] = time.time()

    data = np.load(args.input)
    x = np.ascontiguousarray(data["x"], dtype=np.float32)
    cell_ids = data["cell_ids"].astype(np.int64)
    assay_ids = data["assay_ids"].astype(np.int64)
    tgt_cells = data["target_cell_ids"].astype(np.int64)
    tgt_assays = data["target_assay_ids"].astype(np.int64)
    n_cells, n_assays = int(data["n_cells"]), int(data["n_assays"])
    n_bins, n_tracks = x.shape
    timings["t_data"] = time.time()

    # The names train_eDICE.py's argparse gives load_model. transformation=None: the
    # exported values are already arcsinh(-log10 p) (the store's space).
    config = argparse.Namespace(
        embed_dim=int(s["embed_dim"]),
        decoder_layers=int(s["decoder_layers"]),
        decoder_hidden=int(s["decoder_hidden"]),
        decoder_dropout=float(s["decoder_dropout"]),
        transformation=None,
        n_attn_layers=1,
        n_attn_heads=int(s["n_heads"]),
        intermediate_fc_dim=int(s["ffn_dim"]),
        lr=float(s["lr"]),
        test_run=False,
        transformer_dropout=float(s["attn_dropout"]),
    )
    model = load_model(n_cells, n_assays, config, compile_model=True)
    timings["t_model"] = time.time()

    batch = int(s["batch_size"])
    n_targets = int(s["n_targets"])
    gen = TrainInMemGenerator(x, cell_ids, assay_ids, transform=None, shuffle=True,
                              batch_size=batch, n_targets=n_targets)
    timings["t_generator"] = time.time()
    steps = len(gen)
    bins_per_epoch = s.get("bins_per_epoch")
    steps_per_epoch = None
    if bins_per_epoch:
        # Keras restarts a Sequence every epoch (and the generator re-permutes its bins),
        # so each epoch takes the first `steps_per_epoch` batches of a fresh permutation.
        steps_per_epoch = max(1, min(steps, int(bins_per_epoch) // batch))
        steps = steps_per_epoch
    epoch_bins = n_bins if steps == len(gen) else steps * batch

    epochs: list[dict] = []

    class Timer(tf.keras.callbacks.Callback):
        """Wall and CPU seconds of each epoch (training only: no validation runs)."""

        def on_epoch_begin(self, epoch, logs=None):
            self.t0, self.c0 = time.perf_counter(), _cpu_self()
            self.first = None

        def on_train_batch_begin(self, b, logs=None):
            if "t_first_step_begin" not in timings:
                timings["t_first_step_begin"] = time.time()
            if b == 0:
                self.tb = time.perf_counter()

        def on_train_batch_end(self, b, logs=None):
            if "t_first_step_end" not in timings:
                timings["t_first_step_end"] = time.time()
            if b == 0:
                self.first = time.perf_counter() - self.tb

        def on_epoch_end(self, epoch, logs=None):
            dt, dc = time.perf_counter() - self.t0, _cpu_self() - self.c0
            epochs.append({"epoch": epoch + 1, "seconds": dt, "bins": epoch_bins,
                           "bins_per_s": epoch_bins / dt, "cpu_s": dc,
                           "bins_per_cpu_s": epoch_bins / max(dc, 1e-9),
                           "loss": float((logs or {}).get("loss", float("nan"))),
                           "first_step_s": self.first})

    model.fit(gen, epochs=int(s["epochs"]), steps_per_epoch=steps_per_epoch, verbose=2,
              callbacks=[Timer()])
    timings["t_train_end"] = time.time()
    timings["cpu_train_end_s"] = _cpu_self()
    timings["epochs"] = epochs

    # Prediction: every input track is a support at every bin (their dataset_predict uses
    # the training split as supports). `targets` is only the generator's y, never used by
    # predict: a broadcast zero view costs no memory.
    pbatch = int(s.get("predict_batch", 256))
    dummy = np.broadcast_to(np.zeros((1, len(tgt_cells)), np.float32), (n_bins, len(tgt_cells)))

    def val_gen(n: int) -> ValInMemGenerator:
        return ValInMemGenerator(x[:n], cell_ids, assay_ids, dummy[:n], tgt_cells, tgt_assays,
                                 transform=None, batch_size=pbatch)

    # Warm-up over one full and one partial batch: traces predict_function for both batch
    # shapes, so that the timed pass is compute only.
    t = time.perf_counter()
    model.predict(val_gen(min(n_bins, pbatch + pbatch // 2)), verbose=0)
    warm = time.perf_counter() - t
    t, c = time.perf_counter(), _cpu_self()
    preds = model.predict(val_gen(n_bins), verbose=0)  # (n_bins, K)
    dt, dc = time.perf_counter() - t, _cpu_self() - c
    tb = n_bins * len(tgt_cells)
    timings["predict"] = {"seconds": dt, "cpu_s": dc, "target_bins": tb,
                          "target_bins_per_s": tb / dt, "target_bins_per_cpu_s": tb / max(dc, 1e-9),
                          "warmup_s": warm, "batch": pbatch}
    np.savez(args.out, predictions=np.ascontiguousarray(np.asarray(preds, np.float32).T))

    timings.update({
        "n_parameters": int(model.count_params()),
        "n_bins": n_bins, "n_tracks": n_tracks, "n_targets_per_bin": n_targets,
        "steps_per_epoch": steps,
        "threads": {"intra_op": tf.config.threading.get_intra_op_parallelism_threads(),
                    "inter_op": tf.config.threading.get_inter_op_parallelism_threads(),
                    "cpu_count": os.cpu_count()},
        "versions": {"tensorflow": tf.__version__, "numpy": np.__version__,
                     "python": sys.version.split()[0]},
        "t_end": time.time(),
        "cpu_total_s": _cpu_self(),
    })
    with open(args.timings, "w") as f:
        json.dump(timings, f, indent=1)


if __name__ == "__main__":
    main()
