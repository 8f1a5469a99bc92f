"""One unit of a personalised-imputation workflow (:mod:`edice_dist.personal`), as a Ray
task runs it: train one model, or evaluate one fold.

Model units train in the task's own process (:func:`edice_dist.train.train` /
:func:`~edice_dist.train.finetune` with ``in_process``) on a
:class:`~edice_dist.trackplan.TrackSelection` that leaves the fold's hidden tracks out, so
they are never read; each model folder records the columns its worker read
(``model.json`` ``data``).

An evaluate unit predicts the hidden tracks genome-wide, chunk by chunk, with each of the
fold's models from every observed track that is not hidden (``evaluation/pred``, arcsinh,
clipped at 0 as exported bigWigs are); then, per hidden track and method (the models,
AVG and TrackAVG over tracks that are not hidden), the metrics of
:func:`edice_dist.metrics.track_metrics` against the observed track itself, with the
person-specific peak bins (:mod:`edice_dist.personpeaks`) as the positives of
``auprc_person``. The unit writes ``record.json`` (hidden tracks, the supports of each
model's predictions, each model's own record of its data), ``metrics.json`` and a browser
panel per hidden track around its strongest person-specific peak.
"""

from __future__ import annotations

import datetime as _dt
import itertools
import json
import operator
from dataclasses import dataclass

import numpy as np

from . import storage
from .errors import EdiceError, InputError
from .metrics import PEAK_PVAL, track_metrics
from .personpeaks import BedMasks, min_bins, person_specific, runs

SUPPORT_SPLITS = ("train", "val")
KINDS = ("finetuned", "others", "alldonors")
"""The models of a fold, in the order tables list them (:mod:`edice_dist.personal`)."""
DONE = "_done"
_PEAK_VALUE = float(np.arcsinh(PEAK_PVAL))  # called peaks, in the store's arcsinh values


@dataclass(frozen=True)
class Unit:
    """One unit of work.

    Attributes
    ----------
    id : ``<donor>/others``, ``<donor>/<fold>/<kind>`` or ``<donor>/<fold>/evaluate``;
        also its folder under OUT (``evaluation`` for an evaluate unit).
    kind : ``others``, ``finetuned``, ``alldonors`` or ``evaluate``.
    donor, fold : the target donor and the fold's name (``""`` for ``others``).
    hidden : track ids hidden in the fold (never seen by its models).
    needs : ids of the units that must be done first.
    """

    id: str
    kind: str
    donor: str
    fold: str
    hidden: tuple[str, ...]
    needs: tuple[str, ...] = ()

    @property
    def folder(self) -> str:
        return self.id.replace("/evaluate", "/evaluation")


def marker(out: str, unit: Unit) -> str:
    """The unit's done marker, written after its result: ``OUT/_done/<unit id>``."""
    return storage.child(out, DONE, *unit.id.split("/"), what=f"unit {unit.id}")


@dataclass(frozen=True)
class Spec:
    """What every unit of a run shares (small, picklable).

    Attributes
    ----------
    peaks : track id -> (peak BED, person-specific peak BED), either ``""``, from the
        ``--truth`` table (:func:`read_peak_table`).
    train : the training config as a dict; ``finetune`` the fine-tuning overrides.
    threads, use_gpu : each model unit's torch threads and device.
    plots : draw a browser panel of every hidden track.
    """

    workflow: str
    store: str
    out: str
    train: dict
    finetune: dict
    peaks: dict
    threads: int
    use_gpu: bool
    faults: dict
    plots: bool = True


def read_peak_table(path: str, st) -> dict[str, tuple[str, str]]:
    """The ``--truth`` table (:func:`edice_dist.truth.read_truth`) as track id -> (peaks,
    person_peaks) paths, for the store's tracks."""
    from .truth import read_truth

    ids = set(st.track_ids())
    return {t.track_id: (t.peaks, t.person_peaks) for t in read_truth(path)
            if t.track_id in ids}


