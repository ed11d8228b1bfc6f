"""Self CPU time per operator of our mLSTM block (d_model 128, batch 16, 256 steps, forward +
backward) on one thread and on two: ``python
bench_results/speed_2026-12-06b/mlstm_threads_profile.py`` from the repository root. The native
kernels' nodes show the calling thread's wait, i.e. their wall time."""

import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, ".")
from blocks.mlstm import MLSTMBlock  # noqa: E402

res: dict[int, dict[str, float]] = {}
for th in (1, 2):
    torch.set_num_threads(th)
    torch.manual_seed(0)
    x = torch.randn(16, 256, 128, requires_grad=True)
    block = MLSTMBlock(128, 256)
    for _ in range(3):
        block(x).sum().backward()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(5):
            block(x).sum().backward()
    res[th] = {e.key: e.self_cpu_time_total / 5e3 for e in prof.key_averages()}
print(f"{'op':45s} {'1 thr ms':>9s} {'2 thr ms':>9s}")
for key in sorted(res[1], key=lambda k: -res[1][k])[:22]:
    print(f"{key[:45]:45s} {res[1][key]:9.2f} {res[2].get(key, 0.0):9.2f}")
print("total", sum(res[1].values()), sum(res[2].values()))
