"""``python -m mad_search`` behaves as a Hydra app; user errors are one line, no traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(args, cwd, env_extra=None, timeout=300):
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env_extra or {})}
    return subprocess.run(
        [sys.executable, "-m", "mad_search", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_help_lists_config_groups(tmp_path):
    out = _run(["--help"], tmp_path)
    assert out.returncode == 0, out.stderr
    for group in ("task:", "pattern:", "study:", "hogwild:", "sweep:"):
        assert group in out.stdout
    assert "in_context_recall" in out.stdout and "xlstm_7_1" in out.stdout


def test_cfg_job_prints_the_composed_config(tmp_path):
    out = _run(
        ["--cfg", "job", "task=selective_copying", "pattern=xlstm_7_1", "model.d_model=64"],
        tmp_path,
    )
    assert out.returncode == 0, out.stderr
    assert "name: selective_copying" in out.stdout
    assert "pattern: xlstm(7:1)" in out.stdout
    assert "d_model: 64" in out.stdout


def test_single_run_writes_results_json(tmp_path):
    out = _run(
        [
            "task=selective_copying",
            "pattern=xlstm_7_1",
            "model.d_model=32",
            "train.max_steps=4",
            "train.eval_every=2",
            "train.batch_size=8",
            "task.seq_len=64",
            "task.num_tokens_to_copy=4",
            "task.num_train_examples=64",
            "task.num_test_examples=32",
            "train.progress=false",
            f"hydra.run.dir={tmp_path}/run",
        ],
        tmp_path,
        {"MAD_SEARCH_CACHE": str(tmp_path / "cache")},
    )
    assert out.returncode == 0, out.stderr
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    for key in ("val_accuracy", "test_accuracy", "steps", "tokens_per_s", "pattern", "params"):
        assert key in res
    assert res["pattern"] == "mlstm*7 slstm" and res["steps"] == 4
    assert 0 <= res["test_accuracy"] <= 1 and res["params"] > 0
    assert "test_accuracy" in out.stdout


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["model.pattern='mlstm*2 slstn'"], "unknown block 'slstn'"),
        (["model.pattern='(mlstm slstm'"], "expected ')'"),
        (["model.pattern='xlstm(0:0)'"], "has no blocks"),
        (["model.pattern='xlstm(depth=4, slstm_at=[7])'"], "out of range"),
        (["task=mqar", "task.num_kv_pairs=40", "task.seq_len=64"], "num_kv_pairs"),
        (["task=in_context_recall", "task.vocab_size=2"], "vocab_size"),
        (["model.d_model=0"], "model.d_model must be a positive integer"),
        (["train.max_steps=-1"], "train.max_steps must be a positive integer"),
        (["task=text", "task.files=/nonexistent/*.txt"], "files"),
        (["+model.blocks.mlstm.num_heads=5", "model.pattern=mlstm"], "num_heads"),
        (["train.embedding_optimizer=sparse_adam"], "model.sparse_embedding=true"),
    ],
)
def test_user_errors_are_one_line_without_traceback(tmp_path, args, fragment):
    out = _run([*args, f"hydra.run.dir={tmp_path}/run"], tmp_path)
    assert out.returncode == 2, (out.stdout, out.stderr)
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith("error: ") and fragment in lines[0], lines[0]
    assert "Traceback" not in out.stderr + out.stdout
    assert not (tmp_path / "run" / "results.json").exists()


@pytest.mark.slow
def test_plain_install_works_from_another_directory(tmp_path):
    """Configs are package data: a non-editable install finds them from anywhere."""
    target = tmp_path / "site"
    pip = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(target),
            str(ROOT),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert pip.returncode == 0, pip.stderr
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(target)}
    out = subprocess.run(
        [sys.executable, "-m", "mad_search", "--cfg", "job", "pattern=transformer"],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "(attention swiglu)*2" in out.stdout
    probe = subprocess.run(
        [sys.executable, "-c", "import conf, mad_search; print(conf.__file__)"],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
    )
    assert str(target) in probe.stdout