def run_unit_safe(spec: Spec, unit) -> tuple[str, object]:
    """:func:`run_unit` for a Ray task: errors come back as values, ours as ``input``."""
    try:
        return "ok", run_unit(spec, unit)
    except EdiceError as e:
        return "input", str(e)
    except Exception as e:  # noqa: BLE001 - unexpected: keep the type in the message
        return "error", f"{type(e).__name__}: {e}"


def run_unit(spec: Spec, unit: Unit) -> dict:
    """Train one model or evaluate one fold, then write the unit's done marker."""
    from .store import open_store

    if spec.faults.get("personal_log"):
        with open(spec.faults["personal_log"], "a") as f:
            f.write(unit.id + "\n")
    if spec.faults.get("personal_fail_unit") == unit.id:
        raise EdiceError(f"test fault: unit {unit.id} fails")
    st = open_store(spec.store)
    folder = storage.child(spec.out, *unit.folder.split("/"), what=f"unit {unit.id}")
    if unit.kind == "evaluate":
        result = evaluate_fold(spec, unit, st, folder)
    else:
        result = train_model(spec, unit, st, folder)
    storage.write_text_atomic(marker(spec.out, unit), json.dumps({
        "unit": unit.id, "done": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "needs": list(unit.needs), "result": result}, default=str) + "\n")
    return result


# ----------------------------------------------------------------------------- models


def selection(st, unit):
    """The tracks the unit's model may read: every observed track but the hidden ones (for
    ``others``, but the donor's), the donor's remaining ones as the only targets of
    ``finetuned``."""
    from .trackplan import TrackSelection

    obs = [t for t in st.tracks if t.split in SUPPORT_SPLITS]
    if unit.kind == "others":
        return TrackSelection(tuple(t.track_id for t in obs if t.individual != unit.donor))
    inputs = tuple(t.track_id for t in obs if t.track_id not in set(unit.hidden))
    if unit.kind == "alldonors":
        return TrackSelection(inputs)
    return TrackSelection(inputs, tuple(t.track_id for t in obs if t.individual == unit.donor
                                        and t.track_id not in set(unit.hidden)))


def model_dir(out: str, donor: str, fold: str, kind: str) -> str:
    parts = [donor, kind] if kind == "others" else [donor, fold, kind]
    return storage.child(out, *parts, what=f"{kind} model of {donor}")


def train_model(spec: Spec, unit, st, folder: str) -> dict:
    from .train import finetune, train
    from .trainconfig import ARCH_KEYS, TrainConfig

    run = {"cpus_per_worker": spec.threads, "use_gpu": spec.use_gpu, "workers": None}
    sel = selection(st, unit)
    if unit.kind == "finetuned":
        keep = {k: v for k, v in spec.train.items()
                if k not in ARCH_KEYS and k not in ("lr", "epochs", "patience")}
        base = model_dir(spec.out, unit.donor, "", "others")
        res = finetune(base, spec.store, folder, overrides={**keep, **spec.finetune, **run},
                       tracks=sel, in_process=True)
    else:
        cfg = TrainConfig(**{**spec.train, **run}).validate()
        res = train(spec.store, folder, cfg, tracks=sel, in_process=True)
    return {k: res.get(k) for k in ("best_epoch", "best_val_mse", "epochs_run")}


# ----------------------------------------------------------------------------- predictions


