"""Hogwild! training (Niu et al. 2011): spawned workers share one sparsely updated embedding table
per task vocabulary in shared memory, each trial keeping its own blocks."""

from mad_search.hogwild.pool import WorkerPool, default_workers
from mad_search.hogwild.table import NonFiniteUpdate, SharedTable, TableEmbedding
from mad_search.hogwild.worker import TrialJob, share_task_data, table_key

__all__ = [
    "NonFiniteUpdate",
    "SharedTable",
    "TableEmbedding",
    "TrialJob",
    "WorkerPool",
    "default_workers",
    "share_task_data",
    "table_key",
]
