"""Study and Hogwild settings, typed and validated once (as
:class:`~mad_search.train.TrainConfig` is for training).

Each ``from_config`` lays the user's section over its packaged defaults
(``conf/study/default.yaml``, ``conf/hogwild/default.yaml``: the one place those defaults are
written), refuses unknown keys and bad values with one line, and resolves ``auto``. A light
module: a Hogwild worker unpickles :class:`HogwildSettings` with every job and need not import
OmegaConf or Optuna to do so.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING, Any

from mad_search.errors import ConfigError

if TYPE_CHECKING:
    import optuna

SAMPLERS = ("tpe", "random")
PRUNERS = ("median", "successive_halving", "hyperband", "none")


def packaged_config(path: str) -> dict:
    """A YAML file of the packaged config tree (``conf/<path>``) as a plain dict."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(
        OmegaConf.load(resources.files("conf").joinpath(path)), resolve=True
    )


def _settings(section: str, node: Any, default_file: str) -> dict:
    """``node`` laid over the packaged defaults of ``section``; unknown keys refused."""
    from mad_search.config import to_plain

    defaults = packaged_config(default_file)
    given = dict(to_plain(node) or {})
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise ConfigError(
            f"unknown {section} setting {unknown[0]!r}; valid: {', '.join(sorted(defaults))}"
        )
    return {**defaults, **given}


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def _positive_int(value: Any, key: str, extra: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{key} must be a positive integer{extra}, got {value!r}")
    return value


@dataclass(frozen=True)
class HogwildSettings:
    """The ``hogwild`` group, validated (defaults: ``conf/hogwild/default.yaml``)."""

    workers: int
    threads_per_worker: int
    embedding: str  # shared | private
    device: str  # cpu | cuda
    rule: str  # adam | adagrad | sgd
    lr: float
    max_nonfinite: int
    seed: int
    backends: tuple[str, ...] = ()  # per worker slot: torch | mlx (empty: every slot torch)
    lend_idle_threads: bool = True  # once no trial is left to start, idle workers' threads go
    # to the busy ones (README "Idle workers lend their threads")

    def backend_of(self, slot: int) -> str:
        return self.backends[slot] if self.backends else "torch"

    @classmethod
    def from_config(cls, node: Any) -> HogwildSettings:
        s = _settings("hogwild", node, "hogwild/default.yaml")
        backends = _backends(s["backends"], s["workers"])
        if backends:
            s["workers"] = len(backends)
        workers = available_cores() if s["workers"] in ("auto", None) else s["workers"]
        workers = _positive_int(workers, "hogwild.workers", " or auto")
        threads = s["threads_per_worker"]
        if threads in ("auto", None):
            threads = max(1, available_cores() // workers)
        threads = _positive_int(threads, "hogwild.threads_per_worker", " or auto")
        if s["embedding"] not in ("shared", "private"):
            raise ConfigError(
                f"hogwild.embedding must be 'shared' or 'private', got {s['embedding']!r}"
            )
        device = str(s["device"])
        if device not in ("cpu", "cuda"):
            raise ConfigError(f"hogwild.device must be 'cpu' or 'cuda', got {device!r}")
        if device == "cuda":
            import torch

            if not torch.cuda.is_available():
                raise ConfigError("hogwild.device=cuda but no CUDA device is available; use cpu")
        if s["rule"] not in ("sgd", "adagrad", "adam"):
            raise ConfigError(f"hogwild.rule must be sgd, adagrad or adam, got {s['rule']!r}")
        lr = s["lr"]
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
            raise ConfigError(f"hogwild.lr must be positive, got {lr!r}")
        max_nonfinite = s["max_nonfinite"]
        if (
            isinstance(max_nonfinite, bool)
            or not isinstance(max_nonfinite, int)
            or max_nonfinite < 0
        ):
            raise ConfigError(
                f"hogwild.max_nonfinite must be an integer >= 0, got {max_nonfinite!r}"
            )
        if isinstance(s["seed"], bool) or not isinstance(s["seed"], int):
            raise ConfigError(f"hogwild.seed must be an integer, got {s['seed']!r}")
        if not isinstance(s["lend_idle_threads"], bool):
            raise ConfigError(
                f"hogwild.lend_idle_threads must be true or false, got {s['lend_idle_threads']!r}"
            )
        return cls(
            workers=workers,
            threads_per_worker=threads,
            embedding=s["embedding"],
            device=device,
            rule=s["rule"],
            lr=float(lr),
            max_nonfinite=max_nonfinite,
            seed=s["seed"],
            backends=backends,
            lend_idle_threads=s["lend_idle_threads"],
        )


def _backends(node: Any, workers: Any) -> tuple[str, ...]:
    """``hogwild.backends`` ({torch: N, mlx: M}) as one backend name per worker slot, torch
    slots first; () when unset (every worker torch, ``hogwild.workers`` of them)."""
    if node is None:
        return ()
    if not isinstance(node, dict) or not node:
        raise ConfigError(
            f"hogwild.backends must map backend to worker count, e.g. {{torch: 1, mlx: 1}}, "
            f"got {node!r}"
        )
    unknown = sorted(set(node) - {"torch", "mlx"})
    if unknown:
        raise ConfigError(f"hogwild.backends: unknown backend {unknown[0]!r}; valid: torch, mlx")
    for name, count in node.items():
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ConfigError(f"hogwild.backends.{name} must be an integer >= 0, got {count!r}")
    slots = ("torch",) * node.get("torch", 0) + ("mlx",) * node.get("mlx", 0)
    if not slots:
        raise ConfigError("hogwild.backends asks for no workers at all; give at least one")
    if workers not in ("auto", None) and workers != len(slots):
        raise ConfigError(
            f"hogwild.workers={workers} disagrees with hogwild.backends ({len(slots)} workers); "
            "set one of them"
        )
    if "mlx" in slots:
        from mad_search.config import mlx_status

        problem = mlx_status()
        if problem:
            raise ConfigError(f"hogwild.backends: {problem}")
    return slots


def _heartbeat(node: Any) -> dict | None:
    node = dict(node or {})
    unknown = sorted(set(node) - {"interval", "grace_period", "max_retry"})
    if unknown:
        raise ConfigError(
            f"unknown study.heartbeat setting {unknown[0]!r}; valid: grace_period, interval, "
            "max_retry"
        )
    interval = node.get("interval")
    if interval is None:
        return None
    interval = _positive_int(interval, "study.heartbeat.interval", " (seconds) or null")
    grace = node.get("grace_period")
    grace = 3 * interval if grace is None else grace
    if isinstance(grace, bool) or not isinstance(grace, int) or grace <= interval:
        raise ConfigError(
            f"study.heartbeat.grace_period must be seconds above the interval ({interval}) or "
            f"null, got {node.get('grace_period')!r}"
        )
    retry = node.get("max_retry", 1)
    if isinstance(retry, bool) or not isinstance(retry, int) or retry < 0:
        raise ConfigError(f"study.heartbeat.max_retry must be an integer >= 0, got {retry!r}")
    return {"interval": interval, "grace_period": grace, "max_retry": retry}


@dataclass(frozen=True)
class StudySettings:
    """The ``study`` group, validated (defaults: ``conf/study/default.yaml``)."""

    name: str
    storage: str
    n_trials: int
    timeout: float | None
    direction: str
    tasks: list | None
    sampler: dict
    pruner: dict
    heartbeat: dict | None = None  # {interval, grace_period, max_retry}; None: off
    outage_timeout: float | None = 600  # seconds the storage may stay unreachable; None: forever

    @classmethod
    def from_config(cls, node: Any) -> StudySettings:
        s = _settings("study", node, "study/default.yaml")
        if not isinstance(s["name"], str) or not s["name"]:
            raise ConfigError(f"study.name must be a non-empty string, got {s['name']!r}")
        n_trials = s["n_trials"]
        if isinstance(n_trials, bool) or not isinstance(n_trials, int) or n_trials <= 0:
            raise ConfigError(f"study.n_trials must be a positive integer, got {n_trials!r}")
        timeout = s["timeout"]
        if timeout is not None and (
            isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0
        ):
            raise ConfigError(
                f"study.timeout must be a positive number of seconds or null, got {timeout!r}"
            )
        outage = s["outage_timeout"]
        if outage is not None and (
            isinstance(outage, bool) or not isinstance(outage, (int, float)) or outage <= 0
        ):
            raise ConfigError(
                "study.outage_timeout must be a positive number of seconds or null (wait for "
                f"the storage forever), got {outage!r}"
            )
        if s["direction"] != "maximize":
            raise ConfigError(
                "study.direction must be maximize (the objective is validation accuracy)"
            )
        settings = cls(
            name=s["name"],
            storage=s["storage"],
            n_trials=n_trials,
            timeout=timeout,
            direction=s["direction"],
            tasks=list(s["tasks"]) if s["tasks"] else None,
            sampler=dict(s["sampler"] or {}),
            pruner=dict(s["pruner"] or {}),
            heartbeat=_heartbeat(s["heartbeat"]),
            outage_timeout=outage,
        )
        settings.make_sampler()  # bad sampler or pruner options fail here
        settings.make_pruner()
        return settings

    def storage_options(self) -> dict:
        """Keyword arguments of Optuna's ``RDBStorage`` for the heartbeat: stale trials are
        failed by the next coordinator and retried with the same parameters."""
        hb = self.heartbeat
        if not hb:
            return {}
        import warnings

        import optuna

        with warnings.catch_warnings():  # "experimental" since Optuna 2.8; we pin the version
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            retry = (
                optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=hb["max_retry"])
                if hb["max_retry"]
                else None
            )
        return {
            "heartbeat_interval": hb["interval"],
            "grace_period": hb["grace_period"],
            "heartbeat_stale_trial_callback": retry,
        }

    def make_sampler(self) -> optuna.samplers.BaseSampler:
        import optuna

        spec = dict(self.sampler)
        name = spec.pop("name", "tpe")
        if name not in SAMPLERS:
            raise ConfigError(f"study.sampler.name {name!r} unknown; valid: {', '.join(SAMPLERS)}")
        try:
            if name == "tpe":
                spec.setdefault("constant_liar", True)
                return optuna.samplers.TPESampler(**spec)
            return optuna.samplers.RandomSampler(**spec)
        except TypeError as exc:
            raise ConfigError(f"study.sampler ({name}): {exc}") from None

    def make_pruner(self) -> optuna.pruners.BasePruner:
        import optuna

        spec = dict(self.pruner)
        name = spec.pop("name", "median")
        if name not in PRUNERS:
            raise ConfigError(f"study.pruner.name {name!r} unknown; valid: {', '.join(PRUNERS)}")
        try:
            if name == "median":
                return optuna.pruners.MedianPruner(**spec)
            if name == "successive_halving":
                return optuna.pruners.SuccessiveHalvingPruner(**spec)
            if name == "hyperband":
                return optuna.pruners.HyperbandPruner(**spec)
            return optuna.pruners.NopPruner()
        except TypeError as exc:
            raise ConfigError(f"study.pruner ({name}): {exc}") from None