class _Predictor:
    """A fold's model, its vocabulary grown to the cells it must read or impute (rows of a
    new cell start at the same cell type's trained rows), on the unit's device."""

    def __init__(self, path: str, st, supports: list[int], targets: list[int], device):
        from . import predict
        from .checkpoint import load_model
        from .model import extend_vocab
        from .trackplan import like_rows
        from .tracks import individuals_of

        model, meta = load_model(path)
        cells, assays = list(meta["cell_keys"]), list(meta["assays"])
        new = sorted({st.tracks[i].cell_key for i in supports + targets} - set(cells))
        if new:
            like = like_rows(meta.get("trained_cell_keys", cells), cells, new)
            model = extend_vocab(model, len(cells) + len(new), len(assays), like=like,
                                 individuals=individuals_of(new))
            cells += new
        trained = set(meta.get("trained_assays", assays))
        ci = {c: i for i, c in enumerate(cells)}
        ai = {a: i for i, a in enumerate(assays)}
        self.meta, self.context = meta, tuple(model.cfg.context)
        self.supports = [i for i in supports if st.tracks[i].assay in trained]
        self.ok = np.array([st.tracks[i].assay in trained for i in targets])
        self.cells = np.array([ci[st.tracks[i].cell_key] for i in supports])
        self.assays = np.array([ai.get(st.tracks[i].assay, -1) for i in supports])
        self.t_cells = np.array([ci[st.tracks[i].cell_key] for i in targets])[self.ok]
        self.t_assays = np.array([ai[st.tracks[i].assay] for i, ok in zip(targets, self.ok,
                                                                          strict=True) if ok])
        kept = set(self.supports)
        self.use = np.array([i in kept for i in supports])
        dtype = None if device.type == "cuda" else "float32"  # exact on CPUs
        self.model = predict.prepare(model, device, dtype, compile=False)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """(n_bins, S[, C]) support values -> (K, n_bins) predictions (NaN: untrained assay)."""
        from .predict import predict_chunk

        out = np.full((len(self.ok), x.shape[0]), np.nan, dtype=np.float32)
        if self.ok.any():
            y = predict_chunk(self.model, x, np.flatnonzero(self.use), self.cells, self.assays,
                              self.t_cells, self.t_assays)
            out[self.ok] = np.maximum(y, 0.0)
        return out


def _predict(st, models: dict, supports: list[int], hidden: list[int], path: str, device):
    """Predict the hidden tracks with every model into a Zarr group at ``path``: one array
    per chromosome, (n_bins, n_models * K) float32, column m * K + k."""
    import zarr

    from .context import read_window

    preds = {k: _Predictor(p, st, supports, hidden, device) for k, p in models.items()}
    storage.remove(path)
    root = zarr.open_group(storage.zarr_store(path), mode="w", zarr_format=3)
    width = len(preds) * len(hidden)
    arrays = {c: root.create_array(st.array_key(c), shape=(st.genome.n_bins(c), width),
                                   chunks=(st.chunk_bins, width), dtype="float32",
                                   fill_value=np.nan)
              for c in st.genome.chroms}
    contexts = {p.context for p in preds.values()}
    for ch in st.chunks():
        x = {c: read_window(st, ch.chrom, ch.start, ch.stop, supports, c) for c in contexts}
        block = np.concatenate([p(x[p.context]) for p in preds.values()], axis=0)
        arrays[ch.chrom][ch.start:ch.stop] = block.T
    return {k: {"supports": [st.tracks[i].track_id for i in p.supports],
                "imputable": p.ok.tolist()} for k, p in preds.items()}


# ----------------------------------------------------------------------------- peaks


class Peaks:
    """Per chromosome, the peak bins and the person-specific peak bins of store tracks:
    from the ``--truth`` table's BEDs where it has them, else called from the store's
    values (-log10 p >= 2) and, for person-specific ones, compared with the same cell
    type and assay of the other individuals in the store."""

    def __init__(self, st, table: dict[str, tuple[str, str]]):
        self.st, self.table = st, table
        self.ids = st.track_ids()
        self._beds: dict[str, BedMasks] = {}
        self._cache: dict = {}
        self.shortest = min_bins(bin_size=st.genome.bin_size)

    def _bed(self, path: str) -> BedMasks:
        if path not in self._beds:
            self._beds[path] = BedMasks(path, self.st.genome)
        return self._beds[path]

    def _cached(self, key, make):
        if key not in self._cache:
            if len(self._cache) > 16:  # whole chromosomes' masks: keep a few
                self._cache.clear()
            self._cache[key] = make()
        return self._cache[key]

    def peaks(self, col: int, chrom: str) -> np.ndarray:
        bed = self.table.get(self.ids[col], ("", ""))[0]
        if bed:
            return self._cached(("p", col, chrom), lambda: self._bed(bed).mask(chrom))
        return self._cached(("p", col, chrom), lambda: self.st.read(
            chrom, 0, self.st.genome.n_bins(chrom), [col])[:, 0] >= _PEAK_VALUE)

    def others(self, col: int) -> list[int]:
        t = self.st.tracks[col]
        return [i for i, o in enumerate(self.st.tracks) if o.cell_type == t.cell_type
                and o.assay == t.assay and o.individual and o.individual != t.individual]

    def person(self, col: int, chrom: str) -> np.ndarray | None:
        """Person-specific peak bins of ``chrom``; None when they are undefined (no other
        individual has the track, or the table leaves them out)."""
        tid = self.ids[col]
        if tid in self.table and self.table[tid][0]:
            bed = self.table[tid][1]
            return self._cached(("q", col, chrom), lambda: self._bed(bed).mask(chrom)) \
                if bed else None
        others = self.others(col)
        if not others:
            return None
        return self._cached(("q", col, chrom), lambda: person_specific(
            self.peaks(col, chrom), [self.peaks(o, chrom) for o in others], self.shortest))


