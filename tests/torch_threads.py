"""``with torch_threads(n):`` runs its body with ``n`` torch threads and restores the count after
(the native kernels split their work over one slice per torch thread)."""

import contextlib

import torch


@contextlib.contextmanager
def torch_threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
