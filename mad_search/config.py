"""Config-time validation: everything a run needs is checked before any work starts.

:func:`resolve` turns the composed Hydra config into a :class:`RunPlan` (layer list, task
settings, model and train settings) or raises :class:`ConfigError` with one line that names the
problem and what would be valid. ``python -m mad_search`` prints that line and exits with code 2.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

import blocks
from mad_search import spec as spec_mod
from mad_search import tasks
from mad_search.budget import BudgetError, width_for_budget
from mad_search.errors import ConfigError
from mad_search.plan import RunPlan
from mad_search.train import TrainConfig


def to_plain(node: Any) -> Any:
    """A config node as plain containers (interpolations resolved); other values as they are."""
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def _positive_int(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{key} must be a positive integer, got {value!r}")
    return value


def resolve_model(model_cfg: Any, max_len: int) -> tuple[list[str], dict, int, dict | None]:
    """Import user block modules, parse the pattern, apply a budget, check block options by
    building each block type once."""
    model_cfg = to_plain(model_cfg) or {}
    for module in model_cfg.get("block_modules") or []:
        blocks.load_module(module)
    d_model = _positive_int(model_cfg.get("d_model"), "model.d_model")
    if model_cfg.get("pattern") is None:
        raise ConfigError("model.pattern is not set; pick pattern=<name> or set model.pattern")
    layers = spec_mod.parse(model_cfg["pattern"])
    block_options = model_cfg.get("blocks") or {}
    budget = dict(model_cfg.get("budget") or {})
    unknown_budget = sorted(set(budget) - {"params", "state", "multiple"})
    if unknown_budget:
        raise ConfigError(
            f"unknown model.budget key(s) {unknown_budget}; valid: params, state, multiple"
        )
    budget_result = None
    if budget.get("params") is not None or budget.get("state") is not None:
        try:
            budget_result = width_for_budget(
                layers,
                max_len,
                max_len,
                params=budget.get("params"),
                state=budget.get("state"),
                block_options=block_options,
                multiple=budget.get("multiple") or 16,
            )
        except BudgetError as exc:
            raise ConfigError(str(exc)) from None
        d_model = budget_result["d_model"]
    if not isinstance(block_options, dict):
        raise ConfigError(f"model.blocks must map block names to options, got {block_options!r}")
    unknown = sorted(set(block_options) - set(blocks.names()))
    if unknown:
        raise ConfigError(
            f"model.blocks names unknown block(s) {unknown}; valid: {', '.join(blocks.names())}"
        )
    # Building one block of each type used catches bad options (and sizes) before training. The
    # probe's initialisation must not move torch's global RNG: a caller that seeds, resolves a
    # plan and then builds its model gets the same weights as one that resolved first. (Threads
    # that resolve plans while another seeds and builds must still hold a common lock.)
    with torch.random.fork_rng(devices=[]):
        for name in sorted(set(layers)):
            options = block_options.get(name) or {}
            key = (name, blocks.get(name), d_model, max_len, repr(sorted(options.items())))
            if key not in _PROBED:  # a sweep resolves the same few blocks many times
                blocks.build(name, d_model, max_len, **options)
                _PROBED.add(key)
    return layers, block_options, d_model, budget_result


# Block configurations already built once successfully by resolve_model (type, its registered
# class, width, length, options); a failing one is never added, so it fails every time.
_PROBED: set[tuple] = set()


def resolve_train(train_cfg: Any, seed: int) -> TrainConfig:
    train_cfg = dict(to_plain(train_cfg) or {})
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(train_cfg) - fields)
    if unknown:
        raise ConfigError(f"unknown train setting(s) {unknown}; valid: {', '.join(sorted(fields))}")
    if "betas" in train_cfg:
        train_cfg["betas"] = tuple(train_cfg["betas"])
    train_cfg.setdefault("seed", seed)
    if train_cfg.get("schedule") == "auto":  # one-model Hogwild: the paper's step with back-off
        train_cfg["schedule"] = "backoff" if train_cfg.get("workers") is not None else "cosine"
    cfg = TrainConfig(**train_cfg)
    try:
        cfg.validate()
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return cfg


BACKENDS = ("torch", "mlx")


def mlx_status() -> str | None:
    """None when the MLX twins can be imported here, else why not (one line)."""
    try:
        import blocks.mlx  # noqa: F401
    except ImportError as exc:
        return f"backend=mlx needs the mlx extra (pip install 'mad-search[mlx]'): {exc}"
    return None


def check_mlx_layers(layers: list[str], where: str = "backend=mlx") -> None:
    """Every block of ``layers`` has an MLX twin (one line naming those that do not)."""
    twins = set(blocks.names("mlx"))
    missing = sorted(set(layers) - twins)
    if missing:
        raise ConfigError(
            f"{where}: block(s) {missing} have no MLX twin (register one with "
            f"@register(name, backend='mlx')); blocks with twins: {', '.join(sorted(twins))}"
        )


def check_pool_backends(hogwild: Any, plans: list[RunPlan]) -> None:
    """A pool of MLX workers only must be able to run every pattern on MLX (one line naming
    the blocks without a twin); a mixed pool sends such patterns to its torch workers. A pool's
    trials are single-process runs: ``train.workers`` (one-model Hogwild) is refused here."""
    if any(p.train.workers is not None for p in plans):
        raise ConfigError("train.workers trains one model with its own workers; a study or "
                          "protocol already runs its trials on the Hogwild pool (hogwild.workers)"
                          ": leave train.workers unset")
    if hogwild.backends and "torch" not in hogwild.backends:
        check_mlx_layers(sorted({name for p in plans for name in p.layers}),
                         "hogwild.backends has only MLX workers")


def resolve_backend(backend: Any, layers: list[str], train: TrainConfig, device: str) -> str:
    """Check the ``backend`` key: torch, or mlx with its extra installed, a twin for every block,
    the embedding trained by AdamW and the CPU device (MLX picks its own device)."""
    if backend not in BACKENDS:
        raise ConfigError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "mlx":
        problem = mlx_status()
        if problem:
            raise ConfigError(problem)
        check_mlx_layers(layers)
        if train.embedding_optimizer != "adamw":
            raise ConfigError(
                f"backend=mlx trains the embedding with AdamW only; got "
                f"train.embedding_optimizer={train.embedding_optimizer}"
            )
        if device != "cpu":
            raise ConfigError("backend=mlx chooses its own device (the CPU on Linux, the GPU on "
                              f"macOS); leave device=cpu, got device={device}")
    return backend


def check_one_model_hogwild(train: TrainConfig, backend: Any, device: str) -> bool:
    """``train.workers`` (one-model Hogwild): torch on the CPU, the embedding updated sparsely
    (AdamW's dense update, the serial default, becomes SparseAdam: lazy Adam on the rows a batch
    touched). Returns that the embedding is sparse. (More workers than cores is allowed: the
    trainer warns.)"""
    if backend != "torch":
        raise ConfigError(f"train.workers (one-model Hogwild) runs torch workers only; got "
                          f"backend={backend} (MLX workers join the study pool: hogwild.backends)")
    if device != "cpu":
        raise ConfigError(f"train.workers shares the model in CPU memory; use device=cpu, got "
                          f"device={device}")
    if train.embedding_optimizer == "adamw":
        train.embedding_optimizer = "sparse_adam"
    return True


def resolve(cfg: DictConfig | dict) -> RunPlan:
    """Validate a composed config (or the same tree as plain containers) into a
    :class:`RunPlan`; raises a :class:`~mad_search.errors.UserError`."""
    task_cfg = dict(to_plain(cfg.get("task")) or {})
    task_name = task_cfg.pop("name", None)
    if task_name is None:
        raise ConfigError(f"task is not set; pick task=<name>, one of {', '.join(tasks.names())}")
    settings = tasks.validate(task_name, **task_cfg)
    info = tasks.info(task_name, **settings)
    model_cfg = to_plain(cfg.get("model")) or {}
    layers, block_options, d_model, budget = resolve_model(model_cfg, info.seq_len)
    seed = cfg.get("seed", 0)
    if not isinstance(seed, int):
        raise ConfigError(f"seed must be an integer, got {seed!r}")
    device = str(cfg.get("device", "cpu"))
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ConfigError(f"device must be 'cpu' or 'cuda', got {device!r}")
    threads = cfg.get("threads")
    if threads is not None:
        threads = _positive_int(threads, "threads")
    train = resolve_train(cfg.get("train"), seed)
    sparse = bool(model_cfg.get("sparse_embedding", False))
    if train.workers is not None:
        sparse = check_one_model_hogwild(train, cfg.get("backend", "torch"), device)
    if train.embedding_optimizer == "sparse_adam" and not sparse:
        raise ConfigError(
            "train.embedding_optimizer=sparse_adam needs model.sparse_embedding=true "
            "(SparseAdam takes sparse gradients only); or pick adamw, sgd or adagrad"
        )
    backend = resolve_backend(cfg.get("backend", "torch"), layers, train, device)
    return RunPlan(
        backend=backend,
        layers=layers,
        pattern=spec_mod.format_layers(layers),
        d_model=d_model,
        task_name=task_name,
        task_settings=settings,
        task_info=info,
        train=train,
        block_options=block_options,
        sparse_embedding=sparse,
        seed=seed,
        device=device,
        threads=threads,
        budget=budget,
    )
