"""mad-search's block library: one module per block type, and the registry.

>>> import blocks
>>> blocks.names()                      # every registered block type
>>> blk = blocks.build("mlstm", d_model=128, max_len=256)
"""

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

# Built-in block types register themselves on import.
import importlib as _importlib  # noqa: E402

for _mod in ("attention", "mlstm", "slstm", "swiglu"):
    try:
        _importlib.import_module(f"blocks.{_mod}")
    except ModuleNotFoundError as _exc:  # TEMP while blocks are being written
        if _exc.name != f"blocks.{_mod}":
            raise

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