# ----------------------------------------------------------------------------- evaluation


def _baselines(st, col: int, donor: str, hidden: set[int]) -> dict[str, list[int]]:
    """AVG and TrackAVG columns of a hidden track: observed, not hidden tracks of the
    same assay in other cells / of the same cell type and assay in other individuals."""
    t = st.tracks[col]
    usable = [i for i, s in enumerate(st.tracks) if s.assay == t.assay
              and s.split in SUPPORT_SPLITS and i not in hidden]
    return {"AVG": [i for i in usable if st.tracks[i].cell_key != t.cell_key],
            "TrackAVG": [i for i in usable if st.tracks[i].cell_type == t.cell_type
                         and st.tracks[i].individual and st.tracks[i].individual != donor]}


def _values(st, arrays, source, chrom: str, a: int, b: int) -> np.ndarray:
    """(b - a,) float32 of a method: a prediction column or a baseline's columns."""
    from .evaluate import baseline_window

    if isinstance(source, int):
        return np.asarray(arrays[chrom][a:b, source], dtype=np.float32)
    return baseline_window(st, chrom, a, b, source, "arcsinh")


def _metrics(st, peaks: Peaks, col: int, arrays, source, best: dict | None) -> dict:
    """:func:`track_metrics` of one hidden track and one method; ``best`` (when given)
    collects the chunk-local person-specific run with the most truth signal."""
    have_person = all(peaks.person(col, c) is not None for c in st.genome.chroms)

    def chunks():
        for ch in st.chunks():
            t = st.read(ch.chrom, ch.start, ch.stop, [col])[:, 0]
            q = peaks.person(col, ch.chrom)[ch.start:ch.stop] if have_person else None
            if best is not None and q is not None:
                for a, b in runs(q):
                    score = float(t[a:b].sum())
                    if score > best.get("score", -1.0):
                        best.update(score=score, chrom=ch.chrom, start=ch.start + a,
                                    stop=ch.start + b)
            yield (t, _values(st, arrays, source, ch.chrom, ch.start, ch.stop),
                   peaks.peaks(col, ch.chrom)[ch.start:ch.stop], q)

    # Every tee copy is consumed in lockstep (or tee would keep the whole genome).
    k = 4 if have_person else 3
    its = [map(operator.itemgetter(i), it) for i, it in enumerate(itertools.tee(chunks(), k))]
    return track_metrics(its[0], its[1], its[2], None, its[3] if have_person else None)


