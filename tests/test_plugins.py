"""Third-party block types and tasks: found through the ``mad_search.blocks`` and
``mad_search.tasks`` entry-point groups (an entry point names a module, or a class / factory
registered under the entry point's name) or a module path in the config, blocks checked against
the block contract on first build, never needing an edit inside ``mad_search/`` or ``blocks/``."""

from __future__ import annotations

import importlib
import json
import os
import random
import shutil
import subprocess
import sys
import textwrap
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path

import optuna
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import blocks
from blocks import registry
from mad_search import plugins, tasks

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "mad_search_plugin_example"
TINY = [
    "task.seq_len=32", "task.num_train_examples=64", "task.num_test_examples=32",
    "train.max_steps=4", "train.eval_every=2", "train.batch_size=8", "model.d_model=32",
    "train.progress=false",
]


def _run(args, cwd, tmp_path, *paths, timeout=300):
    """``python -m mad_search`` from ``cwd`` with the repo and ``paths`` on PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if k != "MAD_SEARCH_SKIP_CONTRACT"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *map(str, paths)])
    env["MAD_SEARCH_CACHE"] = str(tmp_path / "cache")
    return subprocess.run([sys.executable, "-m", "mad_search", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _elsewhere(tmp_path) -> Path:
    cwd = tmp_path / "elsewhere"
    cwd.mkdir(exist_ok=True)
    return cwd


def _one_line_error(out) -> str:
    assert out.returncode == 2, (out.stdout, out.stderr)
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith("error: "), lines[0]
    assert "Traceback" not in out.stderr + out.stdout
    return lines[0]


@pytest.fixture(scope="module")
def example_site(tmp_path_factory) -> Path:
    """The example package pip-installed (wheel metadata and entry point included) into a
    target directory; put it on PYTHONPATH to make it visible to a subprocess."""
    tmp = tmp_path_factory.mktemp("plugin")
    src = tmp / "src"
    shutil.copytree(EXAMPLE, src, ignore=shutil.ignore_patterns("build", "*.egg-info"))
    site = tmp / "site"
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                          "--no-build-isolation", "--target", str(site), str(src)],
                         capture_output=True, text=True, timeout=600)
    assert pip.returncode == 0, pip.stderr
    (entry_points,) = site.glob("mad_search_example_blocks-*.dist-info/entry_points.txt")
    assert "[mad_search.blocks]" in entry_points.read_text()
    assert "[mad_search.tasks]" in entry_points.read_text()
    assert (site / "mad_search_example_blocks" / "conf" / "task" / "token_reversal.yaml").is_file()
    return site


@pytest.fixture
def scratch_registry():
    """Blocks registered inside a test disappear after it (and their contract verdicts too)."""
    saved, checked = dict(registry._REGISTRY), set(registry._CHECKED)
    yield
    registry._REGISTRY.clear()
    registry._REGISTRY.update(saved)
    registry._CHECKED.clear()
    registry._CHECKED.update(checked)


# --- the entry point ------------------------------------------------------------------------------

def test_entry_point_block_trains_in_a_single_run(example_site, tmp_path):
    cwd = _elsewhere(tmp_path)
    args = ["model.pattern='attention gated_ema'", *TINY, f"hydra.run.dir={tmp_path}/run"]
    if "gated_ema" not in {ep.name for ep in entry_points(group=blocks.ENTRY_POINT_GROUP)}:
        # Importable but not installed, the name is unknown: the entry point is what finds it.
        missing = _one_line_error(_run(args, cwd, tmp_path, EXAMPLE / "src"))
        assert "unknown block 'gated_ema'" in missing
    out = _run(args, cwd, tmp_path, example_site)
    assert out.returncode == 0, out.stderr
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert res["pattern"] == "attention gated_ema" and res["steps"] == 4
    assert 0 <= res["test_accuracy"] <= 1 and res["params"] > 0


@pytest.mark.slow
def test_entry_point_block_is_found_by_spawned_workers(example_site, tmp_path):
    search = ("+search={pattern:{kind:choice,choices:[gated_ema,attention]},"
              "reference:[{pattern.spec:gated_ema},{pattern.spec:attention}]}")
    storage = f"sqlite:///{tmp_path}/s.db"
    out = _run(["+sweep=layer_patterns", "task=in_context_recall", "~search", search, *TINY,
                "study.n_trials=2", "hogwild.workers=2", "hogwild.threads_per_worker=1",
                f"study.storage={storage}", f"hydra.run.dir={tmp_path}/run"],
               _elsewhere(tmp_path), tmp_path, example_site, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    trials = optuna.load_study(study_name="layer_patterns", storage=storage).get_trials()
    done = {t.user_attrs["pattern"]: t for t in trials
            if t.state == optuna.trial.TrialState.COMPLETE}
    assert set(done) == {"gated_ema", "attention"}, [t.user_attrs for t in trials]
    ema = done["gated_ema"].user_attrs
    # the worker built it (no block_modules: only the entry point could have told it where)
    assert ema["worker"] in (0, 1) and ema["state_size"] == 32  # d_model floats of running mean


EXAMPLE_CHECK = """
import json, sys
import torch
import blocks
from mad_search import tasks

