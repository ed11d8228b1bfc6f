"""mad-search: find out, cheaply and honestly, which hybrid layer sequence is worth scaling.

Public pieces: :mod:`mad_search.spec` (layer-sequence grammar), :mod:`mad_search.tasks` (MAD
tasks, MQAR, text), :mod:`mad_search.model`, :mod:`mad_search.train`; ``python -m mad_search`` is
the Hydra entry point.
"""

import os as _os

# No code path of ours may reach the network for data or models.
_os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
_os.environ.setdefault("HF_HUB_OFFLINE", "1")

OPENMP_SPIN_COUNT = "10000"  # GOMP_SPINCOUNT unless the user set it or OMP_WAIT_POLICY


def _short_openmp_spin() -> None:
    """After each parallel region, torch's OpenMP threads (GNU libgomp on Linux) spin-wait for
    about 300,000 pauses, several milliseconds, before they sleep. The native kernels
    (``blocks.native``) run on threads of their own meanwhile, and on a 2-core machine a
    spinning OpenMP thread takes a core from them: at two torch threads the mLSTM block ran
    1.2-1.3x slower for it (README, "Native kernels"). 10,000 pauses (well under a millisecond)
    still bridge the gap between back-to-back torch operators. libgomp reads this once, when
    torch loads it, so it must be set before the first ``import torch``; a user's own
    GOMP_SPINCOUNT or OMP_WAIT_POLICY is kept."""
    if "GOMP_SPINCOUNT" not in _os.environ and "OMP_WAIT_POLICY" not in _os.environ:
        _os.environ["GOMP_SPINCOUNT"] = OPENMP_SPIN_COUNT


_short_openmp_spin()

__version__ = "0.1.0"
