"""The search benchmarks (scaling, vs_independent, sharing): their helpers, and smoke runs at tiny
sizes that check the shape of the JSON each one writes. Timings are never asserted."""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
import time

import pytest

import mad_search.bench as bench
from mad_search.bench import _common as common
from mad_search.bench import scaling

# the default study's task (selective copying) at a tiny size: 4 tokens to copy fit 32 positions
TINY_TASK = "{seq_len: 32, num_tokens_to_copy: 4, num_train_examples: 256, num_test_examples: 64}"
TINY_TRAIN = "{batch_size: 8}"


def _pairwise_tau_b(x, y):
    """Kendall's tau-b straight from its definition: every pair, one at a time."""
    n = len(x)
    concordant = discordant = ties_x = ties_y = 0
    for i in range(n):
        for j in range(i + 1, n):
            dx, dy = x[i] - x[j], y[i] - y[j]
            if dx == 0 and dy == 0:
                ties_x += 1
                ties_y += 1
            elif dx == 0:
                ties_x += 1
            elif dy == 0:
                ties_y += 1
            elif (dx > 0) == (dy > 0):
                concordant += 1
            else:
                discordant += 1
    n0 = n * (n - 1) // 2
    denominator = math.sqrt((n0 - ties_x) * (n0 - ties_y))
    return None if denominator == 0 else (concordant - discordant) / denominator


def test_kendall_tau_b_matches_pairwise_definition_on_random_rankings_with_ties():
    rng = random.Random()
    for _ in range(300):
        n = rng.randint(2, 40)
        levels_x, levels_y = rng.randint(1, n), rng.randint(1, n)  # few levels: many ties
        x = [rng.randint(0, levels_x) for _ in range(n)]
        y = [rng.randint(0, levels_y) / 7 for _ in range(n)]
        want, got = _pairwise_tau_b(x, y), common.kendall_tau_b(x, y)
        if want is None:
            assert got is None, (x, y, got)
        else:
            assert got == pytest.approx(want, abs=1e-12), (x, y)


def test_kendall_tau_b_known_values():
    # scipy.stats.kendalltau's documented example (tau-b with ties)
    x, y = [12, 2, 1, 12, 2], [1, 4, 7, 1, 0]
    assert common.kendall_tau_b(x, y) == pytest.approx(-0.47140452079103173, abs=1e-12)
    ranks = random.sample(range(50), 20)
    assert common.kendall_tau_b(ranks, ranks) == pytest.approx(1.0)
    assert common.kendall_tau_b(ranks, [-r for r in ranks]) == pytest.approx(-1.0)
    assert common.kendall_tau_b([0.3, 0.3, 0.3], [1, 2, 3]) is None  # undefined: all tied
    assert common.kendall_tau_b([1.0], [2.0]) is None
    with pytest.raises(ValueError, match="equal length"):
        common.kendall_tau_b([1, 2], [1])


def test_ranking_puts_best_first_and_slope_fits_a_line():
    ranked = common.ranking({"a": 0.2, "b": 0.9, "c": 0.5})
    assert [r["pattern"] for r in ranked] == ["b", "c", "a"]
    assert [r["rank"] for r in ranked] == [1, 2, 3]
    a, b = random.uniform(-5, 5), random.uniform(-100, 100)
    xs = [1, 2, 4, 8]
    assert common.slope(xs, [a * x + b for x in xs]) == pytest.approx(a)
    assert common.slope([1], [3.0]) is None


def test_pss_of_a_process_tree_counts_the_children():
    mine = common.read_pss(os.getpid())
    assert mine is not None and mine["Pss"] > 0
    assert set(mine) >= {"Pss", "Pss_Anon", "Pss_File"}
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        deadline = time.time() + 10
        while child.pid not in common.descendants([os.getpid()]) and time.time() < deadline:
            time.sleep(0.05)
        assert child.pid in common.descendants([os.getpid()])
        sampler = common.PeakPss(lambda: [child.pid], interval=0.05)
        sampler.start()
        time.sleep(0.3)
        memory = sampler.stop()
        assert memory["samples"] >= 2 and memory["processes_at_peak"] == 1
        assert memory["peak_pss_mb"] > 0
    finally:
        child.kill()
        child.wait()
    assert common.read_pss(child.pid) is None  # gone: no numbers, no error


