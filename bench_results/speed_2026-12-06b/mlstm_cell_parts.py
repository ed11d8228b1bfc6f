"""The row kernel's parts alone at d_model 128's sizes (batch 16, 256 steps, 4 heads of 64):
the gates' products, the cell's forward and its backward, on one thread and on two, alternated
(median ms): ``python bench_results/speed_2026-12-06b/mlstm_cell_parts.py`` from the
repository root."""

import sys
import time

import torch

sys.path.insert(0, ".")
from blocks import mlstm  # noqa: E402
from mad_search.allocator import keep_freed_memory  # noqa: E402

keep_freed_memory()
B, S, I, NH = 16, 256, 256, 4
q, k, v = (torch.randn(B, S, I) for _ in range(3))
W = torch.randn(2 * NH, 3 * I) * 0.01
bias = torch.randn(2 * NH)


def median_ms(f, n=30):
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t0)
    return sorted(ts)[n // 2] * 1e3


g = mlstm.mlstm_gates(q, k, v, W, bias)
i_pre, f_pre = g[..., :NH].transpose(1, 2), g[..., NH:].transpose(1, 2)
qh, kh, vh = (t.view(B, S, NH, I // NH).transpose(1, 2) for t in (q, k, v))
h, saved = mlstm._rows_forward(qh, kh, vh, i_pre, f_pre, 1e-6)
dh = torch.randn_like(h)
for th in (1, 2, 1, 2):
    torch.set_num_threads(th)
    tg = median_ms(lambda: mlstm.mlstm_gates(q, k, v, W, bias))
    tc = median_ms(lambda: mlstm._rows_forward(qh, kh, vh, i_pre, f_pre, 1e-6))
    tb = median_ms(lambda: mlstm._rows_backward(saved, 1e-6, dh), 10)
    print(th, f"gates {tg:.2f}  cell fwd {tc:.2f}  cell bwd {tb:.2f} ms")
