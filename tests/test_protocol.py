"""The MAD protocol's scoring and levels: aggregation on fabricated run results against values
computed by hand, level checks, setting selection and budgets."""

from __future__ import annotations

import math
import random

import pytest

from mad_search import tasks
from mad_search.errors import ConfigError
from mad_search.protocol import MAD_TASKS, Level, aggregate, run_id, select_settings


def _run(task, setting, lr, wd, val, test, stop="max_steps", seed=0):
    return {
        "task": task,
        "setting": setting,
        "lr": lr,
        "weight_decay": wd,
        "val_accuracy": val,
        "test_accuracy": test,
        "stop_reason": stop,
        "seed": seed,
    }


def test_aggregation_matches_hand_computed_scores():
    runs = [
        # recall/a: best validation is lr 5e-4 (val 0.9) -> its test 0.85 counts, not the 0.95
        # test of the run with the lower validation accuracy
        _run("recall", "recall/a", 1e-4, 0.0, 0.5, 0.95),
        _run("recall", "recall/a", 5e-4, 0.0, 0.9, 0.85),
        _run("recall", "recall/a", 5e-4, 0.1, 0.0, 0.0, stop="diverged: non-finite loss"),
        # recall/b: a single run
        _run("recall", "recall/b", 1e-3, 0.1, 0.4, 0.35),
        # copy/a: diverged runs count 0; the finite one wins
        _run("copy", "copy/a", 1e-4, 0.0, float("nan"), float("nan"), stop="diverged: nan"),
        _run("copy", "copy/a", 1e-3, 0.0, 0.2, 0.3),
    ]
    out = aggregate(runs)
    assert out["settings"]["recall/a"]["score"] == 0.85
    assert out["settings"]["recall/a"]["lr"] == 5e-4
    assert out["tasks"] == {"recall": (0.85 + 0.35) / 2, "copy": 0.3}
    assert math.isclose(out["mad_score"], ((0.85 + 0.35) / 2 + 0.3) / 2)
    # what a search optimises: the same selection, validation accuracies
    assert out["tasks_val"] == {"recall": (0.9 + 0.4) / 2, "copy": 0.2}
    assert math.isclose(out["mad_score_val"], ((0.9 + 0.4) / 2 + 0.2) / 2)


def test_aggregation_on_random_results_equals_a_slow_reference():
    rng = random.Random()
    runs = []
    for t in range(rng.randint(1, 4)):
        for s in range(rng.randint(1, 5)):
            for lr in (1e-4, 5e-4, 1e-3):
                for wd in (0.0, 0.1):
                    runs.append(_run(f"t{t}", f"t{t}/s{s}", lr, wd, rng.random(), rng.random()))
    rng.shuffle(runs)
    out = aggregate(runs)
    # reference: group, pick the max validation by sorting, average in two stages
    task_means = {}
    for task in sorted({r["task"] for r in runs}):
        scores = []
        for setting in sorted({r["setting"] for r in runs if r["task"] == task}):
            group = [r for r in runs if r["setting"] == setting]
            scores.append(sorted(group, key=lambda r: -r["val_accuracy"])[0]["test_accuracy"])
        task_means[task] = sum(scores) / len(scores)
    assert out["tasks"] == pytest.approx(task_means)
    assert out["mad_score"] == pytest.approx(sum(task_means.values()) / len(task_means))


