"""Named patterns (``conf/pattern/``): every preset composes, resolves, builds and trains a step,
the MAD paper's architectures among them."""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module

from mad_search.config import resolve
from mad_search.model import build_model
from mad_search.train import train_plan

PATTERNS = sorted(
    p.stem for p in (Path(__file__).resolve().parents[1] / "conf" / "pattern").glob("*.yaml")
)
MAD_PRESETS = {
    "mad_attention": ["attention", "swiglu", "attention", "swiglu"],
    "mad_hyena": ["hyena", "swiglu", "hyena", "swiglu"],
    "mad_mh_hyena": ["mh_hyena", "swiglu", "mh_hyena", "swiglu"],
    "mad_mamba": ["mamba"] * 4,
    "mad_gla": ["gated_linear_attention", "swiglu", "gated_linear_attention", "swiglu"],
    "mad_linear_attention": ["linear_attention", "swiglu", "linear_attention", "swiglu"],
    "mad_striped_hyena_attention": ["hyena", "swiglu", "attention", "swiglu"],
    "mad_striped_mh_hyena_attention": ["mh_hyena", "swiglu", "attention", "swiglu"],
    "mad_striped_gla_attention": ["gated_linear_attention", "swiglu", "attention", "swiglu"],
    "mad_striped_mamba_attention": ["mamba", "attention", "swiglu"],
}


def _plan(name: str):
    overrides = [f"pattern={name}", "model.d_model=32", "task.seq_len=32", "train.progress=false"]
    with initialize_config_module(config_module="conf", version_base="1.3"):
        return resolve(compose("config", overrides=overrides))


def test_the_mad_paper_presets_exist_with_mad_labs_layout():
    assert set(MAD_PRESETS) <= set(PATTERNS)
    for name, layers in MAD_PRESETS.items():
        assert _plan(name).layers == layers, name


@pytest.mark.parametrize("name", PATTERNS)
def test_every_preset_builds_and_trains_a_step(name):
    plan = _plan(name)
    vocab, seq = plan.task_info.vocab_size, plan.task_info.seq_len
    gen = torch.Generator().manual_seed(random.randrange(2**31))
    x = torch.randint(0, vocab, (8, seq), generator=gen)
    data = {split: (x, torch.roll(x, -1, dims=1)) for split in ("train", "validation", "test")}
    one_step = dataclasses.replace(plan.train, max_steps=1, eval_every=1, batch_size=4)
    model, result = train_plan(dataclasses.replace(plan, train=one_step), data)
    assert result.steps == 1 and torch.isfinite(torch.tensor(result.val_loss))
    torch.manual_seed(plan.seed)  # the untrained model train_plan started from
    fresh = build_model(plan)
    moved = [
        (a - b).abs().max().item()
        for a, b in zip(model.state_dict().values(), fresh.state_dict().values())
        if a.is_floating_point()
    ]
    assert max(moved) > 0, "one training step changed no weight"
