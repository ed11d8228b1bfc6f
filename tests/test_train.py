"""Trainer pieces: schedules, optimiser split, selection on validation, divergence."""

import math
import random

import pytest
import torch

from mad_search.model import EncoderDecoder, SequenceModel
from mad_search.train import Diverged, TrainConfig, lr_factor, make_optimizers, train


def test_backoff_schedule_follows_the_hogwild_recipe():
    K, beta = random.randint(5, 50), random.choice([0.37, 0.5])
    f = [lr_factor(s, "backoff", 10_000, backoff_steps=K, backoff_beta=beta) for s in range(4 * K)]
    assert f[0] == f[K - 1] == 1.0
    assert f[K] == pytest.approx(beta)
    stage2_end = K + math.ceil(K / beta) if (K / beta) % 1 else K + int(K / beta)
    assert f[stage2_end - 1] == pytest.approx(beta)
    assert f[stage2_end] == pytest.approx(beta**2)


def test_cosine_schedule_ends_at_min_lr_and_warmup_ramps():
    n = random.randint(50, 500)
    assert lr_factor(0, "cosine", n, warmup=10) == pytest.approx(0.1)
    assert lr_factor(10, "cosine", n, warmup=10) == pytest.approx(1.0)
    assert lr_factor(n, "cosine", n, min_ratio=0.01) == pytest.approx(0.01)
    assert lr_factor(123, "constant", n) == 1.0


def _tiny_data(vocab=8, seq=12, n=64):
    x = torch.randint(0, vocab, (n, seq))
    y = torch.roll(x, -1, dims=1)  # predict the next token of a random sequence
    y[:, -1] = -100
    return {"train": (x, y), "validation": (x[:16], y[:16]), "test": (x[16:32], y[16:32])}


def test_optimiser_split_keeps_weight_decay_off_norms_biases_and_embedding():
    model = SequenceModel(10, 32, ["attention", "swiglu"], 16, sparse_embedding=True)
    cfg = TrainConfig(weight_decay=0.1, embedding_optimizer="sgd")
    main, emb = make_optimizers(model, cfg)
    emb_params = {id(model.embedding.weight)}
    decayed = [p for g in main.param_groups if g["weight_decay"] > 0 for p in g["params"]]
    assert all(p.ndim == 2 and id(p) not in emb_params for p in decayed)
    assert all(id(p) not in emb_params for g in main.param_groups for p in g["params"])
    assert [p for g in emb.param_groups for p in g["params"]] == [model.embedding.weight]


@pytest.mark.parametrize("emb_opt", ["adamw", "sgd", "adagrad", "sparse_adam"])
def test_train_runs_with_every_embedding_optimiser(emb_opt):
    model = SequenceModel(8, 16, ["attention"], 12, sparse_embedding=emb_opt != "adamw")
    before = model.embedding.weight.detach().clone()
    cfg = TrainConfig(
        max_steps=6, batch_size=8, eval_every=3, progress=False, embedding_optimizer=emb_opt
    )
    res = train(model, _tiny_data(), cfg, num_classes=8)
    assert res.steps == 6 and len(res.history) == 2
    assert not torch.equal(before, model.embedding.weight.detach())


def test_selection_uses_validation_and_restores_the_best_checkpoint():
    model = SequenceModel(8, 16, ["attention"], 12)
    cfg = TrainConfig(max_steps=20, batch_size=8, eval_every=5, progress=False, lr=3e-3)
    res = train(model, _tiny_data(), cfg, num_classes=8)
    best = max(h["accuracy"] for h in res.history)
    assert res.val_accuracy == pytest.approx(best)
    assert res.best_step == next(h["step"] for h in res.history if h["accuracy"] == best)


def test_callback_can_stop_training():
    model = SequenceModel(8, 16, ["swiglu"], 12)
    cfg = TrainConfig(max_steps=50, batch_size=8, eval_every=5, progress=False)
    res = train(model, _tiny_data(), cfg, 8, on_eval=lambda step, m: step >= 10)
    assert res.stopped == "callback" and res.steps == 10


