"""Value spaces of signal tracks: ``pval`` (-log10 p, what bigWigs hold by default) and
``arcsinh`` (arcsinh(-log10 p), what the store holds, the model predicts and the paper's
metrics use).

Every conversion between them and every check of a space argument goes through here.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from .errors import InputError

SPACES = ("pval", "arcsinh")
"""The value spaces; the first is the default of bigWig output."""

Space = Literal["pval", "arcsinh"]
"""The type of a space option (what the stage options declare)."""


def check(space: str, what: str = "--space") -> str:
    """Return ``space`` when it is one of :data:`SPACES`.

    Raises
    ------
    InputError
        Naming ``what`` (the option or file column) and the valid spaces.
    """
    if space not in SPACES:
        raise InputError(f"{what} must be one of {', '.join(SPACES)}, got {space!r}.")
    return space


def to_space(values: np.ndarray, space: str, source: str = "arcsinh",
             dtype: type = np.float64) -> np.ndarray:
    """Values in ``source`` space, converted to ``space``.

    The transform runs in float64 and is rounded once to ``dtype``. -log10 p is never
    negative, so arcsinh values below 0 (which the model can predict) become 0 in
    ``pval`` space (SPEC section 3).

    Parameters
    ----------
    values : np.ndarray, any shape
    space, source : one of :data:`SPACES`
    dtype : the result's dtype (float64 is what pyBigWig takes)

    Returns
    -------
    np.ndarray, the shape of ``values``, ``dtype``
    """
    check(space, "space")
    check(source, "source space")
    v = np.asarray(values, dtype=np.float64)
    if source != space:
        v = np.arcsinh(v) if space == "arcsinh" else np.maximum(np.sinh(v), 0.0)
    return v.astype(dtype, copy=False)
