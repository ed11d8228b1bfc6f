"""Single-thread GFLOP/s of the matrix products in a ``mamba*4`` training step at selective
copying's size (d_model 64, batch 64, 256 positions: 16,384 rows; d_inner 128, dt_rank 4,
d_state 16): ``python bench_results/speed_2026-12-06c/mm_shapes.py``. The K = 4 products
(``dt_proj`` and its weight gradient) run far below the others."""

import time

import torch

ROWS = 16384
SHAPES = [  # (m, k, n) of an (m x k) @ (k x n) product
    (ROWS, 64, 256), (ROWS, 128, 36), (ROWS, 4, 128), (ROWS, 128, 64), (ROWS, 256, 64),
    (256, ROWS, 64), (64, ROWS, 128), (36, ROWS, 128), (128, ROWS, 4), (ROWS, 36, 128),
]


def timed(a: torch.Tensor, b: torch.Tensor, repeats: int = 20) -> float:
    """Seconds per ``a @ b``, after three untimed calls."""
    for _ in range(3):
        a @ b
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return (time.perf_counter() - t0) / repeats


torch.set_num_threads(1)
for m, k, n in SHAPES:
    dt = timed(torch.randn(m, k), torch.randn(k, n))
    gflops = 2 * m * k * n / dt / 1e9
    print(f"{m:>6} x {k:<6} @ {k:>6} x {n:<4}: {dt * 1e3:6.2f} ms {gflops:5.1f} GFLOP/s")
