"""The coordinator's trial plans: the fast path on plain containers gives the same plans as the
OmegaConf reference (deep copy, ``OmegaConf.update``, resolve), on random suggestions."""

from __future__ import annotations

import copy
import random

import optuna
import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf, open_dict

import blocks
from mad_search import config as config_mod
from mad_search import space as space_mod
from mad_search import sweep as sweep_mod
from mad_search.config import ConfigError, resolve
from mad_search.settings import StudySettings
from mad_search.sweep import plans_for


def _compose(*overrides):
    with initialize_config_module(config_module="conf", version_base="1.3"):
        return compose("config", overrides=["+sweep=layer_patterns", *overrides])


def _reference(cfg, task_cfgs, overrides):
    """The slow, obviously faithful way: OmegaConf all along."""
    trial_cfg = copy.deepcopy(cfg)
    OmegaConf.set_struct(trial_cfg, False)
    for key, value in overrides.items():
        OmegaConf.update(trial_cfg, key, value, merge=False)
    out = []
    for task_cfg in task_cfgs:
        c = copy.deepcopy(trial_cfg)
        c.task = OmegaConf.create(task_cfg)
        plan = resolve(c)
        plan.train.progress = False
        out.append(plan)
    return out


@pytest.mark.parametrize("sweep_tasks", [None, ["in_context_recall", "selective_copying"]])
def test_fast_plans_equal_the_omegaconf_reference_on_random_suggestions(sweep_tasks):
    cfg = _compose("model.d_model=16")
    with open_dict(cfg):
        cfg.search.params["model.d_model"] = {"type": "categorical", "choices": [16, 32]}
        cfg.search.params["train.batch_size"] = {"type": "int", "low": 4, "high": 64}
        if sweep_tasks:
            cfg.study.tasks = sweep_tasks
    task_cfgs = sweep_mod.task_cfgs(cfg, StudySettings.from_config(cfg.study))
    space = OmegaConf.to_container(cfg.search, resolve=True)
    before = OmegaConf.to_container(cfg)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=random.randrange(2**31)))
    for _ in range(6):
        trial = study.ask()
        overrides = space_mod.suggest(trial, space)
        fast = plans_for(cfg, task_cfgs, overrides)
        assert fast == _reference(cfg, task_cfgs, overrides)
        assert len(fast) == len(task_cfgs)
        assert fast[0].d_model == overrides["model.d_model"]
        assert fast[0].train.batch_size == overrides["train.batch_size"]
        study.tell(trial, 0.0)
    assert OmegaConf.to_container(cfg) == before  # the caller's config is left as it was


def test_interpolations_see_the_overridden_values():
    cfg = _compose("model.d_model=16")
    with open_dict(cfg):
        cfg.train.eval_every = "${train.max_steps}"
    task_cfgs = [OmegaConf.to_container(cfg.task, resolve=True)]
    steps = random.randint(2, 50)
    overrides = {"model.pattern": ["mlstm"], "train.max_steps": steps}
    (plan,) = plans_for(cfg, task_cfgs, overrides)
    assert plan.train.max_steps == steps and plan.train.eval_every == steps
    assert [plan] == _reference(cfg, task_cfgs, overrides)


def test_setting_below_a_non_mapping_is_one_clear_line():
    cfg = _compose("model.d_model=16")
    task_cfgs = [OmegaConf.to_container(cfg.task, resolve=True)]
    with pytest.raises(ConfigError) as err:
        plans_for(cfg, task_cfgs, {"model.d_model.width": 3})
    assert "model.d_model is 16, not a mapping" in str(err.value)
    assert "\n" not in str(err.value)