def test_seeds_of_one_pair_are_averaged_before_the_best_pair_is_selected():
    runs = [
        # lr 1e-3: seeds at val 0.2 and 0.8 (mean 0.5), test 0.3 and 0.7 (mean 0.5)
        _run("recall", "recall/a", 1e-3, 0.0, 0.2, 0.3, seed=0),
        _run("recall", "recall/a", 1e-3, 0.0, 0.8, 0.7, seed=1),
        # lr 3e-3: val 0.6 and 0.5 (mean 0.55) wins although its best seed is lower;
        # test 0.1 and 0.0 (mean 0.05)
        _run("recall", "recall/a", 3e-3, 0.0, 0.6, 0.1, seed=0),
        _run("recall", "recall/a", 3e-3, 0.0, 0.5, 0.0, seed=1),
        # lr 5e-3: the best seed of all (0.9), but the other diverged: it counts 0 (mean 0.45)
        _run("recall", "recall/a", 5e-3, 0.0, 0.9, 0.9, seed=0),
        _run("recall", "recall/a", 5e-3, 0.0, float("nan"), float("nan"), "diverged: nan", 1),
    ]
    out = aggregate(runs)
    assert out["settings"]["recall/a"]["lr"] == 3e-3 and out["settings"]["recall/a"]["seeds"] == 2
    assert out["mad_score"] == pytest.approx(0.05) and out["mad_score_val"] == pytest.approx(0.55)
    # random: the same as grouping by hand, averaging, then taking the best mean validation
    rng = random.Random()
    n_seeds = rng.randint(2, 4)
    runs = [
        _run(f"t{t}", f"t{t}/s{s}", lr, 0.0, rng.random(), rng.random(), seed=k)
        for t in range(rng.randint(1, 3))
        for s in range(rng.randint(1, 3))
        for lr in (1e-3, 3e-3)
        for k in range(n_seeds)
    ]
    rng.shuffle(runs)
    want = {}
    for setting in {r["setting"] for r in runs}:
        means = []
        for lr in (1e-3, 3e-3):
            group = [r for r in runs if r["setting"] == setting and r["lr"] == lr]
            assert len(group) == n_seeds
            means.append(
                (sum(r["val_accuracy"] for r in group) / n_seeds,
                 sum(r["test_accuracy"] for r in group) / n_seeds)
            )
        want[setting] = max(means)[1]
    got = aggregate(runs)["settings"]
    assert {k: v["score"] for k, v in got.items()} == pytest.approx(want)


def test_a_levels_seeds_repeat_each_run_at_the_next_model_seeds():
    from mad_search.protocol_run import expand_runs

    n = random.randint(2, 3)
    node = {**FULL, "settings": "baseline", "tasks": ["memorization", "compression"],
            "lrs": [1e-3, 3e-3], "weight_decays": [0.0], "d_model": 16, "max_steps": 9}
    one, _ = expand_runs(Level.from_config("x", node), {"pattern": "mlstm"}, {})
    many, _ = expand_runs(Level.from_config("x", {**node, "seeds": n}), {"pattern": "mlstm"}, {})
    assert len(many) == n * len(one) and len({r.id for r in many}) == len(many)
    # the first seed's runs keep the names (and so the studies) runs had without seeds
    assert [r.id for r in many if r.seed == 0] == [r.id for r in one]
    for r in many:
        assert r.plan.model_seed_offset == r.seed and (r.seed == 0) == ("seed=" not in r.id)
        twin = next(o for o in one if (o.setting, o.lr) == (r.setting, r.lr))
        assert r.plan.train == twin.plan.train and r.plan.seed == twin.plan.seed  # same data
    # one task's own seeds (per_task): that task's runs repeated, the others once
    task = random.choice(node["tasks"])
    mixed, _ = expand_runs(
        Level.from_config("x", {**node, "per_task": {task: {"seeds": n}}}), {"pattern": "mlstm"}, {}
    )
    assert sorted(r.id for r in mixed if r.seed == 0) == sorted(r.id for r in one)
    assert {r.task for r in mixed if r.seed} == {task}
    assert len(mixed) == len(one) + (n - 1) * sum(r.task == task for r in one)


def test_a_task_without_runs_leaves_the_mad_score_open():
    out = aggregate([_run("a", "a/x", 1e-3, 0.0, 0.5, 0.5)], tasks=["a", "b"])
    assert out["tasks"] == {"a": 0.5, "b": None} and out["mad_score"] is None


