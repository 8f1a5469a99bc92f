"""edice-dist: Ray-distributed, genome-scale epigenomic imputation with eDICE."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("edice-dist")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+local"

BIN_SIZE = 25
"""Resolution of every track, in base pairs (SPEC section 3)."""
