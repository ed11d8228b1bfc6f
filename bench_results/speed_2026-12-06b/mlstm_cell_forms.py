"""Our mLSTM block with each cell form against the official block, forward + backward at
d_model 128, batch 16: ``python bench_results/speed_2026-12-06b/mlstm_cell_forms.py THREADS
SEQ FORMS [--heap]`` from the repository root (FORMS e.g. ``auto,chunkwise,parallel``;
``--heap`` applies the workers' allocator setting). 14 rounds, the blocks taking turns; the
median of the last 12."""

import statistics
import sys
import time

import torch

sys.path.insert(0, ".")
from blocks.mlstm import MLSTMBlock  # noqa: E402
from mad_search.bench import _official_xlstm  # noqa: E402

threads = int(sys.argv[1]) if len(sys.argv) > 1 else 2
S = int(sys.argv[2]) if len(sys.argv) > 2 else 256
forms = sys.argv[3].split(",") if len(sys.argv) > 3 else ["auto", "chunkwise", "parallel"]
torch.set_num_threads(threads)
if "--heap" in sys.argv[4:]:
    from mad_search.allocator import keep_freed_memory

    print("keep_freed_memory", keep_freed_memory())
torch.manual_seed(0)
x = torch.randn(16, S, 128, requires_grad=True)
blocks = {f: MLSTMBlock(128, S, cell=f) for f in forms}
blocks["official"] = _official_xlstm.build("mlstm", 128, S)
times: dict[str, list[float]] = {k: [] for k in blocks}
for r in range(14):
    for k, b in blocks.items():
        t0 = time.perf_counter()
        b(x).sum().backward()
        if r >= 2:
            times[k].append((time.perf_counter() - t0) * 1e3)
official = statistics.median(times["official"])
for k, v in times.items():
    med = statistics.median(v)
    print(f"{k:10s} median {med:7.1f} ms  min {min(v):7.1f}  official/this {official / med:.2f}x")
print("auto cell:", blocks[forms[0]].cell_for(S, "cpu", torch.float32))
