"""Which tracks of a store a training run uses: training inputs, training targets and
validation tracks (SPEC 2.5), the vocabulary of a run on a selection of tracks, and the
rows that new embedding rows start from when fine-tuning.

:func:`plan_tracks` decides the columns; :class:`TrackSelection` restricts them to some
tracks (a workflow that must never show a model some tracks, :mod:`edice_dist.personal`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import checkpoint
from .errors import InputError
from .sampler import effective_n_targets
from .store import TrackStore
from .tracks import split_cell_key
from .trainconfig import TrainConfig


@dataclass
class TrackPlan:
    """Store columns used by a run.

    Attributes
    ----------
    inputs : training tracks: supports and targets in training, supports in validation.
    val : validation targets (the ``val`` split, or a seeded share of the training tracks).
    val_source : "split" or "holdout".
    n_targets : targets per training bin after the cap.
    targets : the inputs that may be training targets (all of them unless a
        :class:`TrackSelection` names fewer); the others are supports only.
    """

    inputs: list[int]
    val: list[int]
    val_source: str
    n_targets: int
    targets: list[int] | None = None

    @property
    def target_cols(self) -> list[int]:
        return self.inputs if self.targets is None else self.targets


@dataclass(frozen=True)
class TrackSelection:
    """The store tracks a run may use, by track id, when not all of them: how a workflow
    trains a model that never sees some tracks (:mod:`edice_dist.personal`).

    Attributes
    ----------
    inputs : tracks that may be supports or targets (others of the store are never read).
    targets : the subset of ``inputs`` that may be training or validation targets (all of
        ``inputs`` when None); the rest are supports only.
    """

    inputs: tuple[str, ...]
    targets: tuple[str, ...] | None = None

    def to_dict(self) -> dict:
        return {"inputs": sorted(self.inputs),
                "targets": None if self.targets is None else sorted(self.targets)}


def holdout_tracks(st: TrackStore, train_cols: list[int], fraction: float, seed: int) -> list[int]:
    """Training tracks held out for validation when the manifest names none: from every
    assay with at least 3 training tracks, ``fraction`` of them (at least one), spread over
    as many cell types as possible.

    One validation track per assay makes the validation MSE an average over every kind of
    mark rather than over a few random tracks, which made the choice of epoch noisy; an
    assay with fewer tracks keeps them all for training. A store where no assay has 3
    tracks holds out ``fraction`` of all tracks (at least one) at random.

    Returns
    -------
    list of int, sorted store columns.
    """
    rng = np.random.default_rng([seed, 0x5EED])
    by_assay: dict[str, list[int]] = {}
    for c in train_cols:
        by_assay.setdefault(st.tracks[c].assay, []).append(c)
    eligible = sorted(a for a, cols in by_assay.items() if len(cols) >= 3)
    if not eligible:
        n_hold = max(1, int(round(fraction * len(train_cols))))
        return sorted(int(i) for i in rng.choice(train_cols, size=n_hold, replace=False))
    held: list[int] = []
    used: dict[str, int] = {}
    for a in rng.permutation(eligible):
        cols = by_assay[str(a)]
        for _ in range(max(1, int(round(fraction * len(cols))))):
            left = [c for c in cols if c not in held]
            fewest = min(used.get(st.tracks[c].cell_key, 0) for c in left)
            pick = int(rng.choice([c for c in left if used.get(st.tracks[c].cell_key, 0) == fewest]))
            held.append(pick)
            used[st.tracks[pick].cell_key] = used.get(st.tracks[pick].cell_key, 0) + 1
    return sorted(held)


def plan_tracks(st: TrackStore, cfg: TrainConfig,
                selection: TrackSelection | None = None) -> TrackPlan:
    """Training and validation columns of ``st`` (SPEC 2.5; test tracks are never used).

    With a ``selection``, only its inputs are used, and validation tracks (held out when
    the store has no ``val`` split) come from its targets.

    Raises
    ------
    InputError
        No training tracks, or too few to hold some out and still mask.
    """
    train_cols = [int(i) for i in st.split_indices("train")]
    val_cols = [int(i) for i in st.split_indices("val")]
    targetable = None
    if selection is not None:
        ids = st.track_ids()
        unknown = sorted(set(selection.inputs) - set(ids))
        if unknown:
            raise InputError(f"Store {st.path} has no track {', '.join(unknown[:5])}.")
        allowed = set(selection.inputs)
        train_cols = [c for c in train_cols if ids[c] in allowed]
        if selection.targets is not None:
            targetable = {c for c in train_cols if ids[c] in set(selection.targets)}
        val_cols = [c for c in val_cols if ids[c] in allowed
                    and (targetable is None or ids[c] in set(selection.targets))]
    if not train_cols:
        raise InputError(
            f"Store {st.path} has no training tracks (its {st.n_tracks} tracks are all "
            "val/test). Mark observed tracks with split 'train' in the manifest and re-ingest."
        )
    source = "split"
    if not val_cols:
        pool = train_cols if targetable is None else sorted(targetable)
        held = holdout_tracks(st, pool, cfg.val_fraction, cfg.seed) if pool else []
        if len(train_cols) - len(held) < 2 or not held:
            raise InputError(
                f"Store {st.path} has {len(train_cols)} training track(s) and no val split: "
                f"holding {len(held)} out for validation leaves too few to mask (at least 2 "
                "are needed: a support and a target). Add tracks, or mark some as split "
                "'val' in the manifest."
            )
        train_cols = [c for c in train_cols if c not in set(held)]
        val_cols, source = held, "holdout"
    if len(train_cols) < 2:
        raise InputError(
            f"Store {st.path} has {len(train_cols)} training track: too few to mask (training "
            "needs at least 2, one support and one target per bin). Add training tracks."
        )
    targets = None
    if targetable is not None:
        targets = [c for c in train_cols if c in targetable]
        if not targets:
            raise InputError(f"Store {st.path}: no training track is left to be a target "
                             "once validation tracks are held out. Select more tracks.")
    if targets is None:
        k = effective_n_targets(cfg.n_targets, len(train_cols), cfg.max_target_fraction)
    else:  # the cap applies to the tracks that may be targets; all others stay supports
        k = max(1, min(cfg.n_targets, int(np.floor(cfg.max_target_fraction * len(targets)))))
        k = min(k, len(targets), len(train_cols) - 1)
    return TrackPlan(train_cols, val_cols, source, k, targets)


def selected_vocab(st: TrackStore, plan: TrackPlan) -> tuple[list[str], list[str]]:
    """The sorted cell keys and assays of a plan's tracks: the vocabulary of a model
    trained on a :class:`TrackSelection` (names it never sees get no embedding row; a
    model that imputes them adds one, :func:`edice_dist.model.extend_vocab`)."""
    cols = plan.inputs + plan.val
    return (sorted({st.tracks[c].cell_key for c in cols}),
            sorted({st.tracks[c].assay for c in cols}))


def trained_vocab(st: TrackStore, plan: TrackPlan, cells: list[str], assays: list[str],
                   base_model: str | None) -> tuple[list[str], list[str]]:
    """The cell keys and assays of the vocabulary whose embeddings training updates: those
    of the training tracks (and, when fine-tuning, those the base model was trained on).
    A name with only val/test tracks keeps its random initial embedding; impute refuses
    it as a target (:func:`edice_dist.impute.resolve_targets`)."""
    tc = {st.tracks[i].cell_key for i in plan.inputs}
    ta = {st.tracks[i].assay for i in plan.inputs}
    if base_model:
        base = checkpoint.load_meta(base_model)
        tc |= set(base.get("trained_cell_keys", base["cell_keys"]))
        ta |= set(base.get("trained_assays", base["assays"]))
    return [c for c in cells if c in tc], [a for a in assays if a in ta]


def vocab_index(st: TrackStore, cells: list[str], assays: list[str]) -> tuple[list, list]:
    """Per store column, its vocabulary indices; -1 for a track outside the vocabulary
    (one a :class:`TrackSelection` leaves out: it is never read)."""
    ci = {c: i for i, c in enumerate(cells)}
    ai = {a: i for i, a in enumerate(assays)}
    return ([ci.get(t.cell_key, -1) for t in st.tracks],
            [ai.get(t.assay, -1) for t in st.tracks])


def like_rows(trained: list[str], cells: list[str], new: list[str]) -> list[list[int]]:
    """For each new cell key, the rows of ``cells`` (a model's vocabulary) its embedding
    starts from: the trained keys of the same cell type (other individuals), or [] (the
    mean of all rows) when there are none."""
    ok = set(trained)
    out = []
    for key in new:
        ct = split_cell_key(key)[0]
        out.append([i for i, c in enumerate(cells) if c in ok and split_cell_key(c)[0] == ct])
    return out
