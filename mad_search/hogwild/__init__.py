"""Hogwild! training (Niu et al. 2011): spawned workers share one sparsely updated embedding table
per task vocabulary in shared memory, each trial keeping its own blocks.

Names are imported on first use: ``mad_search.hogwild.pool`` starts workers without importing
torch in the starting process.
"""

from importlib import import_module

_NAMES = {
    "NonFiniteUpdate": "table",
    "SharedTable": "table",
    "TableEmbedding": "table",
    "TrialJob": "worker",
    "share_task_data": "worker",
    "table_key": "worker",
    "WorkerPool": "pool",
    "WorkerStartError": "pool",
    "default_workers": "pool",
    "pool_shape": "pool",
}

__all__ = sorted(_NAMES)


def __getattr__(name: str):
    if name in _NAMES:
        return getattr(import_module(f"mad_search.hogwild.{_NAMES[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
