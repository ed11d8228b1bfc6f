"""One-model Hogwild (``train.workers=W``): shared parameters really shared, one worker equal to
the serial run, two workers learning, staleness and collision counters against hand-computed
schedules, non-finite updates never written, Ctrl-C keeping the shared model's checkpoint."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from mad_search import tasks
from mad_search.config import resolve
from mad_search.errors import ConfigError
from mad_search.hogwild.one_model import (
    Counters,
    HogwildFailed,
    HogwildSteps,
    parameter_groups,
    shared_model,
    train_hogwild,
)
from mad_search.train import train_plan

ROOT = Path(__file__).resolve().parents[1]


def _plan(workers=None, task=None, model=None, **train):
    task = {"name": "text", "seq_len": 32, "num_train_examples": 256, "num_test_examples": 64,
            **(task or {})}
    cfg = {"task": task, "seed": int(torch.randint(0, 1000, ()).item()), "threads": 1,
           "model": {"d_model": 32, "pattern": "mlstm slstm", "sparse_embedding": True,
                     **(model or {})},
           "train": {"max_steps": 24, "batch_size": 8, "eval_every": 8, "lr": 3e-3,
                     "warmup_steps": 4, "embedding_optimizer": "sparse_adam", "progress": False,
                     "workers": workers, **train}}
    return resolve(cfg)


def _data(plan):
    return tasks.as_tensors(tasks.build(plan.task_name, seed=plan.seed, **plan.task_settings))


def test_one_worker_equals_the_serial_run_with_the_same_seed_and_optimisers():
    serial = _plan()
    hog = _plan(1, seed=serial.train.seed)
    hog.seed = serial.seed
    data = _data(serial)
    torch.set_num_threads(1)
    model_s, res_s = train_plan(serial, data)
    model_h, run = train_hogwild(hog, data)
    res_h = run.result
    assert [h["loss"] for h in res_h.history] == [h["loss"] for h in res_s.history]
    assert [h["step"] for h in res_h.history] == [h["step"] for h in res_s.history]
    assert (res_h.val_loss, res_h.test_loss, res_h.best_step) == \
        (res_s.val_loss, res_s.test_loss, res_s.best_step)
    for (name, a), b in zip(model_s.state_dict().items(), model_h.state_dict().values()):
        assert torch.equal(a, b), name
    assert run.hogwild["updates"] == serial.train.max_steps
    for g in run.hogwild["groups"].values():  # alone: nothing comes between a read and a write
        assert g["tau_max"] == 0 and g["collision_rate"] == 0


def _probe(slot: int, model, written, done, results) -> None:
    """Write a mark into every shared parameter, wait for the others' marks, read them all."""
    params = list(model.parameters())
    with torch.no_grad():
        for p in params:
            p.view(-1)[slot] = 1000.0 + slot
    written.wait()  # a barrier: every worker has written
    seen = [[float(p.view(-1)[s]) for s in range(2)] for p in params]
    results.put((slot, seen, all(p.is_shared() for p in params)))
    done.wait()


def test_shared_parameters_are_really_shared_between_worker_processes():
    plan = _plan(2)
    model = shared_model(plan)
    ctx = mp.get_context("spawn")
    written, done, results = ctx.Barrier(3), ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_probe, args=(s, model, written, done, results))
             for s in range(2)]
    for p in procs:
        p.start()
    written.wait(timeout=120)
    got = [results.get(timeout=60) for _ in procs]
    done.set()
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    for slot, seen, shared in got:  # each worker sees both workers' writes: no copy was made
        assert shared
        assert all(row == [1000.0, 1001.0] for row in seen), slot
    for p in model.parameters():  # and so does the parent, in the tensors it built
        assert p.view(-1)[:2].tolist() == [1000.0, 1001.0]