seed = int(sys.argv[1])
torch.manual_seed(seed)
out = {"blocks": [n for n in blocks.names() if n in ("gated_ema", "cummean")],
       "tasks": tasks.names()}
x = torch.randn(2, 9, 32)
for name in ("gated_ema", "cummean"):
    blk = blocks.build(name, 32, 64)  # the contract check runs on this first build
    assert blk(x).shape == x.shape
cm = blocks.build("cummean", 32, 64)
u = cm.norm(x)
mean = torch.stack([u[:, : t + 1].mean(1) for t in range(9)], 1)
torch.testing.assert_close(cm(x), x + cm.out_proj(mean), rtol=1e-5, atol=1e-5)
out["cummean_class"] = type(cm).__module__ + "." + type(cm).__qualname__
out["splits"] = {}
for name in ("token_reversal", "token_sorting"):
    data = tasks.as_tensors(tasks.build(name, seed=seed, cache=False, seq_len=10,
                                        num_train_examples=50, num_test_examples=20))
    out["splits"][name] = {split: [list(x.shape), list(y.shape)]
                           for split, (x, y) in data.items()}
    for split, (x, y) in data.items():
        tokens, answer = x[:, :5], y[:, 5:]
        want = tokens.flip(1) if name == "token_reversal" else tokens.sort(1).values
        assert torch.equal(answer, want), (name, split, seed)
        assert torch.equal(x[:, 6:], answer[:, :-1]) and bool((y[:, :5] == -100).all())
