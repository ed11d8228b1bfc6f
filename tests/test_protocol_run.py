"""The MAD protocol end to end through the Hogwild pool: runs recorded in an Optuna study,
interrupted and resumed without rerunning finished runs, diverged runs scored 0, scores in
``mad_score.json``; and its bad input as one-line errors before any worker starts."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import optuna
import pytest
from hydra import compose, initialize_config_module
from omegaconf import open_dict
from optuna.trial import TrialState

from mad_search.errors import UserError
from mad_search.protocol import aggregate
from mad_search.protocol_run import score, trials_at_level, validate_protocol

ROOT = Path(__file__).resolve().parents[1]
TINY = (
    "+protocol.levels.tiny={settings: [in_context_recall/baseline, compression/baseline, "
    "memorization/baseline], lrs: [1.0e-3, 1.0e+6], weight_decays: [0.0], d_model: 16, "
    "batch_size: 16, max_steps: 300, max_train_examples: 256, num_test_examples: 64, "
    "eval_every: 50}"
)
# A block that turns non-finite once a weight is far out of range: at lr 1e6 one AdamW step
# does it, at 1e-3 never. So exactly the lr-1e6 runs diverge.
BLOWUP = """
import torch
from blocks import Block, register

@register("blowup")
class Blowup(Block):
    def __init__(self, d_model, max_len, *, block_index=0, num_blocks=1):
        super().__init__(d_model, max_len, block_index=block_index, num_blocks=num_blocks)
        self.lin = torch.nn.Linear(d_model, d_model)

    def mix(self, x):
        y = self.lin(x)
        return y * float("nan") if self.lin.weight.abs().max() > 1e3 else y