def test_two_workers_learn_a_small_text_task_and_count_every_update():
    plan = _plan(2, max_steps=120, eval_every=40, lr=1e-2, warmup_steps=10)
    data = _data(plan)
    _, run = train_hogwild(plan, data)
    res, hog = run.result, run.hogwild
    first = res.history[0]["loss"]
    assert res.val_loss < 0.75 * math.log(plan.task_info.vocab_size)  # well below chance
    assert res.val_loss < first
    assert math.isfinite(res.test_loss)
    assert sum(hog["updates_per_worker"]) == hog["updates"] >= plan.train.max_steps
    assert all(n > 0 for n in hog["updates_per_worker"])  # both workers wrote
    assert hog["updates"] <= plan.train.max_steps + 1  # at most one update per other worker over
    groups = hog["groups"]
    assert list(groups) == parameter_groups(shared_model(plan))
    assert all(g["updates"] == hog["updates"] for g in groups.values())
    assert groups["embedding"]["rows_per_update"] > 0
    assert res.selected_by == "loss" and res.val_perplexity == pytest.approx(math.exp(res.val_loss))


def _steps(plan, model, counters, slot):
    return HogwildSteps(model, plan.train, plan.task_info.num_classes, counters, slot)


def test_staleness_and_collisions_follow_a_hand_computed_schedule():
    """Two workers interleaved by hand in one process: A reads, B reads, A writes, B reads
    again, B writes its first gradient, A reads, B writes its second, A writes."""
    plan = _plan(2)
    model = shared_model(plan)
    groups = parameter_groups(model)
    counters = Counters(groups, 2, plan.task_info.vocab_size)
    a, b = _steps(plan, model, counters, 0), _steps(plan, model, counters, 1)
    # token rows: A's batches use rows {1, 2}, B's first {2, 3}, B's second {5}, A's second {1}
    x_a1, x_b1 = torch.tensor([[1, 2, 1, 2]]), torch.tensor([[2, 3, 3, 2]])
    x_b2, x_a2 = torch.tensor([[5, 5, 5, 5]]), torch.tensor([[1, 1, 1, 1]])
    y = torch.tensor([[4, 4, 4, 4]])
    _, a1 = a.compute(x_a1, y, 1)
    _, b1 = b.compute(x_b1, y, 1)
    a.write(a1, 1.0, 1.0)  # clock 0 at its read, 0 at its write: tau 0
    _, b2 = b.compute(x_b2, y, 2)  # read at clock 1
    b.write(b1, 1.0, 1.0)  # read at 0, written at 1: tau 1, by A: staleness 1; row 2 collided
    _, a2 = a.compute(x_a2, y, 2)  # read at clock 2
    b.write(b2, 1.0, 1.0)  # read at 1, written at 2: tau 1, but the update between was B's own
    a.write(a2, 1.0, 1.0)  # read at 2, written at 3: tau 1, staleness 1 (B's); row 1 untouched
    for g in groups:
        sa, sb = a.stats[g], b.stats[g]
        assert (sa.updates, sa.tau_sum, sa.tau_max, sa.stale_sum, sa.collided) == (2, 1, 1, 1, 1)
        assert (sb.updates, sb.tau_sum, sb.tau_max, sb.stale_sum, sb.collided) == (2, 2, 1, 1, 1)
    ea, eb = a.stats["embedding"], b.stats["embedding"]
    assert (ea.rows, ea.collided_rows) == (2 + 1, 0)
    assert (eb.rows, eb.collided_rows) == (2 + 1, 1)  # row 2 of its first batch: A wrote it
    assert counters.clock() == 4 and counters.writes.sum(dim=1).tolist() == [4] * len(groups)
    assert counters.row_touches[[1, 2, 3, 5]].tolist() == [2, 2, 1, 1]
    assert counters.row_writer[[1, 2, 3, 5]].tolist() == [0, 1, 1, 1]


def test_an_injected_delay_writes_each_gradient_that_many_updates_late():
    plan = _plan(1, delay=3)
    model = shared_model(plan)
    counters = Counters(parameter_groups(model), 1, plan.task_info.vocab_size)
    steps = _steps(plan, model, counters, 0)
    x = torch.randint(0, plan.task_info.vocab_size, (4, 32))
    taus = []
    for i in range(8):
        before = steps.stats["blocks.0"].tau_sum
        steps.step(x, x, 1.0, 1.0, i + 1)
        if counters.clock() > len(taus):
            taus.append(steps.stats["blocks.0"].tau_sum - before)
    # the first write comes after 3 computed-but-unwritten steps; reads from then on are 3 behind
    assert counters.clock() == 8 - 3
    assert taus == [0, 1, 2, 3, 3]
    assert steps.stats["blocks.0"].stale_sum == 0  # all its own updates: no other worker