out["defaults"] = tasks.defaults("token_sorting")
print(json.dumps(out))
"""


def _python(code, tmp_path, *paths, args=()):
    env = {k: v for k, v in os.environ.items() if k != "MAD_SEARCH_SKIP_CONTRACT"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *map(str, paths)])
    env["MAD_SEARCH_CACHE"] = str(tmp_path / "cache")
    return subprocess.run([sys.executable, "-c", code, *args], cwd=_elsewhere(tmp_path),
                          env=env, capture_output=True, text=True, timeout=300)


def test_entry_points_of_both_forms_give_blocks_and_tasks(example_site, tmp_path):
    seed = random.randrange(10**6)
    out = _python(EXAMPLE_CHECK, tmp_path, example_site, args=[str(seed)])
    assert out.returncode == 0, (seed, out.stderr)
    got = json.loads(out.stdout.splitlines()[-1])
    assert got["blocks"] == ["cummean", "gated_ema"]  # class form and module form
    assert got["cummean_class"] == "mad_search_example_blocks.cummean.CumMean"
    # built-ins in their order, then the plug-in tasks (module form and factory form)
    assert got["tasks"] == [*tasks.names(), "token_reversal", "token_sorting"]
    for name, splits in got["splits"].items():
        sizes = {"train": 50, "validation": 20, "test": 20}
        assert splits == {s: [[n, 10], [n, 10]] for s, n in sizes.items()}, name
    assert got["defaults"] == {"vocab_size": 16, "seq_len": 32, "num_train_examples": 4096,
                               "num_test_examples": 512, "num_valid_examples": None}


def test_entry_point_task_trains_in_a_single_run(example_site, tmp_path):
    """``task=token_reversal`` from another directory: the task comes from its entry point, its
    YAML from the package's Hydra search-path plug-in, the class-form block from its own."""
    out = _run(["task=token_reversal", "model.pattern='attention cummean'", *TINY,
                f"hydra.run.dir={tmp_path}/run"], _elsewhere(tmp_path), tmp_path, example_site)
    assert out.returncode == 0, out.stderr
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert res["task"] == "token_reversal" and res["pattern"] == "attention cummean"
    assert res["task_settings"]["seq_len"] == 32 and res["task_settings"]["vocab_size"] == 16
    assert res["steps"] == 4 and 0 <= res["test_accuracy"] <= 1


def test_plugin_task_yaml_through_hydra_searchpath(example_site, tmp_path):
    """Without the search-path plug-in, ``hydra.searchpath=[pkg://<package>.conf]`` finds it."""
    site = tmp_path / "site"
    shutil.copytree(example_site, site, ignore=shutil.ignore_patterns("hydra_plugins"))
    args = ["task=token_sorting", "model.pattern='attention swiglu'", *TINY,
            f"hydra.run.dir={tmp_path}/run"]
    missing = _run(args, _elsewhere(tmp_path), tmp_path, site)
    assert missing.returncode != 0 and "task/token_sorting" in missing.stderr, missing.stderr
    out = _run([*args, "hydra.searchpath=[pkg://mad_search_example_blocks.conf]"],
               _elsewhere(tmp_path), tmp_path, site)
    assert out.returncode == 0, out.stderr
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert res["task"] == "token_sorting" and res["steps"] == 4


# --- entry points naming a class or factory (unit) --------------------------------------------

class RunningMean(blocks.Block):
    """x + running mean of LayerNorm(x): advertised by class, never decorated."""

    def mix(self, u):
        return u.cumsum(1) / torch.arange(1, u.shape[1] + 1, dtype=u.dtype)[:, None]

    def state_size(self, seq_len):
        return self.d_model


def running_mean_factory(d_model, max_len, **options):
    return RunningMean(d_model, max_len, **options)


@pytest.fixture
def fake_block_entry_points(scratch_registry, monkeypatch):
    """``fake(("name", "module:attr"), ...)`` makes those the ``mad_search.blocks`` group."""

    def fake(*pairs):
        eps = [EntryPoint(name, value, blocks.ENTRY_POINT_GROUP) for name, value in pairs]
        monkeypatch.setattr(plugins, "entry_points",
                            lambda group: eps if group == blocks.ENTRY_POINT_GROUP else [])
        monkeypatch.setattr(registry, "_entry_points_loaded", False)

    return fake


def test_class_and_factory_entry_points_register_under_the_entry_point_name(
        fake_block_entry_points):
    fake_block_entry_points(("ep_running_mean", f"{__name__}:RunningMean"),
                            ("ep_mean_factory", f"{__name__}:running_mean_factory"))
    names = blocks.names()
    assert {"ep_running_mean", "ep_mean_factory"} <= set(names)
    assert blocks.get("ep_running_mean") is RunningMean
    assert blocks.get("ep_mean_factory") is running_mean_factory
    x = torch.randn(3, 7, 32)
    want = x + torch.cumsum(F.layer_norm(x, (32,)), 1) / torch.arange(1, 8)[:, None]
    for name in ("ep_running_mean", "ep_mean_factory"):
        blk = blocks.build(name, 32, 64)  # passes the contract check
        torch.testing.assert_close(blk(x), want, rtol=1e-5, atol=1e-5)


