"""Fair budgets: the derived width meets the target and is the largest that does."""

import random

import pytest
import torch
from hydra import compose, initialize_config_module

from mad_search.budget import BudgetError, measure, width_for_budget
from mad_search.config import ConfigError, resolve
from mad_search.model import build_blocks

PATTERNS = [
    ["mlstm"] * 2,
    ["attention", "swiglu"],
    ["slstm", "mlstm"],
    ["hyena", "attention"],
    ["mamba"],
    ["short_conv", "swiglu", "attention"],
]


@pytest.mark.parametrize("layers", PATTERNS)
@pytest.mark.parametrize("kind", ["params", "state"])
def test_width_is_the_largest_that_fits(layers, kind):
    seq = 64
    small = measure(layers, 16, seq, seq)[0 if kind == "params" else 1]
    target = int(small * random.uniform(1.5, 6.0))
    got = width_for_budget(layers, seq, seq, **{kind: target}, multiple=16)
    assert got[kind] <= target and got["d_model"] % 16 == 0
    wider = measure(layers, got["d_model"] + 16, seq, seq)[0 if kind == "params" else 1]
    assert wider > target
    assert got["reached"] == pytest.approx(got[kind] / target)


def test_meta_measurement_matches_a_real_build():
    layers = random.choice(PATTERNS)
    d = random.choice([16, 32, 48])
    params, state = measure(layers, d, 32, 32)
    real = build_blocks(layers, d, 32)
    assert params == sum(p.numel() for p in real.parameters()) + d
    assert state == sum(b.state_size(32) for b in real)
    assert all(p.device == torch.device("cpu") for p in real.parameters())


def test_bad_budgets_are_refused():
    with pytest.raises(BudgetError, match="exactly one"):
        width_for_budget(["mlstm"], 32, 32, params=10, state=10)
    with pytest.raises(BudgetError, match="positive"):
        width_for_budget(["mlstm"], 32, 32, params=-5)


def _resolve(*overrides):
    with initialize_config_module(config_module="conf", version_base="1.3"):
        return resolve(compose("config", overrides=list(overrides)))


def test_config_budget_sets_d_model_and_is_recorded():
    plan = _resolve("pattern=transformer", "model.budget.params=150000", "task.seq_len=64")
    assert plan.budget["kind"] == "params" and plan.d_model == plan.budget["d_model"]
    assert plan.budget["params"] <= 150000
    other = _resolve("pattern=xlstm_7_1", "model.budget.params=150000", "task.seq_len=64")
    assert other.d_model != plan.d_model  # different patterns, different widths, same budget


def test_config_budget_errors_are_config_errors():
    with pytest.raises(ConfigError, match="exactly one"):
        _resolve("model.budget.params=1000", "model.budget.state=1000")


def test_resolving_a_plan_leaves_the_global_rng_where_it_was():
    # resolve() builds one probe block of each type; that initialisation must not move torch's
    # global RNG, or a seed set before resolving would give other weights than one set after
    seed = random.randrange(2**31)
    torch.manual_seed(seed)
    expected = torch.rand(8)
    torch.manual_seed(seed)
    _resolve("pattern=xlstm_7_1", "model.d_model=32", "task.seq_len=64")
    assert torch.equal(torch.rand(8), expected)
