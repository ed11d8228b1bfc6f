"""The benchmark command: option parsing, error handling, and a tiny blocks benchmark run.

Timings are never asserted; only the shape of the JSON the benchmark writes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import blocks
import mad_search.bench as bench
from mad_search.bench import _official_xlstm

TINY = [
    "d_model=32",
    "num_heads=4",
    "batch=2",
    "seq_lens=[16]",
    "warmup=0",
    "iters=1",
    "threads=1",
    "study_size=false",
]
ROW_KEYS = {"block", "d_model", "batch", "seq_len", "tokens_per_s", "ms_per_iter", "params"}
ROW_KEYS |= {"state_size", "source"}


def _run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    code = bench.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_parse_overrides_reads_ints_floats_bools_and_lists():
    got = bench.parse_overrides(
        ["seq_lens=[128,256]", "iters=3", "lr=5e-4", "official=false", "blocks=[mlstm,slstm]"]
    )
    assert got == {
        "seq_lens": [128, 256],
        "iters": 3,
        "lr": 5e-4,
        "official": False,
        "blocks": ["mlstm", "slstm"],
    }


def test_resolve_options_accepts_a_scalar_for_a_list_and_rejects_wrong_types():
    defaults = {"seq_lens": [128], "iters": 9, "blocks": []}
    assert bench.resolve_options("x", defaults, {"seq_lens": 64, "blocks": "mlstm"}) == {
        "seq_lens": [64],
        "iters": 9,
        "blocks": ["mlstm"],
    }
    with pytest.raises(bench.BenchError, match="iters must be an integer"):
        bench.resolve_options("x", defaults, {"iters": 2.5})
    with pytest.raises(bench.BenchError, match="unknown option 'iter'"):
        bench.resolve_options("x", defaults, {"iter": 2})


def test_output_path_is_a_json_file_a_directory_or_the_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert bench.output_path("blocks") == tmp_path / "bench_blocks.json"
    assert bench.output_path("blocks", tmp_path / "d") == tmp_path / "d" / "bench_blocks.json"
    assert bench.output_path("blocks", "r.json") == Path("r.json")


def test_blocks_benchmark_writes_a_row_per_block_and_length_and_official_ratios(tmp_path, capsys):
    code, out, err = _run_cli(["blocks", *TINY, "seq_lens=[8,16]", f"out={tmp_path}"], capsys)
    assert code == 0, err
    result = json.loads((tmp_path / "bench_blocks.json").read_text())

    assert result["benchmark"] == "blocks"
    assert {"config", "machine", "official", "rows", "ratio_vs_official"} <= set(result)
    assert result["config"]["seq_lens"] == [8, 16]
    assert result["config"]["threads"] == 1
    assert {"torch", "threads", "cpu_count"} <= set(result["machine"])

    ours = [r for r in result["rows"] if r["source"] == "mad_search"]
    assert sorted((r["block"], r["seq_len"]) for r in ours) == sorted(
        (name, s) for name in blocks.names() for s in (8, 16)
    )
    for row in result["rows"]:
        assert ROW_KEYS <= set(row)
        assert row["tokens_per_s"] > 0 and row["ms_per_iter"] > 0 and row["params"] > 0
        assert row["state_size"] is None or row["state_size"] >= 0
    assert "tokens/s" in out and all(name in out for name in blocks.names())

    usable, status = _official_xlstm.status()
    assert result["official"] == status
    official = {(r["block"], r["seq_len"]) for r in result["rows"] if r["source"] != "mad_search"}
    if usable:
        twins = [n for n in _official_xlstm.NAMES if n in blocks.names()]  # mlstm, slstm
        assert official == {(f"official_xlstm.{n}", s) for n in twins for s in (8, 16)}
        assert set(result["ratio_vs_official"]) == set(twins)
        for name in twins:
            ratios = result["ratio_vs_official"][name]
            assert set(ratios) == {"8", "16"} and all(v > 0 for v in ratios.values())
    else:
        assert official == set() and result["ratio_vs_official"] is None


def test_blocks_benchmark_times_the_default_studys_size_first(tmp_path, capsys):
    """study_size=true: rows at the default study's width, batch and input length (composed
    from +sweep=layer_patterns), then the requested width; official blocks at the latter only."""
    from mad_search.bench.blocks import _study_size

    argv = ["blocks", *TINY[:-1], "blocks=[mlstm,swiglu]", "iters=1", f"out={tmp_path}"]
    code, out, err = _run_cli(argv, capsys)
    assert code == 0, err
    rows = json.loads((tmp_path / "bench_blocks.json").read_text())["rows"]
    study = _study_size()
    assert study == {"d_model": 32, "batch": 64, "seq_len": 64}  # conf/sweep/layer_patterns.yaml
    sizes = [(r["block"], r["d_model"], r["batch"], r["seq_len"]) for r in rows]
    assert sizes[:2] == [("mlstm", 32, 64, 64), ("swiglu", 32, 64, 64)]
    assert ("mlstm", 32, 2, 16) in sizes and ("swiglu", 32, 2, 16) in sizes
    assert all(r["seq_len"] == 16 for r in rows if r["source"] != "mad_search")
    assert "d_model" in out and " 64 " in out


def test_blocks_benchmark_says_so_when_the_official_package_is_missing(
    tmp_path, capsys, monkeypatch
):
    monkeypatch.setitem(sys.modules, "xlstm", None)  # makes `import xlstm` raise ImportError
    code, out, err = _run_cli(["blocks", *TINY, "blocks=[slstm]", f"out={tmp_path}"], capsys)
    assert code == 0, err
    result = json.loads((tmp_path / "bench_blocks.json").read_text())
    assert result["official"].startswith("not installed:")
    assert result["ratio_vs_official"] is None
    assert [r["block"] for r in result["rows"]] == ["slstm"]
    assert "not installed" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["nope"], "unknown benchmark 'nope'; valid: agreement, blocks"),
        (["blocks", "batch=abc"], "option batch must be an integer"),
        (["blocks", "frobnicate=1"], "unknown option 'frobnicate'"),
        (["blocks", "seq_lens=[128,"], "option seq_lens: cannot read value"),
        (["blocks", "iters"], "expected key=value"),
        (["blocks", "iters=0"], "option iters must be at least 1"),
        (["blocks", "blocks=[nosuch]"], "unknown block 'nosuch'; valid blocks:"),
        (["blocks", "block_options=[1]"], "option block_options must be a mapping"),
        (["blocks", "block_options={nosuch: {}}"], "block_options names block 'nosuch'"),
        (["blocks", *TINY, "block_options={swiglu: {bogus: 1}}"], "block 'swiglu'"),
    ],
)
def test_bad_benchmark_or_option_is_one_line_on_stderr_with_exit_code_2(argv, message, capsys):
    code, out, err = _run_cli(argv, capsys)
    assert code == 2
    assert message in err
    assert len(err.strip().splitlines()) == 1 and out == ""


def test_module_command_exits_2_without_traceback(tmp_path):
    root = Path(bench.__file__).resolve().parents[2]  # the directory that holds mad_search/
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.run(
        [sys.executable, "-m", "mad_search.bench", "nope"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "unknown benchmark 'nope'" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not list(tmp_path.iterdir())  # nothing written


def test_step_benchmark_at_a_mad_task_size_lists_the_top_operators(tmp_path, capsys):
    """bench step task=... d_model=... batch_size=...: the task at its baseline setting (not the
    default study's resized one), the given width and batch, and top=N operators per pattern."""
    d_model, batch = 8 * int(torch.randint(2, 5, ()).item()), int(torch.randint(4, 9, ()).item())
    argv = ["step", "patterns=[hyena swiglu]", "task=compression", f"d_model={d_model}",
            f"batch_size={batch}", "steps=1", "warmup=0", "top=3", f"out={tmp_path}"]
    code, out, err = _run_cli(argv, capsys)
    assert code == 0, err
    result = json.loads((tmp_path / "bench_step.json").read_text())
    cfg = result["config"]
    assert (cfg["task"], cfg["d_model"], cfg["batch_size"]) == ("compression", d_model, batch)
    assert cfg["seq_len"] == 32  # compression's baseline (conf/task/compression.yaml)
    (row,) = result["rows"]
    assert len(row["top"]) == 3 and row["top"][0]["ms"] >= row["top"][-1]["ms"] > 0
    assert "operators by self CPU time" in out
    code, _, err = _run_cli(["step", "task=nope", f"out={tmp_path / 'x'}"], capsys)
    assert code == 2 and "option task must be one of" in err and "Traceback" not in err


def test_step_benchmark_profiles_a_step_by_kind_of_work(tmp_path, capsys):
    """bench step: a row per pattern at the default study's sizes, the shares of every kind
    adding up to 1, and the operator names sorted into the documented kinds."""
    from mad_search.bench.step import KINDS, kind_of

    argv = ["step", "patterns=[mlstm*2,attention swiglu]", "steps=2", "warmup=1", f"out={tmp_path}"]
    code, out, err = _run_cli(argv, capsys)
    assert code == 0, err
    result = json.loads((tmp_path / "bench_step.json").read_text())
    assert [r["pattern"] for r in result["rows"]] == ["mlstm*2", "attention swiglu"]
    assert result["config"]["d_model"] == 32 and result["config"]["batch_size"] == 64
    for row in result["rows"]:
        assert row["ms_per_step"] > 0 and set(row["share"]) == set(KINDS)
        assert abs(sum(row["share"].values()) - 1) < 1e-9
        assert row["share"]["matmul"] > 0 and row["share"]["optimiser"] > 0
    mlstm, attention = result["rows"]
    from blocks.attention import _native_attention_library
    from blocks.ops import _native_conv_library

    # the mLSTM's convolutions and the attention run as C kernels where they are built, else as
    # torch's kernels
    conv_kind = "native" if _native_conv_library() is not None else "conv"
    attention_kind = "native" if _native_attention_library() is not None else "attention"
    assert mlstm["share"][conv_kind] > 0 and attention["share"][attention_kind] > 0
    assert "mlstm*2" in out and "optimiser" in out
    assert kind_of("aten::bmm") == "matmul" and kind_of("aten::convolution_backward") == "conv"
    assert kind_of("aten::_fused_adamw_") == "optimiser" and kind_of("aten::cat") == "copies"
    assert kind_of("aten::exp") == "elementwise" and kind_of("aten::view") == "other"
    assert kind_of("autograd::engine::evaluate_function: MulBackward0") == "other"
    assert kind_of("_NativeSelectiveScanBackward") == "native"