def test_class_entry_point_already_registered_by_its_decorator_changes_nothing(
        fake_block_entry_points):
    blocks.register("ep_running_mean")(RunningMean)
    before = dict(registry._REGISTRY)
    fake_block_entry_points(("ep_running_mean", f"{__name__}:RunningMean"))
    assert blocks.names() == sorted(before)
    assert registry._REGISTRY == before


def test_module_entry_point_name_is_only_a_label(fake_block_entry_points, tmp_path, monkeypatch):
    (tmp_path / "ep_mean_module.py").write_text(textwrap.dedent(CAUSAL_MEAN))
    monkeypatch.syspath_prepend(str(tmp_path))
    fake_block_entry_points(("some_label", "ep_mean_module"))
    try:
        names = blocks.names()
        assert "causal_mean" in names and "some_label" not in names
    finally:
        sys.modules.pop("ep_mean_module", None)


@pytest.mark.parametrize("name, value, expected", [
    ("attention", f"{__name__}:UnmaskedAttention",
     "block name 'attention' is already registered by blocks.attention.AttentionBlock; "
     f"{__name__}.UnmaskedAttention cannot register it too"),
    ("ep_bad", f"{__name__}:POSITION_0",
     "names a str; expected a module, or a block class or factory"),
    ("ep_bad", "no_such_block_plugin:Thing",
     "failed to import: No module named 'no_such_block_plugin'"),
], ids=["name_taken", "not_callable", "import"])
def test_bad_block_entry_point_is_a_one_line_error(fake_block_entry_points, name, value,
                                                     expected):
    fake_block_entry_points((name, value))
    with pytest.raises(blocks.BlockError) as info:
        blocks.names()
    message = str(info.value)
    assert "\n" not in message and expected in message, message
    assert message.startswith(f"entry point {name!r} ({value}) in group mad_search.blocks")
    assert blocks.get("attention").__module__ == "blocks.attention"


# --- a module path in the config ------------------------------------------------------------------

CAUSAL_MEAN = """
    import torch
    from torch import nn

    from blocks import Block, register


    @register("causal_mean")
    class CausalMean(Block):
        \"\"\"x + W(running mean of LayerNorm(x) up to t).\"\"\"

        def __init__(self, d_model, max_len, *, block_index=0, num_blocks=1):
            super().__init__(d_model, max_len, block_index=block_index, num_blocks=num_blocks)
            self.proj = nn.Linear(d_model, d_model, bias=False)

        def mix(self, u):
            count = torch.arange(1, u.shape[1] + 1, dtype=u.dtype, device=u.device)
            return self.proj(u.cumsum(1) / count[:, None])

        def state_size(self, seq_len):
            return self.d_model
"""


def test_module_path_block_trains_without_an_entry_point(tmp_path):
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "my_mean_block.py").write_text(textwrap.dedent(CAUSAL_MEAN))
    out = _run(["model.block_modules=[my_mean_block]", "model.pattern='causal_mean swiglu'",
                *TINY, f"hydra.run.dir={tmp_path}/run"], _elsewhere(tmp_path), tmp_path, plugins)
    assert out.returncode == 0, out.stderr
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert res["pattern"] == "causal_mean swiglu" and res["steps"] == 4


def test_missing_block_module_is_a_one_line_error(tmp_path):
    line = _one_line_error(_run(["model.block_modules=[no_such_block_module]",
                                 f"hydra.run.dir={tmp_path}/run"], _elsewhere(tmp_path), tmp_path))
    assert "block module 'no_such_block_module' could not be imported" in line


# --- the contract check ---------------------------------------------------------------------------

