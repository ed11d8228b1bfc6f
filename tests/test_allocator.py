"""mad_search.allocator: freed large blocks are reused (no fresh page faults), and the opt-out."""

import os
import subprocess
import sys

import pytest

# In a fresh interpreter: allocate, touch and free a 64 MiB tensor 40 times, and count the minor
# page faults of the last 10 (fresh pages fault once each: 16,384 per tensor). glibc's heap takes
# a few rounds to settle (torch's aligned allocations leave the freed block a little short of the
# next request at first), then reuses the same memory.
_PROBE = """
import resource, sys
import torch
from mad_search.allocator import keep_freed_memory
tuned = keep_freed_memory()
n = 16 * 2**20 + int(sys.argv[1])  # floats; a size no earlier allocation had
faults = []
for _ in range(40):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    a = torch.ones(n)
    del a
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(int(tuned), sum(faults[-10:]))
"""


def _probe(env_value):
    env = dict(os.environ)
    env.pop("MAD_SEARCH_MALLOC", None)
    if env_value is not None:
        env["MAD_SEARCH_MALLOC"] = env_value
    extra = str(int.from_bytes(os.urandom(2), "little"))
    out = subprocess.run([sys.executable, "-c", _PROBE, extra], env=env, capture_output=True,
                         text=True, check=True).stdout.split()
    return bool(int(out[0])), int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_large_tensor_is_reused_without_page_faults():
    tuned, faults = _probe(None)
    assert tuned
    assert faults < 2000  # ten tensors of 16,384 pages each: reused, not faulted in again


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_system_setting_keeps_glibc_defaults():
    tuned, faults = _probe("system")
    assert not tuned
    assert faults > 100_000  # mmapped afresh each time: every page faults again