def test_each_block_configuration_is_probed_once_and_a_bad_one_always_fails(monkeypatch):
    calls = []
    real_build = blocks.build

    def counting_build(name, d_model, max_len, **options):
        calls.append((name, d_model, max_len, tuple(sorted(options.items()))))
        return real_build(name, d_model, max_len, **options)

    monkeypatch.setattr(config_mod, "_PROBED", set())
    monkeypatch.setattr(config_mod.blocks, "build", counting_build)
    d_model = random.choice([16, 32, 48])
    model = {"d_model": d_model, "pattern": "mlstm slstm mlstm", "blocks": {}}
    for _ in range(3):
        config_mod.resolve_model(model, 32)
    assert sorted(calls) == [("mlstm", d_model, 32, ()), ("slstm", d_model, 32, ())]
    calls.clear()
    config_mod.resolve_model({**model, "blocks": {"mlstm": {"num_heads": 2}}}, 32)
    assert calls == [("mlstm", d_model, 32, (("num_heads", 2),))]  # new options: built again
    bad = {**model, "blocks": {"mlstm": {"no_such_option": 1}}}
    for _ in range(2):
        with pytest.raises(blocks.BlockError, match="no_such_option"):
            config_mod.resolve_model(bad, 32)


def test_reference_specs_fix_searched_values_and_set_others_once():
    """``{spec: S, key: value}`` references: a searched key is fixed in the enqueued trial, any
    other key is set on that trial's config; enqueueing again adds nothing."""
    lr, batch = random.choice([2e-3, 3e-3, 4e-3]), random.choice([8, 16, 24])
    space = {
        "params": {"train.lr": {"type": "float", "low": 1e-3, "high": 5e-3, "log": True}},
        "reference": [
            {"spec": "(attention swiglu)*2", "train.lr": lr},
            {"spec": "mlstm*2", "train.batch_size": batch},
            "slstm*2",
        ],
    }
    assert len(space_mod.validate(space, blocks.names())) == 3
    study = optuna.create_study(direction="maximize")
    assert sweep_mod._enqueue_references(study, space) == 3
    assert sweep_mod._enqueue_references(study, space) == 0  # still waiting: not again
    got = [space_mod.suggest(study.ask(), space) for _ in range(3)]
    assert got[0]["model.pattern"] == ["attention", "swiglu", "attention", "swiglu"]
    assert got[0]["train.lr"] == lr and "train.batch_size" not in got[0]
    assert got[1]["model.pattern"] == ["mlstm", "mlstm"] and got[1]["train.batch_size"] == batch
    assert 1e-3 <= got[1]["train.lr"] <= 5e-3 and "train.batch_size" not in got[2]
    # a setting that cannot be built is refused at config time, with the reference's plan
    cfg = _compose("search.reference=[{spec: 'mlstm*2', train.batch_size: -3}]")
    with pytest.raises(ConfigError, match="batch_size"):
        sweep_mod.validate_sweep(cfg)


def test_the_default_study_trains_selective_copying_and_a_task_override_replaces_it():
    """The default study's task is selective copying at sequence 64 with 28 tokens to copy
    (README "The default study": a memory load that spreads the xLSTM ratios even at 3x the
    steps); its trial plans resolve on it, and ``task=NAME`` on the command line still swaps
    the task group, keeping the study's sizes."""
    cfg = _compose()
    assert cfg.task.name == "selective_copying" and cfg.task.seq_len == 64
    assert cfg.task.num_tokens_to_copy == 28
    n_blank = cfg.task.seq_len - 2 * cfg.task.num_tokens_to_copy - 1
    assert n_blank == 7  # still blanks to skip: the copy has to select, not just shift
    task = OmegaConf.to_container(cfg.task, resolve=True)
    plans = plans_for(cfg, [task], {"model.pattern": ["attention swiglu"]})
    assert plans[0].task_info.seq_len == 64 and plans[0].task_info.vocab_size == 16
    seq = random.choice([40, 48, 96])
    other = _compose("task=in_context_recall", f"task.seq_len={seq}")
    assert other.task.name == "in_context_recall" and other.task.seq_len == seq
    assert "num_tokens_to_copy" not in other.task
    assert other.task.num_train_examples == cfg.task.num_train_examples == 4096