class UnmaskedAttention(blocks.Block):
    """Attention that forgot ``is_causal=True``: every position reads the whole sequence."""

    def __init__(self, d_model, max_len, *, block_index=0, num_blocks=1):
        super().__init__(d_model, max_len, block_index=block_index, num_blocks=num_blocks)
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)

    def mix(self, u):
        q, k, v = self.qkv(u).chunk(3, dim=-1)
        return F.scaled_dot_product_attention(q, k, v)

    def state_size(self, seq_len):
        return 2 * self.d_model * seq_len


class LateLeak(blocks.Block):
    """Causal up to position 4; from position 5 on it also reads the last input."""

    def mix(self, u):
        leak = torch.zeros_like(u)
        leak[:, 5:] = u[:, -1:]
        return u + leak


class UnsplitGate(blocks.Block):
    """Forgot to split (value, gate): returns 2 * d_model channels and no residual."""

    def __init__(self, d_model, max_len, *, block_index=0, num_blocks=1):
        super().__init__(d_model, max_len, block_index=block_index, num_blocks=num_blocks)
        self.proj = nn.Linear(d_model, 2 * d_model)

    def forward(self, x):
        return self.proj(self.norm(x))


class Float64Sum(blocks.Block):
    """Accumulates in float64 for stability and forgets to cast back."""

    def mix(self, u):
        return u.double().cumsum(1) / torch.arange(1, u.shape[1] + 1, dtype=torch.float64)[:, None]

    def forward(self, x):
        return x.double() + self.mix(self.norm(x))


class LogGate(blocks.Block):
    """Log of a gate that can go negative: NaN on ordinary inputs."""

    def __init__(self, d_model, max_len, *, block_index=0, num_blocks=1):
        super().__init__(d_model, max_len, block_index=block_index, num_blocks=num_blocks)
        self.gate = nn.Linear(d_model, d_model)

    def mix(self, u):
        return self.gate(u).log() * u


class NoStateSize(nn.Module):
    """A plain module: right shapes, but no ``state_size``."""

    def __init__(self, d_model, max_len, **kw):
        super().__init__()

    def forward(self, x):
        return x


class NegativeStateSize(blocks.Block):
    def mix(self, u):
        return u

    def state_size(self, seq_len):
        return -seq_len


def not_a_module(d_model, max_len, **kw):
    """A factory returning a plain function."""
    return lambda x: x


POSITION_0 = "not causal: output at position 0 changes when inputs after it change"
REFUSED = [
    ("unmasked_attention", UnmaskedAttention, POSITION_0),
    ("late_leak", LateLeak,
     "not causal: output at position 5 changes when inputs after it change"),
    ("unsplit_gate", UnsplitGate,
     "output shape (17, 16, 64) differs from input shape (17, 16, 32)"),
    ("float64_sum", Float64Sum,
     "output dtype torch.float64 differs from input dtype torch.float32"),
    ("log_gate", LogGate, "non-finite output (nan or inf) on random input"),
    ("no_state_size", NoStateSize, "no state_size(seq_len) method"),
    ("negative_state", NegativeStateSize, "state_size(16) returned -16; expected a non-negative"),
    ("not_a_module", not_a_module, "not a torch.nn.Module"),
]


@pytest.mark.parametrize("name, cls, check", REFUSED, ids=[r[0] for r in REFUSED])
def test_build_refuses_a_block_that_breaks_the_contract(scratch_registry, name, cls, check):
    blocks.register(name)(cls)
    with pytest.raises(blocks.BlockError) as info:
        blocks.build(name, 32, 64)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(
        f"block {name!r} ({cls.__module__}.{cls.__qualname__}) breaks the block contract: {check}"
    ), message
    # refused every time, not only on the first build
    with pytest.raises(blocks.BlockError, match="breaks the block contract"):
        blocks.build(name, 32, 64)