def test_study_config_enqueues_exactly_the_trial_list(tmp_path):
    patterns = common.trial_patterns(["mlstm*2", "(attention swiglu)*2"], 3)
    assert patterns == ["mlstm*2", "(attention swiglu)*2", "mlstm*2"]
    cfg = common.compose_study_config(
        patterns=patterns,
        storage=f"sqlite:///{tmp_path}/s.db",
        study_name="x",
        d_model=32,
        workers=2,
        embedding="private",
        task_settings={"seq_len": 32},
        train={"max_steps": 4},
    )
    assert list(cfg.search.reference) == patterns
    assert list(cfg.search.pattern.choices) == ["mlstm*2", "(attention swiglu)*2"]
    assert cfg.study.n_trials == 3 and cfg.study.sampler.name == "random"
    assert dict(cfg.study.pruner) == {"name": "none"}
    assert cfg.hogwild.workers == 2 and cfg.hogwild.embedding == "private"
    assert cfg.model.d_model == 32 and cfg.task.seq_len == 32 and cfg.train.max_steps == 4
    with pytest.raises(bench.BenchError, match="pattern 'mlstm nope'"):
        common.check_patterns(["mlstm nope"])


def test_inprocess_baseline_trains_the_trial_list_deterministically(tmp_path):
    cfg = common.compose_study_config(
        patterns=["attention swiglu", "mlstm"],
        storage=f"sqlite:///{tmp_path}/s.db",
        study_name="x",
        d_model=16,
        task_settings={"seq_len": 16, "num_tokens_to_copy": 4, "num_train_examples": 64,
                       "num_test_examples": 16},
        train={"max_steps": 2, "eval_every": 2, "batch_size": 4},
    )
    first = common.run_inprocess(cfg, n_jobs=1, threads=1)
    assert first["complete"] == first["trials"] == 2
    assert [r["pattern"] for r in first["per_trial"]] == ["attention swiglu", "mlstm"]
    assert first["tokens"] == 2 * 2 * 4 * 16  # trials x steps x batch x seq_len
    assert first["trials_per_hour"] > 0 and first["tokens_per_s"] > 0
    # same seeds, same trials: the threaded run trains the same models to the same accuracy.
    # Threads race, so try a few times (a thread resolving its plan while the other seeded and
    # initialised once moved the shared global RNG in about one run in three).
    for _ in range(3):
        again = common.run_inprocess(cfg, n_jobs=2, threads=1)
        assert [r["val_accuracy"] for r in again["per_trial"]] == pytest.approx(
            [r["val_accuracy"] for r in first["per_trial"]]
        )


@pytest.mark.parametrize(
    "name, override, fragment",
    [
        ("scaling", "workers=[0]", "workers must be positive"),
        ("scaling", "trials=0", "trials must be at least 1"),
        ("vs_independent", "storage=redis", "storage must be journal or sqlite"),
        ("sharing", "patterns=[mlstm,mlstm,attention]", "must not repeat"),
        ("sharing", "patterns=[mlstm]", "at least 2"),
        ("agreement", "lrs=[0]", "lrs must be a non-empty list of positive numbers"),
        ("agreement", "steps_factor=0", "steps_factor must be positive"),
    ],
)
def test_bad_options_are_one_line_errors(name, override, fragment, capsys):
    assert bench.main([name, override]) == 2
    err = capsys.readouterr().err.strip()
    assert fragment in err and "\n" not in err


