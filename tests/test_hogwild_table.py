"""The shared table's lock-free update and its measurements, against hand computations."""

import random

import pytest
import torch

from mad_search.hogwild import NonFiniteUpdate, SharedTable, TableEmbedding


def _step(emb, tokens, weight=None):
    out = emb(tokens)
    w = torch.randn_like(out) if weight is None else weight
    (out * w).sum().backward()
    return w


@pytest.mark.parametrize("rule", ["sgd", "adagrad"])
def test_update_matches_a_hand_written_rule(rule):
    V, D = random.randint(8, 40), random.randint(2, 16)
    table = SharedTable(V, D, num_slots=1, seed=random.randrange(100), rule=rule, share=False)
    emb = TableEmbedding(table, slot=0, lr=0.1)
    before = table.weight.clone()
    tokens = torch.randint(0, V, (3, 7))
    w = _step(emb, tokens)
    # reference: dense gradient of sum(E[tokens] * w) w.r.t. E
    grad = torch.zeros(V, D).index_add_(0, tokens.reshape(-1), w.reshape(-1, D))
    rows = torch.unique(tokens)
    emb.apply_update(lr_factor=0.5)
    expected = before.clone()
    if rule == "sgd":
        expected[rows] -= 0.05 * grad[rows]
    else:
        acc = grad[rows].square().mean(1)
        expected[rows] -= 0.05 * grad[rows] / (acc.sqrt()[:, None] + 1e-10)
        torch.testing.assert_close(table.accum[rows], acc)
    torch.testing.assert_close(table.weight, expected)
    untouched = torch.ones(V, dtype=torch.bool)
    untouched[rows] = False
    assert torch.equal(table.weight[untouched], before[untouched])
    assert emb.stats.rows == rows.numel() and table.clock() == 1


def test_non_finite_updates_are_refused_counted_and_then_fail():
    table = SharedTable(10, 4, num_slots=1, rule="sgd", share=False)
    emb = TableEmbedding(table, slot=0, lr=1.0, max_nonfinite=2)
    before = table.weight.clone()
    for i in range(3):
        tokens = torch.randint(0, 10, (2, 5))
        out = emb(tokens)
        (out * float("nan")).sum().backward()
        if i < 2:
            emb.apply_update()
        else:
            with pytest.raises(NonFiniteUpdate):
                emb.apply_update()
    assert torch.equal(table.weight, before)
    assert int(table.skipped[0]) == 3 and table.summary()["finite"]


def test_collisions_and_staleness_are_measured_between_slots():
    table = SharedTable(20, 4, num_slots=2, rule="sgd", share=True)
    a = TableEmbedding(table, slot=0, lr=0.1)
    b = TableEmbedding(table, slot=1, lr=0.1)
    tok_a = torch.tensor([[1, 2, 3]])
    tok_b = torch.tensor([[3, 4]])
    _step(a, tok_a)  # a reads rows 1,2,3
    _step(b, tok_b)  # b reads rows 3,4
    b.apply_update()  # b writes 3,4 first
    a.apply_update()  # a's read of row 3 is now stale: one collision, staleness 1
    assert a.stats.collided_rows == 1 and a.stats.rows == 3
    assert a.stats.staleness_max == 1 and b.stats.staleness_max == 0
    assert table.writes.tolist() == [1, 1]
    assert table.last_writer[3] == 0 and table.last_writer[4] == 1
    s = table.summary()
    assert s["updates"] == 2 and s["delta"] == pytest.approx(1.0)  # row 3 is in both updates


def test_table_is_not_part_of_the_model_state():
    from mad_search.model import SequenceModel

    table = SharedTable(12, 16, num_slots=1)
    model = SequenceModel(12, 16, ["attention"], 8)
    model.embedding = TableEmbedding(table, 0, 0.1)
    assert not any("table" in k or k == "embedding.weight" for k in model.state_dict())
    assert table.weight.is_shared()
    assert not any(p.is_shared() for p in model.parameters())