BROKEN_BLOCKS = """
    import torch
    import torch.nn.functional as F
    from torch import nn

    from blocks import Block, register


    class _Linear(Block):
        def __init__(self, d_model, max_len, *, block_index=0, num_blocks=1):
            super().__init__(d_model, max_len, block_index=block_index, num_blocks=num_blocks)
            self.lin = nn.Linear(d_model, 2 * d_model)


    @register("unmasked_attention")
    class UnmaskedAttention(_Linear):
        def mix(self, u):
            q, k = self.lin(u).chunk(2, dim=-1)
            return F.scaled_dot_product_attention(q, k, u)


    @register("unsplit_gate")
    class UnsplitGate(_Linear):
        def forward(self, x):
            return self.lin(self.norm(x))


    @register("float64_sum")
    class Float64Sum(Block):
        def forward(self, x):
            return x.double() + self.norm(x).double().cumsum(1)


    @register("log_gate")
    class LogGate(_Linear):
        def mix(self, u):
            return self.lin(u)[..., : u.shape[-1]].log()
"""


@pytest.mark.parametrize("name, check", [
    ("unmasked_attention", POSITION_0),
    ("unsplit_gate", "output shape (17, 16, 64) differs from input shape (17, 16, 32)"),
    ("float64_sum", "output dtype torch.float64 differs from input dtype torch.float32"),
    ("log_gate", "non-finite output (nan or inf) on random input"),
], ids=["not_causal", "shape", "dtype", "non_finite"])
def test_cli_refuses_a_broken_block_at_config_time(tmp_path, name, check):
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "broken_blocks.py").write_text(textwrap.dedent(BROKEN_BLOCKS))
    cls = "".join(part.capitalize() for part in name.split("_"))
    out = _run(["model.block_modules=[broken_blocks]", f"model.pattern='attention {name}'", *TINY,
                f"hydra.run.dir={tmp_path}/run"], _elsewhere(tmp_path), tmp_path, plugins)
    line = _one_line_error(out)
    assert line == (f"error: block {name!r} (broken_blocks.{cls}) breaks the block contract: "
                    f"{check}"), line
    assert not (tmp_path / "run" / "results.json").exists()


class Counting(blocks.Block):
    """Counts its forward calls; holds a dropout and a sub-module kept in eval mode."""

    total_calls = 0

    def __init__(self, d_model, max_len, *, block_index=0, num_blocks=1, width=1):
        super().__init__(d_model, max_len, block_index=block_index, num_blocks=num_blocks)
        self.lin = nn.Linear(d_model, d_model)
        self.drop = nn.Dropout(0.5)
        self.frozen = nn.Linear(d_model, d_model).eval()
        self.calls = 0

    def mix(self, u):
        self.calls += 1
        type(self).total_calls += 1
        self.last = u.sum()
        return self.drop(self.lin(u)) + self.frozen(u)

    def state_size(self, seq_len):
        return 0


def test_contract_check_runs_once_per_type_and_options(scratch_registry):
    blocks.register("counting")(Counting)
    Counting.total_calls = 0
    for index in range(3):  # a stack of three: one check
        blocks.build("counting", 32, 64, block_index=index, num_blocks=3)
    assert Counting.total_calls == 1
    blocks.build("counting", 32, 64, width=2)  # other options: checked again
    assert Counting.total_calls == 2


def test_contract_check_leaves_no_trace(scratch_registry):
    blocks.register("counting")(Counting)
    Counting.total_calls = 0
    torch.manual_seed(1234)
    blk = blocks.build("counting", 32, 64)
    after_checked_build = torch.rand(4)
    torch.manual_seed(1234)
    plain = Counting(32, 64)
    assert Counting.total_calls == 1  # the probe ran, on the first build only
    torch.testing.assert_close(torch.rand(4), after_checked_build)  # global RNG untouched
    torch.testing.assert_close(blk.lin.weight, plain.lin.weight)
    # training flags, plain attributes set by forward, and counters are as before the probe
    assert blk.training and blk.drop.training and not blk.frozen.training
    assert blk.calls == 0 and not hasattr(blk, "last")


