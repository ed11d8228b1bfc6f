"""MLX twins of the built-in blocks (``blocks.build(name, ..., backend="mlx")``).

Importing this package registers every twin module in it under its torch block's name; it needs
the ``mlx`` extra (``pip install 'mad-search[mlx]'``; on Linux that is ``mlx[cpu]``). The twin
contract is in :mod:`blocks.mlx.base`.
"""

import importlib as _importlib
import pkgutil as _pkgutil

from blocks.mlx import blas as _blas

_blas.load()  # before MLX itself: a fast BLAS on Linux (see blocks.mlx.blas)

import mlx.core  # noqa: E402, F401  (fail here, with ImportError, when the extra is missing)

_NOT_BLOCKS = {"base", "ops", "blas"}
for _info in sorted(_pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if _info.name not in _NOT_BLOCKS and not _info.name.startswith("_"):
        _importlib.import_module(f"blocks.mlx.{_info.name}")