FULL = {
    "tasks": list(MAD_TASKS),
    "settings": "all",
    "lrs": [1e-4, 5e-4, 1e-3],
    "weight_decays": [0.0, 0.1],
    "d_model": 128,
    "batch_size": 128,
    "epochs": 200,
}


def test_full_level_is_mad_labs_grid_of_396_runs():
    level = Level.from_config("full", FULL)
    entries = select_settings(level, tasks.grid())
    assert len(entries) == 66
    assert len(entries) * len(level.lrs) * len(level.weight_decays) == 396
    # 200 epochs of 12,800 examples at batch 128 (100 steps an epoch); memorization: 256 -> 2
    assert level.steps(12800) == 20000 and level.steps(256) == 400


def test_cheap_level_caps_sizes_and_filters_settings():
    n_train = random.choice([512, 1024, 2048])
    level = Level.from_config(
        "cheap",
        {
            **FULL,
            "settings": "baseline",
            "max_seq_len": 128,
            "max_train_examples": n_train,
            "num_test_examples": 64,
            "epochs": 3,
            "max_steps": 50,
        },
    )
    entries = select_settings(level, tasks.grid())
    # selective copying's baseline is seq 256: filtered out
    assert [e["task"] for e in entries] == [t for t in MAD_TASKS if t != "selective_copying"]
    for e in entries:
        s = e["settings"]
        assert s["num_train_examples"] == min(
            n_train, tasks.grid(e["task"])[0]["settings"]["num_train_examples"]
        )
        assert s["num_test_examples"] == s["num_valid_examples"] == 64
        assert e["id"].endswith("/baseline")
    assert level.steps(n_train) == min(50, 3 * math.ceil(n_train / 128))


@pytest.mark.parametrize(
    "change, fragment",
    [
        ({"lrs": []}, "lrs must be a non-empty list"),
        ({"lrs": [0.0]}, "lrs must hold numbers > 0"),
        ({"weight_decays": [-0.1]}, "weight_decays must hold numbers >= 0"),
        ({"tasks": ["mqar"]}, "has no MAD difficulty grid"),
        ({"settings": "most"}, "settings must be all, baseline or a list"),
        ({"settings": []}, "settings is an empty list"),
        ({"epochs": None}, "needs a budget"),
        ({"epochs": 0}, "epochs must be a positive number"),
        ({"batch_size": 0}, "batch_size must be a positive integer"),
        ({"speed": "fast"}, "unknown setting 'speed' in protocol.levels.x"),
        ({"accuracy": "weighted"}, "accuracy must be macro or micro"),
        ({"warmup_steps": -1}, "warmup_steps must be an integer >= 0"),
        ({"warmup_steps": 1.5}, "warmup_steps must be an integer >= 0"),
        ({"per_task": ["selective_copying"]}, "per_task must map task names to settings"),
        ({"per_task": {"mqar": {"max_steps": 5}}}, "per_task names 'mqar', which the level"),
        ({"per_task": {"compression": {}}}, "per_task.compression must map settings"),
        ({"per_task": {"compression": {"d_model": 32}}}, "cannot set 'd_model'; valid:"),
        ({"per_task": {"compression": {"max_steps": 0}}},
         "protocol.levels.x.per_task.compression.max_steps must be a positive integer"),
        ({"per_task": {"compression": {"lrs": []}}}, "per_task.compression.lrs must be a non"),
        ({"seeds": 0}, "protocol.levels.x.seeds must be a positive integer"),
        ({"per_task": {"compression": {"seeds": 0}}}, "per_task.compression.seeds must be a"),
    ],
)
def test_bad_levels_are_one_line_errors(change, fragment):
    with pytest.raises(ConfigError) as err:
        Level.from_config("x", {**FULL, **change})
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_unknown_setting_id_is_named():
    level = Level.from_config("x", {**FULL, "settings": ["in_context_recall/vocab_size=33"]})
    with pytest.raises(ConfigError, match="unknown setting 'in_context_recall/vocab_size=33'"):
        select_settings(level, tasks.grid())


