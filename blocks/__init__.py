"""mad-search's block library: one module per block type, and the registry.

>>> import blocks
>>> blocks.names()                      # every registered block type
>>> blk = blocks.build("mlstm", d_model=128, max_len=256)
"""

# Built-in block types register themselves on import: every module in this package except the
# infrastructure ones below is a block module (adding a block type is adding one file).
import importlib as _importlib  # noqa: E402
import pkgutil as _pkgutil  # noqa: E402

# before torch loads (blocks.base imports it): mad_search's package init shortens the OpenMP
# threads' spin-wait, so they leave the cores to the native kernels' threads
# (mad_search._short_openmp_spin)
import mad_search as _mad_search  # noqa: F401
from blocks.base import Block
from blocks.registry import (
    ENTRY_POINT_GROUP,
    BlockError,
    build,
    get,
    load_entry_points,
    load_module,
    names,
    register,
)

_NOT_BLOCKS = {"base", "registry", "init", "mlx", "contract"}
for _info in sorted(_pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if _info.name not in _NOT_BLOCKS and not _info.name.startswith("_"):
        _importlib.import_module(f"blocks.{_info.name}")

__all__ = [
    "Block",
    "BlockError",
    "ENTRY_POINT_GROUP",
    "build",
    "get",
    "load_entry_points",
    "load_module",
    "names",
    "register",
]