def test_non_finite_loss_raises_diverged():
    model = SequenceModel(8, 16, ["swiglu"], 12)
    with torch.no_grad():
        model.head.weight.fill_(float("inf"))
    with pytest.raises(Diverged, match="non-finite"):
        train(model, _tiny_data(), TrainConfig(max_steps=3, batch_size=8, progress=False), 8)


def test_encoder_decoder_reconstructs_every_position_from_the_last_state():
    model = EncoderDecoder(8, 16, ["attention"], 12).eval()
    x = torch.randint(0, 8, (2, 12))
    logits = model(x)
    assert logits.shape == (2, 12, 8)
    x2 = x.clone()
    x2[:, 0] = (x[:, 0] + 1) % 8  # the first token changes every output (through the pooled state)
    assert not torch.allclose(model(x2), logits)


@pytest.mark.parametrize(
    "bad, msg",
    [
        ({"max_steps": 0}, "max_steps"),
        ({"lr": -1.0}, "lr"),
        ({"schedule": "linear"}, "schedule"),
        ({"embedding_optimizer": "lion"}, "embedding_optimizer"),
        ({"backoff_beta": 1.5}, "beta"),
        ({"accuracy": "weighted"}, "accuracy"),
    ],
)
def test_bad_train_settings_are_refused(bad, msg):
    with pytest.raises(ValueError, match=msg):
        TrainConfig(**bad).validate()


def test_warmup_ramps_the_external_embeddings_step_size_too():
    """``train.warmup_steps`` warms up the shared table (``embedding_step``) like the blocks:
    without it the table's first updates are full size while the blocks' are tiny."""
    warm, backoff = random.randint(3, 8), random.randint(20, 40)
    model = SequenceModel(8, 16, ["swiglu"], 12)
    factors = []
    cfg = TrainConfig(
        max_steps=warm + 4, batch_size=8, eval_every=100, progress=False, warmup_steps=warm,
        embedding_schedule="backoff", backoff_steps=backoff,
    )
    train(model, _tiny_data(), cfg, 8, embedding_step=factors.append)
    assert factors[:warm] == pytest.approx([(s + 1) / warm for s in range(warm)])
    assert factors[warm:] == pytest.approx([1.0] * 4)


def test_result_reports_the_test_split_under_both_averages():
    model = SequenceModel(8, 16, ["attention"], 12)
    cfg = TrainConfig(max_steps=4, batch_size=8, eval_every=2, progress=False, accuracy="micro")
    res = train(model, _tiny_data(), cfg, num_classes=8)
    assert res.test_accuracy == res.test_accuracy_micro
    assert 0.0 <= res.test_accuracy_macro <= 1.0
    # the selected checkpoint's validation micro accuracy, whatever average selected it
    (best,) = [h for h in res.history if h["step"] == res.best_step]
    assert res.val_accuracy_micro == best["accuracy_micro"]
    cfg = TrainConfig(max_steps=4, batch_size=8, eval_every=2, progress=False, accuracy="macro")
    res = train(SequenceModel(8, 16, ["attention"], 12), _tiny_data(), cfg, num_classes=8)
    (best,) = [h for h in res.history if h["step"] == res.best_step]
    assert res.val_accuracy == best["accuracy_macro"]
    assert res.val_accuracy_micro == best["accuracy_micro"]


def test_the_validation_that_reaches_the_target_is_reported_too():
    model = SequenceModel(8, 16, ["swiglu"], 12)
    cfg = TrainConfig(max_steps=50, batch_size=8, eval_every=5, progress=False,
                      target_accuracy=1e-9)  # any accuracy above 0 reaches it
    seen = []
    res = train(model, _tiny_data(), cfg, 8, on_eval=lambda step, m: seen.append(step) or True)
    assert res.stopped == "target_accuracy" and seen == [5] and res.steps == 5


