"""Learning, not just running: small models solve in-context recall (vocab 16, sequence 128)."""

import random

import pytest
import torch

from mad_search import tasks
from mad_search.model import SequenceModel
from mad_search.train import TrainConfig, train


def _recall_data(seed):
    ds = tasks.build(
        "in_context_recall",
        seed=seed,
        vocab_size=16,
        seq_len=128,
        num_train_examples=4096,
        num_test_examples=256,
    )
    return tasks.as_tensors(ds), tasks.info("in_context_recall", vocab_size=16, seq_len=128)


BACKENDS = ["torch", pytest.param("mlx", marks=pytest.mark.mlx)]


def _train(layers, d_model, lr, max_steps, seed, backend="torch"):
    """Train on recall with either backend: the torch model and :func:`train`, or the MLX
    model (the blocks' twins) through the same loop (:class:`mad_search.mlx_train.MLXSteps`)."""
    data, info = _recall_data(seed)
    cfg = _config(lr, max_steps, seed)
    if backend == "mlx":
        mlx_train = pytest.importorskip("mad_search.mlx_train")
        from mad_search.train import run_loop

        mlx_train.mx.random.seed(seed)
        model = mlx_train.SequenceModel(info.vocab_size, d_model, layers, info.seq_len)
        return run_loop(mlx_train.MLXSteps(model, cfg, info.num_classes), data, cfg)
    torch.manual_seed(seed)
    model = SequenceModel(info.vocab_size, d_model, layers, info.seq_len)
    return train(model, data, cfg, info.num_classes)


def _config(lr, max_steps, seed):
    return TrainConfig(
        max_steps=max_steps,
        batch_size=32,
        lr=lr,
        weight_decay=0.0,
        warmup_steps=100,
        eval_every=100,
        target_accuracy=0.995,  # train past the transition, not just onto it
        # The fraction of recalled values. mad-lab's macro accuracy (the default) also counts,
        # with recall 0, any class that is predicted but never a target: one stray key-token
        # guess took a 2-layer attention model from 0.999 (micro) to 0.888 (macro) on a test split.
        accuracy="micro",
        progress=False,
        seed=seed,
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    "layers, d_model, lr, max_steps",
    [
        # Attention does the recall; the short convolution in front hands it the previous token
        # (what an induction head's first layer would have to learn), so the transition comes
        # early and reliably: 100 to 200 steps on each of 8 seeds tried. Attention-only and
        # attention + SwiGLU stacks got there erratically (600 to 2,300 steps at lr 3e-3, and on
        # one seed each not within 3,000). The mLSTM gets there in a few hundred steps.
        (["short_conv", "attention"], 64, 3e-3, 1500),
        (["mlstm", "mlstm"], 64, 2e-3, 1500),
    ],
)
@pytest.mark.parametrize("backend", BACKENDS)
def test_model_learns_in_context_recall(layers, d_model, lr, max_steps, backend):
    seed = random.randrange(1000)
    result = _train(layers, d_model, lr, max_steps, seed, backend)
    assert result.test_accuracy >= 0.9, (layers, backend, seed, result.history[-3:])


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_short_convolutions_alone_cannot_recall(backend):
    """The control for the hybrid above: without attention the model cannot look back far."""
    seed = random.randrange(1000)
    result = _train(["short_conv", "short_conv"], 64, 3e-3, 300, seed, backend)
    assert result.test_accuracy < 0.5, (backend, seed, result.history[-3:])


def test_training_reduces_loss_quickly():
    data, info = _recall_data(random.randrange(1000))
    model = SequenceModel(info.vocab_size, 32, ["attention"], info.seq_len)
    cfg = TrainConfig(max_steps=40, batch_size=16, lr=3e-3, eval_every=20, progress=False)
    result = train(model, data, cfg, info.num_classes)
    first, last = result.history[0], result.history[-1]
    assert last["loss"] < first["loss"] or last["loss"] < 2.5
    assert result.steps == 40 and result.tokens_per_s > 0


@pytest.mark.slow
@pytest.mark.parametrize("pattern", ["transformer", "xlstm_1_0"])
def test_single_run_defaults_solve_in_context_recall(pattern):
    """``python -m mad_search pattern=<pattern>`` as shipped (every default, seed 0): the
    transformer and the mLSTM stack both reach test accuracy 0.9 on in-context recall."""
    from hydra import compose, initialize_config_module

    from mad_search.config import resolve
    from mad_search.train import train_plan

    with initialize_config_module(config_module="conf", version_base="1.3"):
        cfg = compose("config", overrides=[f"pattern={pattern}", "train.progress=false"])
    plan = resolve(cfg)
    data = tasks.as_tensors(tasks.build(plan.task_name, seed=plan.seed, **plan.task_settings))
    _, result = train_plan(plan, data)
    assert result.test_accuracy >= 0.9, (pattern, result.history[-3:])