def test_run_ids_are_stable_and_distinct():
    ids = {
        run_id(s, lr, wd)
        for s in ("a/baseline", "a/x=1")
        for lr in (1e-4, 5e-4)
        for wd in (0.0, 0.1)
    }
    assert len(ids) == 8 and run_id("a/baseline", 5e-4, 0.1) == "a/baseline|lr=0.0005|wd=0.1"


def test_runs_score_with_the_levels_average_not_the_single_run_default():
    """mad-lab's numbers are macro accuracies: a level scores its runs with its own ``accuracy``
    (macro unless it says otherwise), whatever ``train.accuracy`` a single run would use."""
    from mad_search.protocol_run import expand_runs

    cheap = {**FULL, "settings": ["in_context_recall/baseline"], "max_steps": 5, "d_model": 16}
    for level_avg, train_avg in (("macro", "micro"), ("micro", "macro")):
        node = cheap if level_avg == "macro" else {**cheap, "accuracy": level_avg}
        level = Level.from_config("x", node)
        runs, _ = expand_runs(level, {"pattern": "mlstm"}, {"accuracy": train_avg})
        assert runs and {r.plan.train.accuracy for r in runs} == {level_avg}


def test_a_levels_warm_up_reaches_every_run_and_mad_labs_levels_have_none():
    from mad_search.protocol_run import expand_runs

    warmup = random.randint(1, 200)
    cheap = {**FULL, "settings": ["in_context_recall/baseline"], "max_steps": 5, "d_model": 16}
    level = Level.from_config("x", {**cheap, "warmup_steps": warmup})
    runs, _ = expand_runs(level, {"pattern": "mlstm"}, {})
    assert runs and {r.plan.train.warmup_steps for r in runs} == {warmup}
    runs, _ = expand_runs(Level.from_config("x", cheap), {"pattern": "mlstm"}, {})
    assert {r.plan.train.warmup_steps for r in runs} == {0}


def test_per_task_budgets_reach_their_tasks_runs_and_only_theirs():
    """A level's ``per_task`` settings (here a longer budget, its own learning rates and data
    cap for selective copying) go to that task's runs; every other task keeps the level's."""
    from mad_search.protocol_run import expand_runs

    steps, longer = random.randint(5, 50), random.randint(60, 500)
    lrs = sorted(random.sample([1e-3, 2e-3, 3e-3, 5e-3], 2))
    cap = random.choice([256, 512])
    node = {**FULL, "settings": "baseline", "max_steps": steps, "d_model": 16,
            "tasks": ["in_context_recall", "selective_copying"], "lrs": [1e-3],
            "weight_decays": [0.0], "epochs": None,  # max_steps alone sets the budget
            "max_train_examples": 1024, "warmup_steps": 3,
            "per_task": {"selective_copying": {"max_steps": longer, "lrs": lrs,
                                               "max_train_examples": cap, "eval_every": 7}}}
    level = Level.from_config("x", node)
    assert level.for_task("in_context_recall") is level
    runs, probes = expand_runs(level, {"pattern": "mlstm"}, {})
    by_task = {}
    for r in runs:
        by_task.setdefault(r.task, []).append(r)
    (recall,) = by_task["in_context_recall"]
    assert (recall.lr, recall.plan.train.max_steps) == (1e-3, steps)
    assert recall.plan.task_settings["num_train_examples"] == 1024
    copying = by_task["selective_copying"]
    assert [r.lr for r in copying] == lrs
    for r in copying:
        t = r.plan.train
        assert (t.max_steps, t.eval_every, t.warmup_steps) == (longer, 7, 3)  # warm-up inherited
        assert r.plan.task_settings["num_train_examples"] == cap
        assert r.plan.d_model == 16