def test_skip_env_var_lets_a_broken_block_build(scratch_registry, monkeypatch):
    blocks.register("unmasked_attention")(UnmaskedAttention)
    monkeypatch.setenv("MAD_SEARCH_SKIP_CONTRACT", "1")
    blk = blocks.build("unmasked_attention", 32, 64)
    assert blk(torch.randn(1, 5, 32)).shape == (1, 5, 32)
    monkeypatch.delenv("MAD_SEARCH_SKIP_CONTRACT")
    with pytest.raises(blocks.BlockError, match="not causal"):
        blocks.build("unmasked_attention", 32, 64)


def test_example_block_passes_the_contract_and_matches_its_recurrence(scratch_registry,
                                                                      monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLE / "src"))
    importlib.import_module("mad_search_example_blocks.gated_ema")
    blk = blocks.build("gated_ema", 32, 64)
    x = torch.randn(2, 11, 32)
    v, g = blk.in_proj(blk.norm(x)).chunk(2, dim=-1)
    a = torch.sigmoid(blk.decay_logit)
    h, outs = torch.zeros(2, 32), []
    for t in range(11):
        h = a * h + (1 - a) * v[:, t]
        outs.append(blk.out_proj(torch.sigmoid(g[:, t]) * h))
    torch.testing.assert_close(blk(x), x + torch.stack(outs, 1), rtol=1e-5, atol=1e-5)
    assert blk.state_size(1000) == 32


# --- registration ---------------------------------------------------------------------------------

def test_duplicate_name_is_refused_naming_both_modules(scratch_registry):
    class MyAttention(blocks.Block):
        pass

    owner = blocks.get("attention")
    with pytest.raises(blocks.BlockError) as info:
        blocks.register("attention")(MyAttention)
    message = str(info.value)
    assert f"{owner.__module__}.{owner.__qualname__}" in message  # blocks.attention.AttentionBlock
    assert f"{MyAttention.__module__}.{MyAttention.__qualname__}" in message
    assert blocks.get("attention") is owner


def test_duplicate_name_from_a_plugin_module_is_a_one_line_error(tmp_path):
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "my_swiglu.py").write_text(textwrap.dedent("""
        from blocks import Block, register

        @register("swiglu")
        class MySwiGLU(Block):
            pass
    """))
    line = _one_line_error(_run(["model.block_modules=[my_swiglu]",
                                 f"hydra.run.dir={tmp_path}/run"], _elsewhere(tmp_path), tmp_path,
                                plugins))
    assert "block name 'swiglu' is already registered by blocks.swiglu.SwiGLUBlock" in line
    assert "my_swiglu.MySwiGLU" in line


def test_reloading_a_block_module_replaces_its_blocks(scratch_registry, tmp_path, monkeypatch):
    (tmp_path / "reloaded_block.py").write_text(textwrap.dedent(CAUSAL_MEAN))
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module("reloaded_block")
    first = blocks.get("causal_mean")
    importlib.reload(module)  # e.g. editing a block in a notebook
    assert blocks.get("causal_mean") is module.CausalMean is not first
    assert blocks.build("causal_mean", 32, 64)(torch.randn(1, 4, 32)).shape == (1, 4, 32)
    sys.modules.pop("reloaded_block")


def test_framework_has_no_knowledge_of_the_example_block():
    """Adding a block type never needs an edit in mad_search/ or blocks/."""
    for package in ("mad_search", "blocks", "conf"):
        for path in (ROOT / package).rglob("*"):
            if path.is_file() and path.suffix in (".py", ".yaml"):
                text = path.read_text()
                assert "gated_ema" not in text and "mad_search_example" not in text, path
                for name in ("cummean", "CumMean", "token_reversal", "token_sorting"):
                    assert name not in text, (name, path)