def _run(name, tmp_path, *args):
    out = tmp_path / f"bench_{name}.json"
    assert bench.main([name, *args, f"out={out}"]) == 0
    result = json.loads(out.read_text())
    assert result["benchmark"] == name
    return result


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@pytest.mark.slow
def test_scaling_smoke_writes_every_key(tmp_path):
    result = _run(
        "scaling",
        tmp_path,
        "workers=[1,2]",
        "sizes=[16]",
        "trials=2",
        "max_steps=2",
        f"task_settings={TINY_TASK}",
        f"train={TINY_TRAIN}",
        "patterns=[attention swiglu,mlstm]",
    )
    assert "speedup_2" in scaling.table(result)
    for key in ("speedup_2", "speedup_vs_serial", "accuracy_diff_2_vs_1", "speedup_vs_serial_min"):
        assert _is_number(result[key]), key
    assert set(result["workers"]) == {"1", "2"}
    for rec in result["workers"].values():
        for key in ("trials_per_hour", "tokens_per_s", "wall_s"):
            assert _is_number(rec[key]) and rec[key] > 0, key
        assert 0.0 <= rec["mean_accuracy"] <= 1.0 and rec["complete"] == 2
    size = result["by_size"]["16"]
    assert size["serial"]["threads"] == common.available_cores()
    assert size["optuna_n_jobs"]["n_jobs"] == 2 and size["optuna_n_jobs"]["complete"] == 2
    assert isinstance(result["serial_baseline"], str) and isinstance(result["met"], dict)
    # the pool trained the fixed trial list, in order
    assert [r["pattern"] for r in size["pool"]["2"]["per_trial"]] == ["attention swiglu", "mlstm"]


def test_vs_independent_alternates_order_and_sums_rounds(monkeypatch, tmp_path):
    """repeats=N runs both setups N times per W in ABBA order; the ratio is over summed times."""
    from mad_search.bench import vs_independent as vi

    calls, rng = [], random.Random()

    def fake(setup):
        def run(tmp, tag, *args):
            wall, complete = rng.uniform(10, 100), rng.randint(1, 8)
            calls.append((setup, tag))
            return {
                "wall_s": wall,
                "span_s": wall - rng.uniform(1, 5),
                "start_s": rng.uniform(1, 5),
                "until_exit_s": wall + 1,
                "trials": complete,
                "complete": complete,
                "trials_per_hour": 3600.0 * complete / wall,
                "tokens": 100 * complete,
                "tokens_per_s": 100 * complete / wall,
                "mean_trial_tokens_per_s": rng.uniform(1, 2),
                "mean_accuracy": rng.random(),
                "per_trial": [{"tag": tag}],
                "memory": {"peak_pss_mb": rng.uniform(1, 9)},
                "cpu": {
                    "elapsed_s": wall,
                    "ours_cores": 1.0,
                    "others_cores": 0.0,
                    "machine_busy_cores": 1.0,
                },
            }

        return run

    monkeypatch.setattr(vi, "_run_pool", fake("pool"))
    monkeypatch.setattr(vi, "_run_independent", fake("independent"))
    opts = {"workers": [1, 2], "threads_per_worker": 0}
    out = vi._phase(tmp_path, "t", None, ["mlstm"], opts, cores=2, repeats=3)
    order = [setup for setup, _ in calls]
    assert order == ["pool", "independent", "independent", "pool", "pool", "independent"] * 2
    assert len({tag for _, tag in calls}) == len(calls)  # every run its own study
    for k, w in enumerate(("1", "2")):
        res = out[w]
        assert [r["order"] for r in res["rounds"]] == [
            ["pool", "independent"],
            ["independent", "pool"],
            ["pool", "independent"],
        ]
        for setup in ("pool", "independent"):
            runs = res[setup]["runs"]
            first_tag = next(tag for st, tag in calls[6 * k : 6 * k + 6] if st == setup)
            assert len(runs) == 3 and res[setup]["per_trial"] == [{"tag": first_tag}]
            wall = sum(r["wall_s"] for r in runs)
            assert res[setup]["wall_s"] == pytest.approx(wall)
            assert res[setup]["trials_per_hour"] == pytest.approx(
                3600.0 * sum(r["complete"] for r in runs) / wall
            )
            assert res[setup]["memory"]["peak_pss_mb"] == max(
                r["memory"]["peak_pss_mb"] for r in runs
            )
        assert res["throughput_ratio"] == pytest.approx(
            res["pool"]["trials_per_hour"] / res["independent"]["trials_per_hour"]
        )
        spans = {s: sum(r["span_s"] for r in res[s]["runs"]) for s in ("pool", "independent")}
        done = {s: sum(r["complete"] for r in res[s]["runs"]) for s in ("pool", "independent")}
        assert res["trial_phase_ratio"] == pytest.approx(
            (done["pool"] / spans["pool"]) / (done["independent"] / spans["independent"])
        )
        for rnd, p, i in zip(res["rounds"], res["pool"]["runs"], res["independent"]["runs"]):
            assert rnd["throughput_ratio"] == pytest.approx(
                p["trials_per_hour"] / i["trials_per_hour"]
            )
    # one round: the run's own record, unchanged
    calls.clear()
    one = vi._phase(
        tmp_path, "u", None, ["mlstm"], {"workers": [2], "threads_per_worker": 1}, cores=2
    )
    assert "runs" not in one["2"]["pool"] and len(one["2"]["rounds"]) == 1