def test_adam_rule_matches_a_per_row_lazy_adam_reference():
    """Each touched row takes its k-th Adam step (k = its own update count), untouched rows and
    their moments stay; the moments live in the shared table."""
    V, D = random.randint(6, 20), random.randint(2, 8)
    lr = random.uniform(1e-3, 1e-1)
    table = SharedTable(V, D, num_slots=1, seed=random.randrange(100), rule="adam", share=True)
    assert table.exp_avg.is_shared() and table.exp_avg.shape == (V, D)
    emb = TableEmbedding(table, slot=0, lr=lr)
    weight, m, v, k = table.weight.clone().double(), {}, {}, {}
    for _ in range(4):
        tokens = torch.randint(0, V, (2, 5))
        w = _step(emb, tokens)
        grad = torch.zeros(V, D).index_add_(0, tokens.reshape(-1), w.reshape(-1, D)).double()
        emb.apply_update(lr_factor=1.0)
        for r in torch.unique(tokens).tolist():  # the slow reference, one row at a time
            k[r] = k.get(r, 0) + 1
            m[r] = 0.9 * m.get(r, 0.0) + 0.1 * grad[r]
            v[r] = 0.999 * v.get(r, 0.0) + 0.001 * grad[r] ** 2
            m_hat, v_hat = m[r] / (1 - 0.9 ** k[r]), v[r] / (1 - 0.999 ** k[r])
            weight[r] -= lr * m_hat / (v_hat.sqrt() + 1e-8)
    # float32 table against a float64 reference: steps of up to lr = 0.1 leave rounding of about
    # 1e-6 (seen: 1.3e-6); a wrong moment or bias correction is off by a fraction of lr
    torch.testing.assert_close(table.weight, weight.float(), rtol=1e-5, atol=1e-5)
    for r in range(V):
        expected = m[r].float() if r in m else torch.zeros(D)
        torch.testing.assert_close(table.exp_avg[r], expected, rtol=1e-5, atol=1e-7)
    assert table.touches.tolist() == [k.get(r, 0) for r in range(V)]


def recall_plan(backend="torch"):
    """A small in-context recall run for the checkpoint tests (torch here, MLX in
    ``test_mlx_backend``)."""
    from mad_search.config import resolve

    return resolve({"task": {"name": "in_context_recall", "seq_len": 16,
                             "num_train_examples": 64, "num_test_examples": 32},
                    "model": {"d_model": 16, "pattern": "attention swiglu"},
                    "train": {"max_steps": 8, "eval_every": 1, "batch_size": 8,
                              "progress": False, "lr": 3e-3, "warmup_steps": 0},
                    "backend": backend})


def check_best_checkpoint_brings_back_the_table(steps, table, data, atol):
    """Train ``steps`` (a backend's Steps, its model reading ``table``), snapshot, train on,
    restore: the validation split must evaluate as at the snapshot, and the table must not have
    been written by the restore. Returns the snapshot's validation metrics."""
    x, y = data["train"]

    def train(n):
        for i in range(n):
            steps.step(x[i * 8:(i + 1) * 8], y[i * 8:(i + 1) * 8], 1.0, 1.0, i + 1)

    train(2)
    selected = steps.evaluate(*data["validation"])
    state = steps.snapshot()
    train(6)
    later = steps.evaluate(*data["validation"])
    assert later["loss"] != selected["loss"]  # the table (and blocks) moved on
    live = table.weight.clone()
    steps.restore(state)
    again = steps.evaluate(*data["validation"])
    assert again["loss"] == pytest.approx(selected["loss"], abs=atol)
    assert again["accuracy"] == selected["accuracy"]
    assert torch.equal(table.weight, live)  # restoring read a copy, wrote nothing
    return selected


@pytest.mark.parametrize("share", [False, True])
def test_best_checkpoint_brings_back_the_table_it_was_selected_with(share):
    """The table is outside the model's state_dict: restoring the best validation checkpoint
    must also read the table as it was then (else the test split meets the selected blocks with
    a later table), and must never write the table (other workers may share it)."""
    from mad_search import tasks
    from mad_search.model import build_model
    from mad_search.train import TorchSteps

    plan = recall_plan()
    data = tasks.as_tensors(tasks.build(plan.task_name, seed=random.randrange(100),
                                        **plan.task_settings))
    table = SharedTable(plan.task_info.vocab_size, plan.d_model, 1,
                        seed=random.randrange(100), rule="sgd", share=share)
    emb = TableEmbedding(table, slot=0, lr=5.0)
    torch.manual_seed(random.randrange(100))
    model = build_model(plan)
    model.embedding = emb
    steps = TorchSteps(model, plan.train, plan.task_info.num_classes, "cpu", emb.apply_update)
    selected = check_best_checkpoint_brings_back_the_table(steps, table, data, atol=1e-6)
    emb.read_from(None)  # back to the live table
    assert steps.evaluate(*data["validation"])["loss"] != pytest.approx(selected["loss"], abs=1e-6)
