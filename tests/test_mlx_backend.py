"""backend=mlx end to end: the MLX model matches the torch model given its weights, a single MLX
run trains through the shared loop, and a mixed pool of torch and MLX workers shares one table."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch

pytest.importorskip("blocks.mlx")
import mlx.core as mx  # noqa: E402

from mad_search import tasks  # noqa: E402
from mad_search.config import ConfigError  # noqa: E402
from mad_search.mlx_train import (  # noqa: E402
    EncoderDecoder,
    SequenceModel,
    load_torch_state,
    masked_cross_entropy,
)
from mad_search.model import EncoderDecoder as TorchEncoderDecoder  # noqa: E402
from mad_search.model import SequenceModel as TorchSequenceModel  # noqa: E402
from mad_search.train import loss_fn  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("torch_cls,mlx_cls", [(TorchSequenceModel, SequenceModel),
                                                (TorchEncoderDecoder, EncoderDecoder)])
def test_mlx_model_gives_torch_models_logits_and_loss(torch_cls, mlx_cls):
    rng = np.random.default_rng()
    vocab, d, seq = int(rng.integers(8, 40)), 32, int(rng.integers(8, 33))
    layers = ["attention", "swiglu", "sliding_window_attention"]
    torch.manual_seed(torch.seed())
    tmodel = torch_cls(vocab, d, layers, 64)
    mmodel = mlx_cls(vocab, d, layers, 64)
    load_torch_state(mmodel, tmodel.state_dict())
    tokens = rng.integers(0, vocab, (3, seq))
    targets = np.where(rng.random((3, seq)) < 0.3, -100, rng.integers(0, vocab, (3, seq)))
    with torch.no_grad():
        want = tmodel(torch.from_numpy(tokens))
        want_loss = loss_fn(want, torch.from_numpy(targets))
    got = mmodel(mx.array(tokens))
    got_loss, _ = masked_cross_entropy(got, mx.array(targets))
    np.testing.assert_allclose(np.array(got), want.numpy(), rtol=1e-4, atol=1e-4)
    assert abs(got_loss.item() - want_loss.item()) < 1e-4


def _run(tmp_path, *overrides):
    cmd = [sys.executable, "-m", "mad_search", *overrides, "train.progress=false",
           f"hydra.run.dir={tmp_path}/run"]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)


def test_single_mlx_run_writes_the_same_results(tmp_path):
    done = _run(tmp_path, "backend=mlx", "pattern=attention_2", "task.seq_len=32",
                "task.num_train_examples=256", "task.num_test_examples=64", "model.d_model=32",
                "train.max_steps=20", "train.eval_every=10", "train.batch_size=16")
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads((tmp_path / "run" / "results.json").read_text())
    assert out["backend"] == "mlx"
    for key in ("val_accuracy", "test_accuracy", "steps", "tokens_per_s", "pattern", "params",
                "state_size", "history"):
        assert key in out, key
    assert out["steps"] == 20 and len(out["history"]) == 2
    assert out["history"][-1]["loss"] < out["history"][0]["loss"] + 0.5


@pytest.mark.parametrize("override,message", [
    ("backend=jax", "backend must be one of torch, mlx"),
    ("train.embedding_optimizer=sgd", "AdamW only"),
])
def test_bad_mlx_settings_fail_in_one_line(tmp_path, override, message):
    extra = [] if override.startswith("backend=") else ["backend=mlx"]
    done = _run(tmp_path, *extra, override, "train.max_steps=1")
    assert done.returncode == 2
    assert message in done.stderr and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def _mixed_cfg(tmp_path, backends, patterns, n_trials=4):
    from hydra import compose, initialize_config_module
    from omegaconf import open_dict

    overrides = ["+sweep=layer_patterns", "task=in_context_recall", "task.seq_len=32",
                 "task.num_train_examples=512", "task.num_test_examples=128", "model.d_model=32",
                 "train.max_steps=30",
                 "train.eval_every=10", "train.batch_size=16", "hogwild.threads_per_worker=1",
                 f"hogwild.backends={backends}", f"study.n_trials={n_trials}",
                 f"study.storage=sqlite:///{tmp_path}/study.db", "search.params={}"]
    with initialize_config_module(config_module="conf", version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    with open_dict(cfg):
        cfg.search = {"pattern": {"kind": "choice", "choices": patterns}}
    return cfg


def test_mixed_pool_trains_on_both_backends_and_both_write_the_table(tmp_path):
    from mad_search.study import run_study

    cfg = _mixed_cfg(tmp_path, "{torch:1,mlx:1}", ["attention swiglu", "swiglu attention"])
    summary = run_study(cfg, tmp_path / "run")
    trials = optuna.load_study(study_name="layer_patterns",
                               storage=f"sqlite:///{tmp_path}/study.db").get_trials()
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == 4, [t.user_attrs.get("fail_reason") for t in trials]
    backends = {t.user_attrs["worker"]: t.user_attrs["backend"] for t in complete}
    assert backends == {0: "torch", 1: "mlx"}
    (table,) = summary["tables"].values()
    assert table["finite"] and min(table["writes_per_worker"]) > 0  # both kinds wrote it
    for t in complete:
        assert t.user_attrs["table_is_shared"] is True
        assert t.user_attrs["hogwild.rows_per_step"] > 0


def test_pool_of_only_mlx_workers_refuses_patterns_without_twins(tmp_path, monkeypatch):
    import blocks
    from blocks.registry import _MLX_REGISTRY
    from mad_search.study import validate_sweep

    monkeypatch.delitem(_MLX_REGISTRY, "swiglu")
    assert "swiglu" not in blocks.names("mlx")
    cfg = _mixed_cfg(tmp_path, "{mlx:2}", ["attention swiglu"])
    with pytest.raises(ConfigError, match=r"only MLX workers.*\['swiglu'\] have no MLX twin"):
        validate_sweep(cfg)


@pytest.mark.parametrize("backends,message", [
    ("{torch:1,gpu:1}", "unknown backend 'gpu'"),
    ("{torch:0}", "no workers at all"),
    ("{torch:-1,mlx:1}", "integer >= 0"),
])
def test_bad_backends_fail_in_one_line(tmp_path, backends, message):
    from mad_search.study import validate_sweep

    with pytest.raises(ConfigError, match=message):
        validate_sweep(_mixed_cfg(tmp_path, backends, ["attention"]))


def test_workers_and_backends_must_agree(tmp_path):
    from mad_search.settings import HogwildSettings

    with pytest.raises(ConfigError, match="disagrees"):
        HogwildSettings.from_config({"workers": 3, "backends": {"torch": 1, "mlx": 1}})
    hog = HogwildSettings.from_config({"backends": {"torch": 1, "mlx": 2}})
    assert hog.workers == 3 and hog.backends == ("torch", "mlx", "mlx")


def test_mlx_worker_starts_from_the_torch_weights_of_its_seed():
    """A pool's MLX trial starts where a torch worker's would (init="torch")."""
    from mad_search.config import resolve
    from mad_search.mlx_train import train_plan_mlx
    from mad_search.model import build_model

    plan = resolve({"task": {"name": "in_context_recall", "seq_len": 16,
                             "num_train_examples": 64, "num_test_examples": 32},
                    "model": {"d_model": 16, "pattern": "attention swiglu"},
                    "train": {"max_steps": 1, "eval_every": 1, "batch_size": 8,
                              "progress": False, "lr": 1e-12, "warmup_steps": 0},
                    "backend": "mlx"})
    data = tasks.as_tensors(tasks.build(plan.task_name, seed=0, **plan.task_settings))
    seed = int(np.random.default_rng().integers(1000))
    model, _ = train_plan_mlx(plan, data, seed=seed, init="torch")
    torch.manual_seed(seed)
    ref = build_model(plan).state_dict()
    from mlx.utils import tree_flatten

    got = dict(tree_flatten(model.parameters()))
    for k, v in ref.items():
        np.testing.assert_allclose(np.array(got[k]), v.numpy(), atol=1e-6, err_msg=k)


def _bench(name, tmp_path, *args):
    from mad_search import bench

    out = tmp_path / f"bench_{name}.json"
    assert bench.main([name, *args, f"out={out}"]) == 0
    return json.loads(out.read_text())


def test_mixed_benchmark_runs_every_setup_and_checks_parity(tmp_path):
    from mad_search.bench import mixed

    result = _bench("mixed", tmp_path, "trials=2", "max_steps=4",
                    "task_settings={seq_len: 32, num_tokens_to_copy: 4, num_train_examples: 256, "
                    "num_test_examples: 64}",
                    "train={batch_size: 8}", "patterns=[attention swiglu]")
    setups = result["setups"]
    assert set(setups) == {"torch", "mlx", "mixed"}
    assert setups["torch"]["trials_by_backend"] == {"torch": 2}
    assert setups["mlx"]["trials_by_backend"] == {"mlx": 2}
    assert setups["mixed"]["trials_by_backend"] == {"torch": 1, "mlx": 1}
    for rec in setups.values():
        (table,) = rec["tables"].values()
        assert table["finite"] and min(table["writes_per_worker"]) > 0
        assert rec["complete"] == 2
    assert isinstance(result["mixed_vs_torch_accuracy"], float)
    assert set(result["parity"]) == {"attention", "swiglu"}
    assert all(p["max_rel_diff"] < 1e-4 for p in result["parity"].values())
    assert "mixed - torch" in mixed.table(result)


def test_blocks_benchmark_times_mlx_twins_beside_torch_blocks(tmp_path):
    from mad_search.bench import blocks as bench_blocks

    result = _bench("blocks", tmp_path, "backend=mlx", "blocks=[attention,mlstm]", "d_model=32",
                    "batch=2", "seq_lens=[16]", "iters=1", "warmup=0", "threads=1",
                    "study_size=false", "official=false")
    rows = {(r["block"], r["backend"]): r for r in result["rows"]}
    assert set(rows) == {(b, k) for b in ("attention", "mlstm") for k in ("torch", "mlx")}
    for name in ("attention", "mlstm"):
        twin = rows[(name, "mlx")]
        assert twin["params"] == rows[(name, "torch")]["params"]
        assert twin["tokens_per_s"] > 0 and twin["max_output_diff"] < 1e-3
        assert result["mlx_vs_torch"][name]["d32_b2_s16"] > 0
    assert result["mlx"]["matmul_gflops"]["mlx"] > 0
    assert "mlx/torch" in bench_blocks.table(result)


def test_mlx_best_checkpoint_brings_back_the_table_it_was_selected_with():
    """As the torch backend: the best checkpoint's test evaluation reads the table as it was
    at that validation, and restoring never writes the (possibly shared) table."""
    import random

    from test_hogwild_table import check_best_checkpoint_brings_back_the_table, recall_plan

    from mad_search.hogwild import SharedTable
    from mad_search.mlx_train import MLXSteps, MLXTableEmbedding
    from mad_search.mlx_train import build_model as build_mlx_model

    plan = recall_plan("mlx")
    data = tasks.as_tensors(tasks.build(plan.task_name, seed=random.randrange(100),
                                        **plan.task_settings))
    table = SharedTable(plan.task_info.vocab_size, plan.d_model, 1,
                        seed=random.randrange(100), rule="sgd")
    mx.random.seed(random.randrange(100))
    model = build_mlx_model(plan)
    model.embedding = MLXTableEmbedding(table, 0, lr=5.0)
    steps = MLXSteps(model, plan.train, plan.task_info.num_classes)
    check_best_checkpoint_brings_back_the_table(steps, table, data, atol=1e-5)