@pytest.mark.slow
def test_vs_independent_smoke_writes_every_key(tmp_path):
    result = _run(
        "vs_independent",
        tmp_path,
        "workers=[1,2]",
        "trials=2",
        "max_steps=2",
        "d_model=16",
        "vocab_size=300",
        "seq_len=16",
        "batch_size=4",
        "patterns=[attention swiglu]",
        "task_settings={num_train_examples: 64, num_test_examples: 16}",
        "throughput_steps=2",
        "throughput_patterns=[mlstm]",
        f"throughput_task_settings={TINY_TASK}",
        "repeats=2",
    )
    for key in (
        "throughput_ratio",
        "table_mb",
        "pss_per_extra_worker_pool_mb",
        "pss_per_extra_worker_independent_mb",
        "pss_saving_per_extra_worker_mb",
    ):
        assert _is_number(result[key]), key
    assert result["table_mb"] == pytest.approx(300 * 16 * 4 / 2**20)
    assert result["task"]["vocab_size"] == 300 and result["task"]["rows_used_by_data"] <= 300
    for w in ("1", "2"):
        for setup in ("pool", "independent"):
            rec = result["by_workers"][w][setup]
            assert rec["complete"] == 2, rec["per_trial"]
            assert rec["memory"]["peak_pss_mb"] > 0 and rec["trials_per_hour"] > 0
    # two independent processes really ran, each with its own trial
    pids = {r["worker"] for r in result["by_workers"]["2"]["independent"]["per_trial"]}
    assert len(pids) == 2
    # the throughput phase ran the default study's trials (its task and width), both ways
    assert result["config"]["throughput_trial_patterns"] == ["mlstm", "mlstm"]
    for w in ("1", "2"):
        phase = result["throughput_by_workers"][w]
        assert result["throughput_ratio_by_workers"][w] == phase["throughput_ratio"]
        assert [r["order"][0] for r in phase["rounds"]] == ["pool", "independent"]
        for setup in ("pool", "independent"):
            # two rounds, summed: 2 trials each
            # 2 rounds x 2 trials x 2 steps x sequence 32 x the default study's batch of 64
            assert phase[setup]["complete"] == 4 and phase[setup]["tokens"] == 2 * 2 * 2 * 32 * 64
            assert [r["complete"] for r in phase[setup]["runs"]] == [2, 2]
    assert result["throughput_ratio"] == result["throughput_by_workers"]["2"]["throughput_ratio"]
    for w in ("1", "2"):
        assert _is_number(result["trial_phase_ratio_by_workers"][w])
        for setup in ("pool", "independent"):
            rec = result["throughput_by_workers"][w][setup]
            assert 0 < rec["start_s"] < rec["wall_s"]