class _ScriptedSteps:
    """A backend whose validation metrics follow a script (fake results for the loop's
    selection logic); the state is the step of the last training step."""

    def __init__(self, script):
        self.script, self.evals, self.at = list(script), 0, 0

    def step(self, inputs, targets, factor, emb_factor, step):
        self.at = step
        return 1.0

    def evaluate(self, inputs, targets):
        if inputs.shape[0] == 7:  # the test split: report where the weights are
            return {"accuracy": 0.0, "accuracy_macro": 0.0, "accuracy_micro": 0.0,
                    "loss": float(self.at)}
        acc, loss = self.script[self.evals]
        self.evals += 1
        return {"accuracy": acc, "accuracy_macro": acc, "accuracy_micro": acc, "loss": loss}

    def snapshot(self):
        return self.at

    def restore(self, state):
        self.at = state


def _scripted_data():
    x = torch.zeros(16, 4, dtype=torch.long)
    return {"train": (x, x), "validation": (x[:5], x[:5]), "test": (x[:7], x[:7])}


@pytest.mark.parametrize("select,objective,want_step", [
    ("auto", "accuracy", 20), ("auto", "loss", 40), ("loss", "accuracy", 40),
    ("accuracy", "loss", 20),
])
def test_the_loop_selects_by_the_tasks_objective_or_the_setting(select, objective, want_step):
    """Accuracy peaks at step 20, loss bottoms out at step 40: the checkpoint (and the test
    metrics) follow the configured choice, and the result says which."""
    import random

    from mad_search.tasks.task import TaskInfo
    from mad_search.train import run_loop

    script = [(0.5, 3.0), (0.9, 2.5), (0.6, 2.0), (0.4, 1.5), (0.3, 1.9)]
    lift = random.uniform(0, 0.05)  # fresh numbers, same order
    script = [(a + lift, b + lift) for a, b in script]
    script[4] = (script[4][0], script[3][1] + 0.4)
    cfg = TrainConfig(max_steps=50, batch_size=4, eval_every=10, select=select, progress=False,
                      target_accuracy=2.0)
    info = TaskInfo(vocab_size=8, seq_len=4, objective=objective)
    result = run_loop(_ScriptedSteps(script), _scripted_data(), cfg, task_info=info)
    # the scripted minimum of the loss is at the 4th validation (step 40)
    want = 40 if (select == "loss" or (select == "auto" and objective == "loss")) else 20
    assert want == want_step
    assert result.best_step == want and result.test_loss == float(want)
    assert result.selected_by == ("loss" if want == 40 else "accuracy")
    assert result.val_perplexity == pytest.approx(math.exp(result.val_loss))


def test_target_loss_stops_training_and_bits_per_byte_follow_the_loss():
    from mad_search.tasks.task import TaskInfo
    from mad_search.train import run_loop

    script = [(0.1, 3.0), (0.1, 2.0), (0.1, 0.9), (0.1, 0.5)]
    cfg = TrainConfig(max_steps=40, batch_size=4, eval_every=10, target_loss=1.0, progress=False)
    info = TaskInfo(vocab_size=257, seq_len=4, objective="loss", bytes_per_token=1.0)
    result = run_loop(_ScriptedSteps(script), _scripted_data(), cfg, task_info=info)
    assert result.stopped == "target_loss" and result.steps == 30
    assert result.val_bits_per_byte == pytest.approx(0.9 / math.log(2))
    assert [h["bits_per_token"] for h in result.history] == pytest.approx(
        [v / math.log(2) for _, v in script[:3]])


def test_text_task_is_judged_by_loss_and_knows_bytes_per_token():
    from mad_search import tasks

    assert tasks.info("text").objective == "loss"
    assert tasks.info("text").bytes_per_token == 1.0
    assert tasks.info("text", tokenizer="word", vocab_size=512).bytes_per_token is None
    assert tasks.info("in_context_recall").objective == "accuracy"


def test_bad_select_setting_is_one_line():
    with pytest.raises(ValueError, match="train.select must be auto, accuracy or loss"):
        TrainConfig(select="perplexity").validate()