def _panel(st, peaks: Peaks, col: int, arrays, sources: dict, best: dict, path: str,
           title: str) -> str:
    """A browser PNG of the truth and every method around ``best`` (the strongest
    person-specific run; the first chromosome's start without one)."""
    from . import plots

    chrom = best.get("chrom", st.genome.chroms[0])
    nb = st.genome.n_bins(chrom)
    mid = (best.get("start", 0) + best.get("stop", 0)) // 2
    a = max(0, min(mid - plots.BROWSER_BINS // 2, nb - plots.BROWSER_BINS))
    b = min(nb, a + plots.BROWSER_BINS)
    panel = {"truth": st.read(chrom, a, b, [col])[:, 0]}
    panel.update({m: np.nan_to_num(_values(st, arrays, src, chrom, a, b))
                  for m, src in sources.items()})
    q = peaks.person(col, chrom)
    shade = (q if q is not None else peaks.peaks(col, chrom))[a:b]
    return plots.browser(panel, chrom, a, st.genome.bin_size, path, peaks=shade, title=title,
                         ylabel="arcsinh; shaded: person-specific peaks"
                         if q is not None else "arcsinh; shaded: peaks")


def evaluate_fold(spec: Spec, unit, st, folder: str) -> dict:
    """Predict the fold's hidden tracks with its models and score every method."""
    import torch
    import zarr

    from .tables import json_number

    ids = st.track_ids()
    hidden = [ids.index(h) for h in unit.hidden]
    supports = [i for i, t in enumerate(st.tracks)
                if t.split in SUPPORT_SPLITS and i not in set(hidden)]
    planned = [k for k in KINDS if any(n.endswith(f"/{k}") for n in unit.needs)]
    models = {k: model_dir(spec.out, unit.donor, unit.fold, k) for k in planned}
    storage.makedirs(folder)
    device = torch.device("cuda" if torch.cuda.is_available() and spec.use_gpu else "cpu")
    used = _predict(st, models, supports, hidden, storage.join(folder, "pred"), device)
    pred = zarr.open_group(storage.zarr_store(storage.join(folder, "pred")), mode="r")
    arrays = {c: pred[st.array_key(c)] for c in st.genome.chroms}
    peaks = Peaks(st, spec.peaks)
    rows, browsers = [], {}
    for k, col in enumerate(hidden):
        t = st.tracks[col]
        sources = {m: j * len(hidden) + k for j, m in enumerate(models)}
        sources.update({m: cols for m, cols in
                        _baselines(st, col, unit.donor, set(hidden)).items() if cols})
        best: dict = {}
        for m, src in sources.items():
            if m in used and not used[m]["imputable"][k]:
                continue  # the model cannot impute this assay (never trained on it)
            first = not any(r["track_id"] == t.track_id for r in rows)
            res = _scores(st, peaks, col, arrays, src, best if first else None)
            rows.append({"cell_type": t.cell_type, "assay": t.assay, "individual": t.individual,
                         "cell_key": t.cell_key, "track_id": t.track_id, "method": m,
                         "donor": unit.donor, "fold": unit.fold, **res})
        if spec.plots:
            name = f"browser_{t.track_id}.png"
            browsers[t.track_id] = _panel(
                st, peaks, col, arrays, sources, best,
                storage.child(folder, name, what=f"track {t.track_id}"),
                f"{spec.workflow}: {t.track_id} hidden ({unit.fold})")
    record = {"unit": unit.id, "workflow": spec.workflow, "hidden": list(unit.hidden),
              "predictions": used,
              "models": {k: {"folder": p, "data": _model_data(p)} for k, p in models.items()}}
    storage.write_text_atomic(storage.join(folder, "record.json"),
                              json.dumps(record, indent=1) + "\n")
    storage.write_text_atomic(storage.join(folder, "metrics.json"), json.dumps(
        {"unit": unit.id, "rows": [{k: json_number(v) for k, v in r.items()} for r in rows],
         "plots": browsers}, indent=1) + "\n")
    return {"tracks": len(hidden), "rows": len(rows)}


def _scores(st, peaks, col, arrays, src, best) -> dict:
    try:
        return _metrics(st, peaks, col, arrays, src, best)
    except ValueError as e:
        raise InputError(f"Evaluating {st.track_ids()[col]}: {e}.") from None


def _model_data(path: str) -> dict:
    """A model's own record of the columns it read (``model.json`` ``data``), and its
    base model's for a fine-tuned one: what the leakage tests check."""
    meta = json.loads(storage.read_text(storage.join(path, "model.json")))
    out = {"data": meta.get("data")}
    if meta.get("parent_model"):
        out["parent"] = _model_data(meta["parent_model"])
    return out