@pytest.mark.slow
def test_sharing_smoke_writes_both_rankings_and_tau(tmp_path):
    patterns = ["attention swiglu", "mlstm", "swiglu"]
    result = _run(
        "sharing",
        tmp_path,
        "max_steps=2",
        "d_model=16",
        f"task_settings={TINY_TASK}",
        f"train={TINY_TRAIN}",
        f"patterns=[{','.join(patterns)}]",
    )
    assert result["kendall_tau"] is None or -1.0 <= result["kendall_tau"] <= 1.0
    for key in ("ranking_shared", "ranking_private"):
        assert sorted(r["pattern"] for r in result[key]) == sorted(patterns)
        assert [r["rank"] for r in result[key]] == [1, 2, 3]
    assert result["patterns_compared"] == 3 and result["left_out"] == []
    assert result["shared"]["complete"] == result["private"]["complete"] == 3


@pytest.mark.slow
def test_agreement_smoke_scores_each_pattern_twice_and_compares_the_rankings(tmp_path):
    config = (
        "{task.seq_len: 32, task.num_tokens_to_copy: 4, task.num_train_examples: 256, "
        "task.num_test_examples: 64, "
        "model.d_model: 16, train.max_steps: 4, train.eval_every: 2, train.batch_size: 8, "
        "train.warmup_steps: 1, study.n_trials: 4, hogwild.workers: 2, "
        "hogwild.threads_per_worker: 1}"
    )
    result = _run("agreement", tmp_path, f"config={config}", "steps_factor=2", "lrs=[1e-3]")
    assert result["study_trials"] == 4
    assert result["config"]["reference_steps"] == 8
    rows = result["per_pattern"]
    assert len(rows) >= 2 and result["patterns_compared"] == len(rows)
    assert all(0 <= r["study"] <= 1 and 0 <= r["reference"] <= 1 for r in rows)
    assert [r["study"] for r in rows] == sorted((r["study"] for r in rows), reverse=True)
    # one reference run per layer sequence and learning rate, each its own table
    assert result["reference"]["trials"] == len(rows)
    tau = result["kendall_tau"]
    assert tau is None or -1.0 <= tau <= 1.0
    assert result["attention_study_score"] == next(
        r["study"] for r in rows if r["pattern"] == "(attention swiglu)*2"
    )


def test_agreement_compares_rounded_rankings_and_counts_pairs_ordered_alike():
    from mad_search.bench.agreement import compare

    rng = random.Random()
    rows = [{"pattern": str(i), "study": rng.random(), "reference": rng.random()}
            for i in range(rng.randint(3, 12))]
    got = compare(rows, 2)
    x = [round(r["study"], 2) for r in rows]
    y = [round(r["reference"], 2) for r in rows]
    assert got["kendall_tau"] == pytest.approx(_pairwise_tau_b(x, y))
    n = len(rows)
    alike = sum(
        (x[i] > x[j]) - (x[i] < x[j]) == (y[i] > y[j]) - (y[i] < y[j])
        for i in range(n) for j in range(i + 1, n)
    )
    assert got["pair_agreement"] == pytest.approx(alike / (n * (n - 1) // 2))
    # every pattern solved on both sides: tau-b undefined, the rankings identical
    solved = [{"pattern": p, "study": 0.9951 + 0.004 * rng.random(), "reference": 0.9996}
              for p in "abc"]
    got = compare(solved, 2)
    assert got["kendall_tau"] is None and got["pair_agreement"] == 1.0
    # one side tells a difference the other does not: not identical
    solved[0]["study"] = 0.5
    assert compare(solved, 2)["pair_agreement"] == pytest.approx(1 / 3)
