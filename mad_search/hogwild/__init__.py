"""Hogwild! training (Niu et al. 2011): spawned workers share one sparsely updated embedding table
per task vocabulary in shared memory, each trial keeping its own blocks.

:mod:`~mad_search.hogwild.table` holds the table, :mod:`~mad_search.hogwild.pool` the worker
processes, :mod:`~mad_search.hogwild.worker` what a worker does, and
:mod:`~mad_search.hogwild.messages` what they say to the coordinator.
"""

from mad_search.hogwild.messages import TrialJob
from mad_search.hogwild.pool import WorkerPool, WorkerStartError
from mad_search.hogwild.table import NonFiniteUpdate, SharedTable, TableEmbedding
from mad_search.hogwild.worker import share_task_data, table_key

__all__ = [
    "NonFiniteUpdate",
    "SharedTable",
    "TableEmbedding",
    "TrialJob",
    "WorkerPool",
    "WorkerStartError",
    "share_task_data",
    "table_key",
]