"""


def _cli(tmp_path, **kw):
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(tmp_path)]),
        "MAD_SEARCH_CACHE": str(tmp_path / "cache"),
    }
    args = [
        sys.executable,
        "-m",
        "mad_search",
        "+protocol=mad",
        "model.pattern='attention blowup'",
        "model.block_modules=[blowup_plugin]",
        TINY,
        "protocol.level=tiny",
        f"study.storage=sqlite:///{tmp_path}/p.db",
        "hogwild.workers=2",
        "hogwild.threads_per_worker=1",
        f"hydra.run.dir={tmp_path}/run",
    ]
    return subprocess.Popen(
        args,
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        **kw,
    )


def _trials(tmp_path):
    (summary,) = optuna.get_all_study_summaries(f"sqlite:///{tmp_path}/p.db")
    study = optuna.load_study(study_name=summary.study_name, storage=f"sqlite:///{tmp_path}/p.db")
    return study.study_name, study.get_trials()


@pytest.mark.slow
def test_protocol_is_interrupted_and_resumed_without_rerunning_finished_runs(tmp_path):
    (tmp_path / "blowup_plugin.py").write_text(textwrap.dedent(BLOWUP))
    proc = _cli(tmp_path, start_new_session=True)
    t0 = time.time()
    while time.time() - t0 < 240:
        assert proc.poll() is None, proc.stdout.read()
        try:
            _, trials = _trials(tmp_path)
            if any(t.state == optuna.trial.TrialState.COMPLETE for t in trials):
                break
        except Exception:
            pass
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out
    name, trials = _trials(tmp_path)
    assert name == "mad:tiny:attention blowup"
    first = {
        t.number: (t.user_attrs["run"], t.value)
        for t in trials
        if t.state == optuna.trial.TrialState.COMPLETE
    }
    assert 1 <= len(first) < 6, out
    partial = json.loads((tmp_path / "run" / "mad_score.json").read_text())
    assert partial["complete"] is False and partial["mad_score"] is None

    proc = _cli(tmp_path)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    assert f"{len(first)} of 6 runs done" in out
    _, trials = _trials(tmp_path)
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    runs = [t.user_attrs["run"] for t in complete]
    assert len(runs) == len(set(runs)) == 6  # every run once: nothing finished ran twice
    for number, (run, value) in first.items():  # and what was finished is untouched
        (t,) = [t for t in complete if t.number == number]
        assert (t.user_attrs["run"], t.value) == (run, value)
    scores = json.loads((tmp_path / "run" / "mad_score.json").read_text())
    assert scores["complete"] and len(scores["runs"]) == 6
    for r in scores["runs"]:
        if r["lr"] == 1e6:  # diverged: scored 0 with the reason, the protocol went on
            assert r["val_accuracy"] == 0 and r["test_accuracy"] == 0
            assert r["val_accuracy_micro"] == 0 and r["test_accuracy_micro"] == 0
            assert r["stop_reason"].startswith("diverged"), r
        else:
            assert r["val_accuracy"] > 0 and not r["stop_reason"].startswith("diverged")
            # the micro accuracies are kept beside the level's macro ones
            assert 0 < r["val_accuracy_micro"] <= 1 and 0 < r["test_accuracy_micro"] <= 1
    again = aggregate(scores["runs"], tasks=list(scores["tasks"]))
    assert scores["mad_score"] == pytest.approx(again["mad_score"])
    assert {t: v["score"] for t, v in scores["tasks"].items()} == pytest.approx(again["tasks"])
    assert "MAD score" in out and f"{scores['mad_score']:.4f}" in out


def _cfg(*overrides):
    with initialize_config_module(config_module="conf", version_base="1.3"):
        return compose("config", overrides=["+protocol=mad", "pattern=transformer", *overrides])


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (
            ["protocol.level=huge"],
            "protocol.level 'huge' unknown; valid levels: "
            "full, long, long2, quick, quick2, quick_sc2, standard",
        ),
        (["protocol.levels.quick.lrs=[]"], "lrs must be a non-empty list"),
        (["protocol.levels.quick.settings=['in_context_recall/seq_len=99']"], "unknown setting"),
        (["+protocol.levels.quick.max_seq_len=8"], "selects no setting"),
        (["+protocol.levels.quick.tasks=[mqar]"], "has no MAD difficulty grid"),
        (["+protocol.speed=2"], "unknown protocol setting 'speed'"),
        (["protocol.levels.quick.d_model=30", "+model.blocks.attention.num_heads=4"], "num_heads"),
    ],
)
def test_bad_protocol_input_is_one_line_before_any_worker(overrides, fragment):
    with pytest.raises(UserError) as err:
        validate_protocol(_cfg(*overrides))
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_the_packaged_levels_expand_to_their_runs():
    full = validate_protocol(_cfg("protocol.level=full"))
    assert len(full.runs) == 396 and full.d_model == 128
    assert {r.plan.train.batch_size for r in full.runs} == {128}
    # 200 epochs of the baseline's 12,800 examples at batch 128; cosine to 1e-6
    base = [r for r in full.runs if r.setting == "in_context_recall/baseline"]
    assert {r.plan.train.max_steps for r in base} == {20000}
    assert {(r.lr, r.weight_decay) for r in base} == {
        (lr, wd) for lr in (1e-4, 5e-4, 1e-3) for wd in (0.0, 0.1)
    }
    assert all(r.plan.train.schedule == "cosine" and r.plan.train.min_lr == 1e-6 for r in base)
    quick = validate_protocol(_cfg())
    assert quick.level.name == "quick" and {r.setting.split("/")[1] for r in quick.runs} == {
        "baseline"
    }
    assert quick.hogwild.embedding == "private"  # each run its own table
    # quick2 is quick at two model seeds: the same runs, each once more at the next seed
    quick2 = validate_protocol(_cfg("protocol.level=quick2"))
    assert quick2.level.seeds == 2 and quick.level.seeds == 1
    assert [r.id for r in quick2.runs if r.seed == 0] == [r.id for r in quick.runs]
    assert [r.plan for r in quick2.runs if r.seed == 0] == [r.plan for r in quick.runs]
    assert quick2.budgets == {**quick.budgets, **{
        r.id: quick.budgets[r.id.rsplit("|seed=", 1)[0]] for r in quick2.runs if r.seed
    }}
    # quick_sc2 is quick with only selective copying at a second seed
    sc2 = validate_protocol(_cfg("protocol.level=quick_sc2"))
    assert [r.id for r in sc2.runs if r.seed == 0] == [r.id for r in quick.runs]
    assert [r.plan for r in sc2.runs if r.seed == 0] == [r.plan for r in quick.runs]
    assert sc2.budgets == {**quick.budgets, **{
        r.id: quick.budgets[r.id.rsplit("|seed=", 1)[0]] for r in sc2.runs if r.seed
    }}
    assert [(r.task, r.seed, r.plan.model_seed_offset) for r in sc2.runs if r.seed] == [
        ("selective_copying", 1, 1)
    ]
    # long2 is long at two seeds; its second seed's runs train as long's runs at seed + 1 do
    # (the same plan at the same model seed: what bench_results' make_long2.py relies on)
    long, long2 = (validate_protocol(_cfg(f"protocol.level={lv}")) for lv in ("long", "long2"))
    assert long2.level.seeds == 2 and long2.model_seed == long.model_seed == 0
    assert [r.plan for r in long2.runs if r.seed == 0] == [r.plan for r in long.runs]
    long_next = validate_protocol(_cfg("protocol.level=long", "seed=1"))
    assert long_next.model_seed == 1 and long_next.hogwild == long2.hogwild
    assert {r.id + "|seed=1": dataclasses.replace(r.plan, model_seed_offset=1)
            for r in long_next.runs} == {r.id: r.plan for r in long2.runs if r.seed}
    assert {r.id + "|seed=1": long_next.budgets[r.id] for r in long_next.runs} == {
        r.id: long2.budgets[r.id] for r in long2.runs if r.seed}


def test_runs_are_enqueued_longest_first_and_resumed_runs_are_skipped():
    rng = random.Random()
    steps = {t: rng.randrange(50, 5000) for t in ("in_context_recall", "selective_copying")}
    level = (
        "++protocol.levels.quick.per_task={"
        + ", ".join(f"{t}: {{max_steps: {n}}}" for t, n in steps.items())
        + "}"
    )
    protocol = validate_protocol(_cfg(level))
    costs = {
        r.id: r.plan.train.max_steps * r.plan.train.batch_size * r.plan.task_info.seq_len
        for r in protocol.runs
    }
    assert len(set(costs.values())) > 2  # the order is a real choice
    study = optuna.create_study(direction="maximize")
    done = rng.choice(protocol.runs).id
    protocol.prepare(study)
    waiting = study.get_trials(deepcopy=False)
    order = [t.user_attrs["run"] for t in sorted(waiting, key=lambda t: t.number)]
    assert sorted(order) == sorted(costs)
    assert [costs[r] for r in order] == sorted((costs[r] for r in order), reverse=True)
    # a resumed study: one run complete, the others waiting again; only the rest is enqueued
    study2 = optuna.create_study(direction="maximize")
    study2.enqueue_trial({}, user_attrs={"run": done})
    trial = study2.ask()
    study2.tell(trial, 0.5)
    todo, _ = protocol.prepare(study2)
    again = [t.user_attrs["run"] for t in study2.get_trials(states=(TrialState.WAITING,))]
    assert todo == len(costs) - 1 and sorted(again) == sorted(set(costs) - {done})
    assert [costs[r] for r in again] == sorted((costs[r] for r in again), reverse=True)


def _finish_every_waiting_run(protocol, study, rng):
    """Train nothing: tell every enqueued run a random accuracy, as the pool would."""
    while study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        trial = study.ask()
        protocol.plans(trial)  # stamps the budget the run is trained at
        study.tell(trial, rng.random())


def _runs_of(protocol, tasks):
    return sorted(r.id for r in protocol.runs if r.task in tasks)


def test_a_level_change_reruns_only_the_runs_whose_budget_it_changes():
    rng = random.Random()
    steps = rng.randrange(50, 5000)
    protocol = validate_protocol(_cfg(f"protocol.levels.quick.max_steps={steps}"))
    study = optuna.create_study(direction="maximize", study_name="mad:quick:transformer")
    protocol.prepare(study)
    _finish_every_waiting_run(protocol, study, rng)
    n = len(study.get_trials(deepcopy=False))
    # renamed or redescribed, the same budget: nothing to run
    same = validate_protocol(
        _cfg(f"protocol.levels.quick.max_steps={steps}", "protocol.levels.quick.description=x")
    )
    todo, msg = same.prepare(study)
    assert todo == 0 and "not scored" not in msg
    # one task's own budget changed: that task's runs, and only those, are run again
    task = rng.choice(sorted({r.task for r in protocol.runs}))
    other = validate_protocol(
        _cfg(
            f"protocol.levels.quick.max_steps={steps}",
            f"+protocol.levels.quick.per_task.{task}.eval_every={rng.randrange(7, 99)}",
        )
    )
    todo, msg = other.prepare(study)
    again = [t.user_attrs["run"] for t in study.get_trials(states=(TrialState.WAITING,))]
    assert todo == len(_runs_of(other, {task})) and sorted(again) == _runs_of(other, {task})
    assert "\n" not in msg and f"{task}: eval_every" in msg and "run again" in msg
    # the old runs stay in the study but are not scored
    scores = score(other, study)
    assert scores["runs_complete"] == len(other.runs) - todo and not scores["complete"]
    assert {r["task"] for r in scores["runs"]} == {r.task for r in other.runs} - {task}
    _finish_every_waiting_run(other, study, rng)
    assert len(study.get_trials(deepcopy=False)) == n + todo
    assert score(other, study)["complete"] and other.prepare(study)[0] == 0
    # the level's own max_steps: every task but those with their own (quick's per_task)
    own = {t for t, lv in other.level.per_task if t != task}
    assert own  # quick gives selective copying and compression their own steps
    more = validate_protocol(
        _cfg(
            f"protocol.levels.quick.max_steps={steps + 1}",
            f"+protocol.levels.quick.per_task.{task}.eval_every=5",
        )
    )
    todo, msg = more.prepare(study)
    rerun = {r.task for r in more.runs} - own
    assert todo == len(_runs_of(more, rerun)) and f"max_steps {steps} then, {steps + 1} now" in msg


def test_a_study_made_before_runs_recorded_their_budget_resumes_by_its_level():
    rng = random.Random()
    plain = validate_protocol(_cfg("protocol.level=long"))  # a level with no per_task
    study = optuna.create_study(direction="maximize", study_name="mad:long:transformer")
    plain.prepare(study)
    _finish_every_waiting_run(plain, study, rng)
    # as the earlier code recorded it: no budget on the runs, a level without per_task
    legacy = dict(study.user_attrs["protocol_level"])
    del legacy["per_task"]
    old = optuna.create_study(direction="maximize", study_name="mad:long:transformer")
    old.set_user_attr("protocol_level", legacy)
    for t in study.get_trials(deepcopy=False):
        attrs = {k: v for k, v in t.user_attrs.items() if k != "budget"}
        old.add_trial(optuna.trial.create_trial(value=t.value, user_attrs=attrs))
    assert plain.prepare(old)[0] == 0
    task = rng.choice(sorted({r.task for r in plain.runs}))
    changed = validate_protocol(
        _cfg("protocol.level=long", f"+protocol.levels.long.per_task.{task}.max_steps=7")
    )
    todo, msg = changed.prepare(old)
    assert todo == len(_runs_of(changed, {task})) and f"{task}: max_steps 1800 then, 7 now" in msg
    # the level they were trained at is kept, so a later resumption still knows them
    assert old.user_attrs["protocol_level_legacy"] == legacy
    n = len(old.get_trials(deepcopy=False))
    assert changed.prepare(old)[0] == todo and len(old.get_trials(deepcopy=False)) == n
    assert score(plain, old)["complete"]  # the legacy runs score at their own level


TINY_SWEEP_LEVEL = (
    "+protocol.levels.tiny={settings: [in_context_recall/baseline, memorization/baseline], "
    "lrs: [1.0e-3, 3.0e-3], weight_decays: [0.0], d_model: 16, batch_size: 16, max_steps: 30, "
    "max_train_examples: 128, num_test_examples: 32, eval_every: 10}"
)


def _sweep_cfg(tmp_path, *extra):
    with initialize_config_module(config_module="conf", version_base="1.3"):
        cfg = compose(
            "config",
            overrides=[
                "+sweep=layer_patterns",
                "+protocol=mad",
                TINY_SWEEP_LEVEL,
                "protocol.level=tiny",
                "study.n_trials=3",
                "hogwild.workers=2",
                "hogwild.threads_per_worker=1",
                f"study.storage=sqlite:///{tmp_path}/s.db",
                *extra,
            ],
        )
    with open_dict(cfg):  # three layer sequences; the default study's lr parameter stays
        cfg.search.pattern = {"kind": "choice", "choices": ["attention swiglu", "mlstm", "mlstm*2"]}
        cfg.search.reference = []
    return cfg


@pytest.mark.slow
def test_a_sweep_scored_by_a_protocol_level_with_two_objectives(tmp_path, capsys):
    from mad_search.protocol_run import run_protocol_sweep

    summary = run_protocol_sweep(
        _sweep_cfg(tmp_path, "+protocol.objectives=[mad_score,params]"), tmp_path / "run"
    )
    out = capsys.readouterr().out
    assert "note: search.params.train.lr is not used" in out  # the level sets the lr grid
    study = optuna.load_study(study_name="layer_patterns", storage=f"sqlite:///{tmp_path}/s.db")
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"]
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(done) == 3
    for t in done:
        a = t.user_attrs
        tasks_val = [a["mad.in_context_recall.val"], a["mad.memorization.val"]]
        assert t.values[0] == pytest.approx(sum(tasks_val) / 2)  # the objective: validation
        assert a["mad_score_test"] == pytest.approx(
            (a["mad.in_context_recall.test"] + a["mad.memorization.test"]) / 2
        )
        assert t.values[1] == a["params"] > 0
        assert a["embedding"] == "private"
    front = set(summary["pareto_front"])
    assert front and front == {t.number for t in study.best_trials}
    assert (tmp_path / "run" / "pareto_front.png").stat().st_size > 0
    # the report's plots are the study's artifacts, where the printed dashboard command looks
    art = summary["artifacts"]
    assert len(art["ids"]) == len(summary["files"]) - 1  # every plot; results.csv is not one
    assert Path(art["dir"]) == tmp_path / "s.artifacts"
    assert sorted(p.name for p in Path(art["dir"]).iterdir()) == sorted(art["ids"])
    assert f"--artifact-dir {tmp_path / 's.artifacts'}" in out


@pytest.mark.slow
def test_a_single_objective_protocol_sweep_reports_task_scores_as_curves(tmp_path):
    from mad_search.protocol_run import run_protocol_sweep

    run_protocol_sweep(_sweep_cfg(tmp_path, "study.n_trials=2"), tmp_path / "run")
    study = optuna.load_study(study_name="layer_patterns", storage=f"sqlite:///{tmp_path}/s.db")
    for t in study.trials:
        assert t.state == optuna.trial.TrialState.COMPLETE
        a = t.user_attrs
        assert t.intermediate_values == pytest.approx(
            {0: a["mad.in_context_recall.val"], 1: a["mad.memorization.val"]}
        )
        assert t.value == pytest.approx(a["mad_score_val"])


@pytest.mark.parametrize(
    "extra, fragment",
    [
        (["+protocol.objectives=[params]"], "protocol.objectives must be mad_score, then"),
        (["+protocol.objectives=[mad_score,mad_score]"], "protocol.objectives must be"),
        (
            [
                "protocol.levels.quick.d_model=32",
                "+search.params={model.d_model: {type: categorical, choices: [16, 32]}}",
            ],
            "conflicts with protocol level",
        ),
    ],
)
def test_bad_protocol_sweeps_are_one_line(tmp_path, extra, fragment):
    from mad_search.protocol_run import validate_protocol_sweep

    with initialize_config_module(config_module="conf", version_base="1.3"):
        cfg = compose(
            "config",
            overrides=[
                "+sweep=layer_patterns",
                "+protocol=mad",
                *extra,
                f"study.storage=sqlite:///{tmp_path}/s.db",
            ],
        )
    with pytest.raises(UserError) as err:
        validate_protocol_sweep(cfg)
    assert fragment in str(err.value) and "\n" not in str(err.value)


TINY_LEVELS = {
    "tiny": {
        "settings": ["in_context_recall/baseline", "memorization/baseline"],
        "lrs": [1e-3],
        "weight_decays": [0.0],
        "d_model": 16,
        "batch_size": 16,
        "max_steps": 20,
        "max_train_examples": 128,
        "num_test_examples": 32,
        "eval_every": 10,
    },
    "tinyref": {
        "settings": ["in_context_recall/baseline", "memorization/baseline"],
        "lrs": [1e-3, 3e-3],
        "weight_decays": [0.0],
        "d_model": 16,
        "batch_size": 16,
        "max_steps": 40,
        "max_train_examples": 128,
        "num_test_examples": 32,
        "eval_every": 20,
    },
}


@pytest.mark.slow
def test_protocol_benchmark_scores_every_level_and_its_agreement(tmp_path, capsys):
    from mad_search.bench import protocol as bench
    from mad_search.bench import run_benchmark

    patterns = ["attention swiglu", "mlstm", "mlstm slstm"]
    result, path = run_benchmark(
        "protocol",
        {
            "patterns": patterns,
            "levels": ["tiny"],
            "reference": "tinyref",
            "extra_levels": TINY_LEVELS,
        },
        out=tmp_path / "b.json",
    )
    assert json.loads(path.read_text())["benchmark"] == "protocol"
    for level in ("tiny", "tinyref"):
        entry = result["levels"][level]
        assert set(entry["patterns"]) == set(patterns)
        for p in patterns:
            row = entry["patterns"][p]
            assert 0 <= row["mad_score"] <= 1 and row["wall_s"] > 0 and row["trial_hours"] > 0
            assert row["runs"] == 2 * len(TINY_LEVELS[level]["lrs"])
        assert entry["wall_s"] == pytest.approx(
            sum(v["wall_s"] for v in entry["patterns"].values())
        )
    ref = result["levels"]["tinyref"]
    assert ref["kendall_tau_vs_reference"] == pytest.approx(1.0)
    tiny = result["levels"]["tiny"]["patterns"]
    from mad_search.bench._common import kendall_tau_b

    expected = kendall_tau_b(
        [tiny[p]["mad_score"] for p in patterns],
        [ref["patterns"][p]["mad_score"] for p in patterns],
    )
    assert result["levels"]["tiny"]["kendall_tau_vs_reference"] == pytest.approx(expected)
    text = bench.table(result)
    assert all(p in text for p in patterns) and "tau vs tinyref" in text


@pytest.mark.slow
def test_protocol_benchmark_keeps_its_studies_and_resumes_in_a_later_sitting(tmp_path):
    """storage_dir: the cheap level first without a reference, the reference later; the second
    sitting reruns nothing of the first (same scores, same trial-hours), and tau appears."""
    import optuna

    from mad_search.bench import protocol as bench
    from mad_search.bench import run_benchmark

    patterns = ["attention swiglu", "mlstm"]
    opts = {"patterns": patterns, "levels": ["tiny"], "extra_levels": TINY_LEVELS,
            "storage_dir": str(tmp_path / "studies")}
    first, _ = run_benchmark("protocol", {**opts, "reference": ""}, out=tmp_path / "a.json")
    assert first["levels"]["tiny"]["kendall_tau_vs_reference"] is None
    dbs = sorted(p.name for p in (tmp_path / "studies").glob("*.db"))
    assert len(dbs) == 2 and all(name.startswith("tiny__") for name in dbs)
    second, _ = run_benchmark("protocol", {**opts, "reference": "tinyref"},
                              out=tmp_path / "b.json")
    for p in patterns:
        a, b = first["levels"]["tiny"]["patterns"][p], second["levels"]["tiny"]["patterns"][p]
        assert b["mad_score"] == a["mad_score"] and b["trial_hours"] == pytest.approx(
            a["trial_hours"])
        assert b["wall_s"] >= a["wall_s"]  # the sittings add up
    for db in (tmp_path / "studies").glob("tiny__*.db"):  # no run was trained twice
        (summary,) = optuna.get_all_study_summaries(f"sqlite:///{db}")
        assert summary.n_trials == 2 * len(TINY_LEVELS["tiny"]["lrs"])
        pattern, runs = bench.stored_runs(db)  # read back by a script, the same score
        assert aggregate(runs)["mad_score"] == second["levels"]["tiny"]["patterns"][pattern][
            "mad_score"]
    from mad_search.bench._common import kendall_tau_b

    ref = second["levels"]["tinyref"]["patterns"]
    assert second["levels"]["tiny"]["kendall_tau_vs_reference"] == kendall_tau_b(
        [first["levels"]["tiny"]["patterns"][p]["mad_score"] for p in patterns],
        [ref[p]["mad_score"] for p in patterns])


SEEDED_LEVEL = (
    "+protocol.levels.seeded={settings: [memorization/baseline], lrs: [3.0e-3], "
    "weight_decays: [0.0], d_model: 16, batch_size: 16, max_steps: 12, max_train_examples: 64, "
    "num_test_examples: 32, eval_every: 4, target_accuracy: 1.0}"
)


def test_a_levels_later_seeds_train_at_the_next_model_seeds_and_are_averaged(tmp_path):
    """Through the pool: a level with ``seeds: 2`` run at seed s trains its second run exactly
    as the one-seed level does at seed s + 1, and scores the mean of the two."""
    from mad_search.protocol_run import run_protocol

    def run(seed, seeds, name):
        cfg = _cfg(
            SEEDED_LEVEL,
            "protocol.level=seeded",
            f"+protocol.levels.seeded.seeds={seeds}",
            f"seed={seed}",
            f"study.storage=sqlite:///{tmp_path}/{name}.db",
            "hogwild.workers=1",  # one thread throughout: no idle worker lends its own
            "hogwild.threads_per_worker=1",
        )
        scores = run_protocol(cfg, tmp_path / name)
        study = optuna.load_study(
            study_name=scores["study"], storage=f"sqlite:///{tmp_path}/{name}.db"
        )
        curves = {t.user_attrs["seed"]: t.intermediate_values for t in study.trials}
        return scores, curves

    base = random.randrange(1000)
    both, curves = run(base, 2, "both")
    _, later = run(base + 1, 1, "later")
    assert sorted(curves) == [0, 1] and curves[0] != curves[1]  # two inits, two curves
    assert curves[1] == later[0]  # the second seed is the next model seed, nothing else
    (setting,) = both["settings"].values()
    assert setting["seeds"] == 2
    tests = [r["test_accuracy"] for r in both["runs"]]
    assert len(tests) == 2 and both["mad_score"] == pytest.approx(sum(tests) / 2)


def test_runs_off_a_tasks_new_learning_rate_grid_are_not_counted():
    """A level that gives one task another learning rate keeps that task's budget, so its runs
    at the old rate still match the budget: they are kept in the study but neither scored nor
    counted by ``trials_at_level`` (which scripts score resumed studies with)."""
    rng = random.Random()
    lr = rng.choice([6e-3, 2e-3, 1e-2])
    quick = validate_protocol(_cfg())
    moved = validate_protocol(
        _cfg(f"+protocol.levels.quick.per_task.selective_copying.lrs=[{lr}]")
    )
    study = optuna.create_study(direction="maximize", study_name="mad:quick:transformer")
    quick.prepare(study)
    _finish_every_waiting_run(quick, study, rng)
    todo, _ = moved.prepare(study)
    assert todo == len(_runs_of(moved, {"selective_copying"})) > 0  # only the new rate's runs
    counted = trials_at_level(study)
    assert "selective_copying" not in {t.user_attrs["task"] for t in counted}
    assert len(counted) == len(moved.runs) - todo
    _finish_every_waiting_run(moved, study, rng)
    counted = trials_at_level(study)
    assert len(counted) == len(moved.runs) == score(moved, study)["runs_complete"]
    assert {t.user_attrs["lr"] for t in counted if t.user_attrs["task"] == "selective_copying"} \
        == {lr}
    # read back at the old level, the old rate's runs count again and the new rate's do not
    assert len(trials_at_level(study, quick.level)) == len(quick.runs)


def test_a_stored_study_is_read_back_with_the_runs_its_level_counts(tmp_path):
    """``bench.protocol.stored_runs``: a panel's SQLite study read back by a script gives its
    layer sequence and exactly the runs ``trials_at_level`` counts (the old rate's runs of a
    level change left out), and nothing when asked for a level it was not last run at."""
    from mad_search.bench.protocol import stored_runs

    rng = random.Random()
    lr = rng.choice([6e-3, 2e-3, 1e-2])
    quick = validate_protocol(_cfg())
    moved = validate_protocol(
        _cfg(f"+protocol.levels.quick.per_task.selective_copying.lrs=[{lr}]")
    )
    db = tmp_path / "quick__transformer.db"
    study = optuna.create_study(direction="maximize", study_name="mad:quick:transformer",
                                storage=f"sqlite:///{db}")
    quick.prepare(study)
    _finish_every_waiting_run(quick, study, rng)
    moved.prepare(study)
    _finish_every_waiting_run(moved, study, rng)
    pattern, runs = stored_runs(db)
    assert pattern == study.user_attrs["pattern"] == moved.pattern
    assert sorted(r["run"] for r in runs) == sorted(r.id for r in moved.runs)
    values = {t.user_attrs["run"]: t.value for t in trials_at_level(study)}
    assert {r["run"]: r["val_accuracy"] for r in runs} == values
    assert len(study.trials) > len(runs)  # the old rate's run is stored, not counted
    assert stored_runs(db, level="quick")[1] == runs
    assert stored_runs(db, level="long") is None


def test_a_one_seed_study_grows_a_second_seed_and_shrinks_back():
    rng = random.Random()
    quick = validate_protocol(_cfg())
    quick2 = validate_protocol(_cfg("protocol.level=quick2"))
    study = optuna.create_study(direction="maximize", study_name="mad:quick:transformer")
    quick.prepare(study)
    _finish_every_waiting_run(quick, study, rng)
    # resumed with two seeds: only the second seed's runs are new
    todo, _ = quick2.prepare(study)
    waiting = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
    assert todo == len(quick.runs) == len(waiting)
    assert {t.user_attrs["seed"] for t in waiting} == {1}
    _finish_every_waiting_run(quick2, study, rng)
    assert score(quick2, study)["complete"] and len(trials_at_level(study)) == len(quick2.runs)
    # read back at one seed, the second seed's runs are not counted
    assert quick.prepare(study)[0] == 0
    assert len(trials_at_level(study)) == len(quick.runs)
    assert score(quick, study)["runs_complete"] == len(quick.runs)
    # interrupted with second-seed runs still waiting, then resumed at one seed: those runs
    # are failed as superseded, not started (the pool would find no plan for them)
    other = optuna.create_study(direction="maximize", study_name="mad:quick:transformer")
    quick2.prepare(other)
    n_waiting = len(other.get_trials(deepcopy=False, states=(TrialState.WAITING,)))
    assert quick.prepare(other)[0] == len(quick.runs)
    waiting = other.get_trials(deepcopy=False, states=(TrialState.WAITING,))
    failed = other.get_trials(deepcopy=False, states=(TrialState.FAIL,))
    assert sorted(t.user_attrs["run"] for t in waiting) == sorted(r.id for r in quick.runs)
    assert len(failed) == n_waiting - len(quick.runs) and all(
        t.user_attrs["seed"] == 1 and "superseded" in t.user_attrs for t in failed
    )
