"""A single run: build the task and the model from a :class:`RunPlan`, train, write results."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from mad_search import tasks
from mad_search.allocator import keep_freed_memory
from mad_search.backend import train_plan
from mad_search.model import count_params
from mad_search.plan import RunPlan


def run_single(plan: RunPlan, out_dir: str | os.PathLike) -> dict:
    """Train ``plan``'s layer sequence on its task; write and return ``results.json``'s content."""
    keep_freed_memory()
    if plan.threads:
        torch.set_num_threads(plan.threads)
    if plan.backend == "mlx":  # MLX's matrix products (OpenBLAS on Linux): the same threads
        from blocks.mlx import blas
        from mad_search.settings import available_cores

        blas.set_threads(plan.threads or available_cores())
    if plan.device.startswith("cuda") and not torch.cuda.is_available():
        from mad_search.config import ConfigError

        raise ConfigError("device=cuda but no CUDA device is available; use device=cpu")
    t0 = time.perf_counter()
    data = tasks.as_tensors(tasks.build(plan.task_name, seed=plan.seed, **plan.task_settings))
    data_seconds = time.perf_counter() - t0
    print(f"task {plan.task_name} | pattern {plan.pattern} | d_model {plan.d_model}"
          + (f" | backend {plan.backend}" if plan.backend != "torch" else ""))
    hogwild = None
    if plan.train.workers is not None:  # one-model Hogwild: W workers train this model
        from mad_search.hogwild.one_model import train_hogwild

        model, run = train_hogwild(plan, data, out_dir=out_dir)
        result, hogwild = run.result, run.hogwild
    else:
        model, result = train_plan(plan, data)
    params = model.num_params() if plan.backend == "mlx" else count_params(model)
    out = {
        "backend": plan.backend,
        "task": plan.task_name,
        "task_settings": plan.task_settings,
        "pattern": plan.pattern,
        "layers": plan.layers,
        "d_model": plan.d_model,
        "params": params,
        "state_size": model.state_size(plan.task_info.seq_len),
        "seed": plan.seed,
        "budget": plan.budget,
        "data_seconds": data_seconds,
        **result.as_dict(),
    }
    if hogwild is not None:
        out["hogwild"] = hogwild
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    path = Path(out_dir) / "results.json"
    path.write_text(json.dumps(out, indent=2))
    judged = (
        f"val_loss {out['val_loss']:.4f} | perplexity {out['val_perplexity']:.2f}"
        + (f" | bits/byte {out['val_bits_per_byte']:.3f}" if out["val_bits_per_byte"] else "")
        + f" | test_loss {out['test_loss']:.4f}"
        if out["selected_by"] == "loss"
        else f"val_accuracy {out['val_accuracy']:.4f} | test_accuracy {out['test_accuracy']:.4f}"
    )
    print(
        f"params {out['params']:,} | state {out['state_size']:,} floats | {judged} | "
        f"steps {out['steps']} | {out['tokens_per_s']:,.0f} tokens/s | results: {path}"
    )
    return out
