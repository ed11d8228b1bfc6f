"""mad-search: find out, cheaply and honestly, which hybrid layer sequence is worth scaling.

Public pieces: :mod:`mad_search.spec` (layer-sequence grammar), :mod:`mad_search.tasks` (MAD
tasks, MQAR, text), :mod:`mad_search.model`, :mod:`mad_search.train`; ``python -m mad_search`` is
the Hydra entry point.
"""

import os as _os

# No code path of ours may reach the network for data or models.
_os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
_os.environ.setdefault("HF_HUB_OFFLINE", "1")

__version__ = "0.1.0"