def test_a_non_finite_update_is_never_written_and_stops_the_worker_after_too_many():
    plan = _plan(1, max_nonfinite=2)
    model = shared_model(plan)
    counters = Counters(parameter_groups(model), 1, plan.task_info.vocab_size)
    steps = _steps(plan, model, counters, 0)
    x = torch.randint(0, plan.task_info.vocab_size, (4, 32))
    steps.step(x, x, 1.0, 1.0, 1)
    assert counters.clock() == 1
    with torch.no_grad():  # one input row huge: its activations overflow to inf / nan
        model.embedding.weight[x[0, 0]] = 3e38
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for i in range(2):
        steps.step(x, x, 1.0, 1.0, 2 + i)
    for k, v in model.state_dict().items():  # nothing was written, not even finite parts
        assert torch.equal(v, before[k]), k
    assert counters.clock() == 1 and int(counters.refused[0]) == 2
    with pytest.raises(HogwildFailed, match="3 updates refused"):
        steps.step(x, x, 1.0, 1.0, 4)


def test_private_blocks_control_shares_only_the_embedding():
    plan = _plan(2, share="embedding", max_steps=16, eval_every=8)
    _, run = train_hogwild(plan, _data(plan))
    hog = run.hogwild
    assert hog["share"] == "embedding"
    # each worker ran the judged model's number of steps on its own blocks
    assert run.result.steps == plan.train.max_steps
    for g, s in hog["groups"].items():
        if g != "embedding":  # nobody else writes a worker's private blocks
            assert s["staleness_max"] == 0 and s["collision_rate"] == 0


@pytest.mark.parametrize("override,expected", [
    ("train.workers=0", "train.workers must be a positive integer or null"),
    ("train.share=blocks", "train.share must be all or embedding"),
    ("train.delay=-1", "train.delay must be an integer >= 0"),
    ("train.delay=2", "train.share and train.delay apply to one-model Hogwild only"),
])
def test_bad_settings_fail_at_config_time_with_one_line(override, expected):
    from hydra import compose, initialize_config_module

    with initialize_config_module("conf", version_base="1.3"):
        cfg = compose("config", overrides=["task=text", override])
    with pytest.raises(ConfigError, match=expected):
        resolve(cfg)


def test_workers_above_the_cores_are_allowed_with_a_warning(capsys):
    from mad_search.settings import available_cores

    workers = available_cores() + 1
    plan = _plan(workers, max_steps=6, eval_every=6)
    _, run = train_hogwild(plan, _data(plan))
    assert "oversubscription" in capsys.readouterr().err
    assert run.hogwild["workers"] == workers and run.result.steps >= 6
    # and the default dense AdamW on the embedding became the sparse SparseAdam
    from hydra import compose, initialize_config_module

    with initialize_config_module("conf", version_base="1.3"):
        cfg = compose("config", overrides=["task=text", "train.workers=2"])
    plan = resolve(cfg)
    assert plan.sparse_embedding and plan.train.embedding_optimizer == "sparse_adam"
    assert plan.train.schedule == "backoff"  # the paper's constant step with back-off
    with initialize_config_module("conf", version_base="1.3"):
        serial = resolve(compose("config", overrides=["task=text"]))
        chosen = resolve(compose("config", overrides=["task=text", "train.workers=2",
                                                      "train.schedule=cosine"]))
    assert serial.train.schedule == "cosine" and chosen.train.schedule == "cosine"
    with initialize_config_module("conf", version_base="1.3"):
        cfg = compose("config", overrides=["task=text", "train.workers=2", "backend=mlx"])
    with pytest.raises(ConfigError, match="torch workers only"):
        resolve(cfg)


def _cli(args, tmp_path, **kw):
    env = dict(os.environ, MAD_SEARCH_CACHE=str(tmp_path / "cache"), PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, "-m", "mad_search", *args], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


TINY = ["task=text", "task.seq_len=32", "task.num_train_examples=256",
        "task.num_test_examples=64", "model.d_model=32", "pattern=xlstm_1_1",
        "train.batch_size=8", "train.progress=false"]


def test_the_cli_trains_one_model_with_workers_and_reports_per_group(tmp_path):
    out_dir = tmp_path / "run"
    proc = _cli([*TINY, "train.workers=2", "train.max_steps=20", "train.eval_every=10",
                 f"hydra.run.dir={out_dir}"], tmp_path)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    res = json.loads((out_dir / "results.json").read_text())
    assert res["hogwild"]["workers"] == 2
    assert set(res["hogwild"]["groups"]) >= {"embedding", "blocks.0", "blocks.1", "head"}
    assert res["selected_by"] == "loss" and res["steps"] >= 20


def test_ctrl_c_stops_every_worker_and_keeps_the_shared_models_checkpoint(tmp_path):
    out_dir = tmp_path / "run"
    proc = _cli([*TINY, "train.workers=2", "train.max_steps=100000", "train.eval_every=10",
                 "train.progress=true", f"hydra.run.dir={out_dir}"], tmp_path,
                start_new_session=True,
                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 240
    while time.time() < deadline:  # wait for the first validation line
        line = proc.stdout.readline()
        if line.startswith("update "):
            break
    else:
        proc.kill()
        pytest.fail("no validation line")
    children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True,
                              text=True).stdout.split()
    assert len(children) >= 2
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole group
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    state = torch.load(out_dir / "checkpoint.pt")
    assert "embedding.weight" in state and all(torch.isfinite(v).all() for v in state.values()
                                               if v.is_floating_point())
    assert (out_dir / "best.pt").exists()
    assert "checkpoint.pt" in stderr
    time.sleep(1)
    for pid in children:  # no worker left behind
        assert not Path(f"/proc/{pid}").exists() or \
            "zombie" in Path(f"/proc/{pid}/status").read_text().lower()


@pytest.mark.slow
def test_hogwild_train_benchmark_writes_every_run_the_staleness_curve_and_a_png(tmp_path,
                                                                                monkeypatch):
    """bench hogwild_train at toy sizes: the shape of its JSON and PNG (timings never asserted)."""
    import mad_search.bench as bench

    monkeypatch.setenv("MAD_SEARCH_CACHE", str(tmp_path / "cache"))
    argv = ["hogwild_train", "paragraphs=300", "vocab_size=300", "d_model=16", "seq_len=16",
            "num_train_examples=256", "num_valid_examples=32", "batch_size=8", "max_steps=20",
            "eval_every=10", "warmup_steps=2", "backoff_steps=10", "workers=[1,2]",
            "private_workers=[2]", "ddp_workers=[2]", "staleness_delays=[0,3]",
            "staleness_max_steps=30", "target_margin=0.5", f"out={tmp_path}"]
    assert bench.main(argv) == 0
    result = json.loads((tmp_path / "bench_hogwild_train.json").read_text())
    assert set(result["runs"]) == {"serial", "hogwild_1", "hogwild_2", "private_2", "ddp_2"}
    for name, r in result["runs"].items():
        assert r["curve"] and math.isfinite(r["best_val_loss"]), name
        assert r["peak_pss_mb"] > 0 and r["tokens_per_s"] > 0
    assert result["runs"]["hogwild_2"]["hogwild"]["workers"] == 2
    assert result["runs"]["ddp_2"]["processes"] == 2
    assert result["target_loss"] == pytest.approx(1.5 * result["runs"]["serial"]["best_val_loss"])
    points = result["staleness"]["points"]
    assert [p["delay"] for p in points if p["workers"] == 1][:2] == [0, 3]
    delayed = next(p for p in points if p["delay"] == 3)
    assert 0 < delayed["tau_mean"] <= 3
    png = tmp_path / "bench_hogwild_train.png"
    assert png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("extra", [["+sweep=layer_patterns"], ["+protocol=mad"]])
def test_workers_inside_a_study_or_protocol_are_one_line(tmp_path, extra):
    proc = _cli([*extra, "train.workers=2", f"hydra.run.dir={tmp_path / 'run'}",
                 f"study.storage=sqlite:///{tmp_path}/s.db"], tmp_path)
    _, stderr = proc.communicate(timeout=300)
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, stderr
    assert len(lines) == 1 and lines[0].startswith("error: train.workers trains one model")
