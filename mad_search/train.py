"""Training and evaluation of one model on one task: the path of a training step, top to bottom.

``train_plan(plan, data)`` is the one way a run plan is trained: the single run, every Hogwild
worker and the benchmarks' in-process baselines call it, passing the embedding (the pool's shared
table) and the evaluation hook (Optuna's report / prune) as arguments. It seeds, builds the model
and calls ``train(model, data, cfg)``, which runs AdamW on the block parameters (and, with a
sparse embedding, a separate sparse-friendly optimiser on the embedding table), a cosine or
constant-plus-back-off schedule, gradient clipping, validation every ``eval_every`` steps, early
stop at a target validation accuracy, and final test metrics at the best validation checkpoint.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from mad_search.model import aux_loss, build_model
from mad_search.tasks.metrics import AccuracyMeter
from mad_search.tasks.task import IGNORE_INDEX

if TYPE_CHECKING:
    from mad_search.plan import RunPlan


@dataclass
class TrainConfig:
    """Training settings (the ``train`` config group); defaults follow mad-lab where it has one."""

    max_steps: int = 1000
    batch_size: int = 128
    lr: float = 5e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.98)
    schedule: str = "cosine"  # cosine | constant | backoff
    warmup_steps: int = 0
    min_lr: float = 1e-6
    backoff_steps: int = 200  # K: steps in the first constant stage
    backoff_beta: float = 0.37  # step size multiplier per stage; stage e lasts K / beta**e
    grad_clip: float = 1.0
    eval_every: int = 100
    eval_batch_size: int = 256
    target_accuracy: float = 0.999
    # what picks the checkpoint and stops early: auto (the task's objective: validation accuracy
    # for the MAD tasks, validation loss for language modelling) | accuracy | loss
    select: str = "auto"
    target_loss: float | None = None  # with loss selection: stop once validation loss <= this
    accuracy: str = "macro"  # macro (mad-lab) | micro
    embedding_optimizer: str = (
        "adamw"  # adamw (dense, in the block optimiser) | sgd | adagrad | sparse_adam
    )
    embedding_lr: float | None = (
        None  # defaults: lr for adamw/sparse_adam, 0.5 for sgd, 0.05 adagrad
    )
    embedding_schedule: str = "backoff"  # schedule for a separate embedding optimiser
    seed: int = 0
    progress: bool = True
    # one-model Hogwild (mad_search.hogwild.one_model): null trains in this process; W spawns W
    # workers that train ONE model in shared memory without locks
    workers: int | None = None
    share: str = "all"  # all (every parameter shared) | embedding (private blocks: the control)
    delay: int = 0  # injected staleness: each worker writes a gradient this many own steps late
    max_nonfinite: int = 3  # refused non-finite updates per worker before the run stops

    SCHEDULES = ("cosine", "constant", "backoff")
    EMBEDDING_OPTIMIZERS = ("adamw", "sgd", "adagrad", "sparse_adam")

    def validate(self) -> None:
        """Raise ValueError (one line) for settings the trainer cannot honour."""
        for key in ("max_steps", "batch_size", "eval_every", "eval_batch_size", "backoff_steps"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) <= 0:
                raise ValueError(
                    f"train.{key} must be a positive integer, got {getattr(self, key)!r}"
                )
        if not self.lr > 0:
            raise ValueError(f"train.lr must be positive, got {self.lr!r}")
        if self.weight_decay < 0:
            raise ValueError(f"train.weight_decay must be >= 0, got {self.weight_decay!r}")
        if self.schedule not in self.SCHEDULES:
            raise ValueError(
                f"train.schedule {self.schedule!r} unknown; valid: {', '.join(self.SCHEDULES)}"
            )
        if self.embedding_schedule not in self.SCHEDULES:
            raise ValueError(
                f"train.embedding_schedule {self.embedding_schedule!r} unknown; valid: "
                f"{', '.join(self.SCHEDULES)}"
            )
        if self.embedding_optimizer not in self.EMBEDDING_OPTIMIZERS:
            raise ValueError(
                f"train.embedding_optimizer {self.embedding_optimizer!r} unknown; valid: "
                f"{', '.join(self.EMBEDDING_OPTIMIZERS)}"
            )
        if not 0 < self.backoff_beta < 1:
            raise ValueError(f"train.backoff_beta must be in (0, 1), got {self.backoff_beta!r}")
        if self.select not in ("auto", "accuracy", "loss"):
            raise ValueError(
                f"train.select must be auto, accuracy or loss, got {self.select!r}"
            )
        if self.target_loss is not None and not self.target_loss > 0:
            raise ValueError(
                f"train.target_loss must be positive or null, got {self.target_loss!r}"
            )
        if self.workers is not None and (isinstance(self.workers, bool)
                                         or not isinstance(self.workers, int) or self.workers < 1):
            raise ValueError(f"train.workers must be a positive integer or null (serial), got "
                             f"{self.workers!r}")
        if self.share not in ("all", "embedding"):
            raise ValueError(f"train.share must be all or embedding, got {self.share!r}")
        for key in ("delay", "max_nonfinite"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"train.{key} must be an integer >= 0, got {value!r}")
        if self.workers is None and (self.share != "all" or self.delay):
            raise ValueError("train.share and train.delay apply to one-model Hogwild only; "
                             "set train.workers")
        if self.accuracy not in ("macro", "micro"):
            raise ValueError(f"train.accuracy must be 'macro' or 'micro', got {self.accuracy!r}")
        if self.warmup_steps < 0 or self.min_lr < 0 or self.grad_clip < 0:
            raise ValueError("train.warmup_steps, train.min_lr and train.grad_clip must be >= 0")


def lr_factor(
    step: int,
    schedule: str,
    max_steps: int,
    warmup: int = 0,
    min_ratio: float = 0.0,
    backoff_steps: int = 200,
    backoff_beta: float = 0.37,
) -> float:
    """Multiplier of the base step size at ``step`` (0-based).

    ``backoff`` is the Hogwild paper's recipe: K steps at the base size, then multiply by beta and
    run K / beta steps, then multiply again and run K / beta**2, and so on.
    """
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        t = min(1.0, (step - warmup) / max(1, max_steps - warmup))
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))
    if schedule == "backoff":
        stage, end, length = 0, 0.0, float(backoff_steps)
        while True:
            end += length
            if step - warmup < end:
                return backoff_beta**stage
            stage += 1
            length /= backoff_beta
    raise ValueError(f"unknown schedule {schedule!r}")


class Diverged(RuntimeError):
    """Training produced a non-finite loss or gradient; the reason is in the message."""


@dataclass
class TrainResult:
    val_accuracy: float
    test_accuracy: float
    val_loss: float
    test_loss: float
    steps: int
    best_step: int
    tokens_per_s: float
    train_seconds: float
    stopped: str  # max_steps | target_accuracy | target_loss | callback
    history: list[dict] = field(default_factory=list)
    # the test split under both averages (``test_accuracy`` is the configured one)
    test_accuracy_macro: float | None = None
    test_accuracy_micro: float | None = None
    val_accuracy_micro: float | None = None  # the selected checkpoint's, beside test's
    selected_by: str = "accuracy"  # what picked the checkpoint: accuracy | loss
    # language modelling: exp(loss) and, where a token is a fixed number of bytes, bits per byte
    val_perplexity: float | None = None
    test_perplexity: float | None = None
    val_bits_per_byte: float | None = None
    test_bits_per_byte: float | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def make_optimizers(
    model: nn.Module, cfg: TrainConfig
) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer | None]:
    """AdamW on block parameters (no decay on norms, biases, gains or the embedding), plus an
    optional separate optimiser for the embedding table when it is sparse or shared."""
    emb = getattr(model, "embedding", None)
    emb_params = {id(p) for p in emb.parameters()} if emb is not None else set()
    separate = cfg.embedding_optimizer != "adamw"
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad or (separate and id(p) in emb_params):
            continue
        if p.ndim < 2 or id(p) in emb_params or name.endswith(".bias"):
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    # fused: one kernel for every parameter's update (timed on one thread at the default study's
    # sizes: 0.47 ms against 1.75 ms for the per-parameter loop, mlstm*4); CPU and CUDA have it
    fused = all(p.device.type in ("cpu", "cuda") for g in groups for p in g["params"])
    main = torch.optim.AdamW(
        [g for g in groups if g["params"]], lr=cfg.lr, betas=cfg.betas, fused=fused or None
    )
    if not separate:
        return main, None
    lr = cfg.embedding_lr
    kind = cfg.embedding_optimizer
    params = list(emb.parameters())
    if kind == "sgd":
        opt = torch.optim.SGD(params, lr=0.5 if lr is None else lr)
    elif kind == "adagrad":
        opt = torch.optim.Adagrad(params, lr=0.05 if lr is None else lr)
    else:
        opt = torch.optim.SparseAdam(params, lr=cfg.lr if lr is None else lr, betas=cfg.betas)
    return main, opt


def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross entropy over scored positions (ignore index -100), as mad-lab."""
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), ignore_index=IGNORE_INDEX
    )


@torch.no_grad()
def evaluate(
    model: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    num_classes: int,
    batch_size: int = 256,
    average: str = "macro",
    device: str | torch.device = "cpu",
) -> dict:
    """Loss and accuracy (macro and micro) over every scored position of a split."""
    was_training = model.training
    model.eval()
    meters = {avg: AccuracyMeter(num_classes, average=avg) for avg in ("macro", "micro")}
    total_loss, total_count = 0.0, 0
    for start in range(0, inputs.shape[0], batch_size):
        x = inputs[start : start + batch_size].to(device)
        y = targets[start : start + batch_size].to(device)
        logits = model(x)
        n = int((y != IGNORE_INDEX).sum())
        if n:
            total_loss += float(loss_fn(logits, y)) * n
            total_count += n
        preds = logits.argmax(-1)
        for m in meters.values():
            m.update(preds, y)
    model.train(was_training)
    out = {f"accuracy_{k}": float(m.compute()) for k, m in meters.items()}
    out["accuracy"] = out[f"accuracy_{average}"]
    out["loss"] = total_loss / max(total_count, 1)
    return out


EvalCallback = Callable[[int, dict], bool]


class ExternalEmbedding(Protocol):
    """An embedding whose table the caller owns (the Hogwild pool's shared table): a module for
    the lookup, plus the step that writes its update (``lr_factor`` is the schedule's factor)."""

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor: ...

    def apply_update(self, lr_factor: float = 1.0) -> None: ...


def train_step(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    emb_opt: torch.optim.Optimizer | None,
    x: torch.Tensor,
    y: torch.Tensor,
    grad_clip: float,
    step: int,
) -> torch.Tensor:
    """One step on one batch: loss (plus any auxiliary loss), backward, gradient clipping and
    the block optimiser's step (the embedding's own optimiser, if any, only gets its gradients
    cleared: its step is the caller's). Returns the loss; raises :class:`Diverged` on a
    non-finite loss or gradient norm (``step`` names it)."""
    loss = loss_fn(model(x), y)
    aux = aux_loss(model)
    if aux is not None:
        loss = loss + aux
    if not torch.isfinite(loss):
        raise Diverged(f"non-finite training loss at step {step}")
    opt.zero_grad(set_to_none=True)
    if emb_opt:
        emb_opt.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip:
        params = [p for g in opt.param_groups for p in g["params"] if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, grad_clip, foreach=True)
        if not torch.isfinite(norm):
            raise Diverged(f"non-finite gradient norm at step {step}")
    opt.step()
    return loss


def train_plan(
    plan: RunPlan,
    data: dict[str, tuple[torch.Tensor, torch.Tensor]],
    *,
    embedding: ExternalEmbedding | None = None,
    on_eval: EvalCallback | None = None,
    seed: int | None = None,
    device: str | None = None,
    build_lock: contextlib.AbstractContextManager | None = None,
) -> tuple[nn.Module, TrainResult]:
    """Build ``plan``'s model and train it on ``data``; returns the trained model and the result.

    ``seed`` (default ``plan.seed``) seeds torch's global RNG just before the model is built;
    ``build_lock`` is held while seeding and building, for callers that build models in several
    threads of one process (the RNG is process-wide). ``embedding`` replaces the model's own
    embedding and its ``apply_update`` replaces the embedding optimiser's step. ``device``
    defaults to ``plan.device``. (:func:`mad_search.backend.train_plan` picks this or the MLX
    trainer by ``plan.backend``.)
    """
    with build_lock or contextlib.nullcontext():
        torch.manual_seed(plan.seed if seed is None else seed)
        model = build_model(plan)
    if embedding is not None:
        model.embedding = embedding
    result = train(
        model,
        data,
        plan.train,
        plan.task_info.num_classes,
        on_eval=on_eval,
        device=plan.device if device is None else device,
        embedding_step=embedding.apply_update if embedding is not None else None,
        task_info=plan.task_info,
    )
    return model, result


def train(
    model: nn.Module,
    data: dict[str, tuple[torch.Tensor, torch.Tensor]],
    cfg: TrainConfig,
    num_classes: int,
    on_eval: EvalCallback | None = None,
    device: str | torch.device = "cpu",
    embedding_step: Callable[[float], None] | None = None,
    task_info: object | None = None,
) -> TrainResult:
    """Train ``model`` on ``data['train']``, select on ``validation``, report ``test``.

    ``on_eval(step, metrics)`` is called after each validation; returning True stops training
    (used for Optuna pruning). ``embedding_step(lr_factor)`` replaces the embedding optimiser's
    step when the caller manages the table itself (the Hogwild pool's shared embedding).
    """
    cfg.validate()
    return run_loop(TorchSteps(model, cfg, num_classes, device, embedding_step), data, cfg,
                    on_eval, task_info)


class Steps(Protocol):
    """What the training loop needs from a backend (torch here, MLX in
    :mod:`mad_search.mlx_train`): one optimiser step on a batch, evaluation of a split, and a
    copy of the weights to return to (the best validation checkpoint)."""

    def step(self, inputs: torch.Tensor, targets: torch.Tensor, factor: float, emb_factor: float,
             step: int) -> float: ...

    def evaluate(self, inputs: torch.Tensor, targets: torch.Tensor) -> dict: ...

    def snapshot(self) -> object: ...

    def restore(self, state: object) -> None: ...


class TorchSteps:
    """The torch backend of :func:`run_loop`: AdamW (plus the embedding's own optimiser or the
    caller's ``embedding_step``), gradient clipping, :func:`evaluate`."""

    def __init__(self, model: nn.Module, cfg: TrainConfig, num_classes: int,
                 device: str | torch.device = "cpu",
                 embedding_step: Callable[[float], None] | None = None):
        self.model, self.cfg, self.num_classes, self.device = model, cfg, num_classes, device
        self.embedding_step = embedding_step
        model.to(device).train()
        self.opt, self.emb_opt = make_optimizers(model, cfg)
        self.base_lrs = [g["lr"] for g in self.opt.param_groups]
        self.emb_base_lrs = [g["lr"] for g in self.emb_opt.param_groups] if self.emb_opt else []

    def step(self, inputs, targets, factor, emb_factor, step):
        for g, base in zip(self.opt.param_groups, self.base_lrs):
            g["lr"] = base * factor
        x, y = inputs.to(self.device), targets.to(self.device)
        loss = train_step(self.model, self.opt, self.emb_opt, x, y, self.cfg.grad_clip, step)
        if self.embedding_step is not None:
            self.embedding_step(emb_factor)
        elif self.emb_opt:
            for g, base in zip(self.emb_opt.param_groups, self.emb_base_lrs):
                g["lr"] = base * emb_factor
            self.emb_opt.step()
        return loss.item()

    def evaluate(self, inputs, targets):
        cfg = self.cfg
        return evaluate(self.model, inputs, targets, self.num_classes, cfg.eval_batch_size,
                        cfg.accuracy, self.device)

    def snapshot(self):
        # A table outside the model (the Hogwild pool's) is not in its state_dict: its weights
        # are copied too, or the test split would meet the selected blocks with a later table.
        tables = {name: m.copy_weights() for name, m in self._tables()}
        return {"model": copy.deepcopy(self.model.state_dict()), "tables": tables}

    def restore(self, state):
        self.model.load_state_dict(state["model"])
        for name, m in self._tables():
            m.read_from(state["tables"][name])

    def _tables(self) -> list[tuple[str, nn.Module]]:
        return [(n, m) for n, m in self.model.named_modules() if hasattr(m, "copy_weights")]


def run_loop(
    steps: Steps,
    data: dict[str, tuple[torch.Tensor, torch.Tensor]],
    cfg: TrainConfig,
    on_eval: EvalCallback | None = None,
    task_info: object | None = None,
) -> TrainResult:
    """The training loop every backend shares: seeded batch order, the step-size schedule,
    validation every ``cfg.eval_every`` steps, early stop at the target accuracy (or, selecting
    by loss, the target loss) or when ``on_eval`` says so, and test metrics at the best
    validation checkpoint: the highest accuracy, or the lowest loss where ``cfg.select`` (or, on
    auto, the task's objective in ``task_info``) says loss."""
    by_loss = selects_by_loss(cfg, task_info)
    bytes_per_token = getattr(task_info, "bytes_per_token", None)
    batches = batch_order(data["train"], cfg.batch_size, cfg.seed)
    min_ratio = cfg.min_lr / cfg.lr

    def factor_of(schedule: str, step: int) -> float:
        return lr_factor(step - 1, schedule, cfg.max_steps, cfg.warmup_steps, min_ratio,
                         cfg.backoff_steps, cfg.backoff_beta)

    best = {"score": -math.inf, "step": 0, "state": None, "metrics": None}
    history: list[dict] = []
    stopped = "max_steps"
    train_time, tokens = 0.0, 0
    bar = _progress(cfg)
    step = 0
    t_start = time.perf_counter()
    for step in range(1, cfg.max_steps + 1):
        t0 = time.perf_counter()
        x, y = next(batches)
        loss = steps.step(x, y, factor_of(cfg.schedule, step),
                          factor_of(cfg.embedding_schedule, step), step)
        train_time += time.perf_counter() - t0
        tokens += x.numel()
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens / train_time:,.0f}")

        if step % cfg.eval_every == 0 or step == cfg.max_steps:
            metrics = lm_metrics(steps.evaluate(*data["validation"]), bytes_per_token)
            metrics.update(step=step, train_loss=loss, tokens_per_s=tokens / train_time,
                           seconds=time.perf_counter() - t_start)
            history.append(metrics)
            score = -metrics["loss"] if by_loss else metrics["accuracy"]
            if score > best["score"]:
                best.update(score=score, step=step, metrics=metrics, state=steps.snapshot())
            if bar is not None:
                bar.write(
                    f"step {step}: val_loss {metrics['loss']:.4f} val_acc {metrics['accuracy']:.4f}"
                )
            # Every validation is reported (the learning curve ends where training did); a
            # run that reached the target stops for that reason, whatever the callback says.
            stop = on_eval is not None and on_eval(step, metrics)
            if by_loss and cfg.target_loss is not None and metrics["loss"] <= cfg.target_loss:
                stopped = "target_loss"
                break
            if not by_loss and metrics["accuracy"] >= cfg.target_accuracy:
                stopped = "target_accuracy"
                break
            if stop:
                stopped = "callback"
                break
    if bar is not None:
        bar.close()

    if best["state"] is not None:
        steps.restore(best["state"])
    test = lm_metrics(steps.evaluate(*data["test"]), bytes_per_token)
    return result_of(best["metrics"], test, steps=step, best_step=best["step"], tokens=tokens,
                     seconds=train_time, stopped=stopped, history=history, by_loss=by_loss)


def result_of(val: dict | None, test: dict, *, steps: int, best_step: int, tokens: int,
              seconds: float, stopped: str, history: list[dict], by_loss: bool) -> TrainResult:
    """A :class:`TrainResult` from the selected validation metrics and the test metrics (both as
    :func:`lm_metrics` returns them), for every trainer."""
    val = val or {"accuracy": float("nan"), "loss": float("nan")}
    return TrainResult(
        val_accuracy=val["accuracy"],
        test_accuracy=test["accuracy"],
        val_loss=val["loss"],
        test_loss=test["loss"],
        steps=steps,
        best_step=best_step,
        tokens_per_s=tokens / max(seconds, 1e-9),
        train_seconds=seconds,
        stopped=stopped,
        history=history,
        test_accuracy_macro=test["accuracy_macro"],
        test_accuracy_micro=test["accuracy_micro"],
        val_accuracy_micro=val.get("accuracy_micro"),
        selected_by="loss" if by_loss else "accuracy",
        val_perplexity=val.get("perplexity"),
        test_perplexity=test.get("perplexity"),
        val_bits_per_byte=val.get("bits_per_byte"),
        test_bits_per_byte=test.get("bits_per_byte"),
    )


def batch_order(split: tuple[torch.Tensor, torch.Tensor], batch_size: int,
                seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless training batches of ``split`` (inputs, targets): a seeded permutation cut into
    batches, reshuffled when the next batch would run past its end (every trainer's order: the
    serial run's, each Hogwild worker's with its own seed, each DDP rank's)."""
    x_train, y_train = split
    n = x_train.shape[0]
    gen = torch.Generator().manual_seed(seed)
    perm, cursor = torch.randperm(n, generator=gen), 0
    while True:
        if cursor + batch_size > n:
            perm, cursor = torch.randperm(n, generator=gen), 0
        idx = perm[cursor : cursor + batch_size]
        cursor += batch_size
        yield x_train[idx], y_train[idx]


def selects_by_loss(cfg: TrainConfig, task_info: object | None = None) -> bool:
    """Whether the validation loss (not accuracy) picks the checkpoint and stops early."""
    if cfg.select != "auto":
        return cfg.select == "loss"
    return getattr(task_info, "objective", "accuracy") == "loss"


def lm_metrics(metrics: dict, bytes_per_token: float | None = None) -> dict:
    """``metrics`` plus perplexity (exp of the mean cross entropy in nats), bits per token and,
    where a token is a fixed number of bytes, bits per byte."""
    loss = metrics["loss"]
    metrics["perplexity"] = math.exp(min(loss, 700.0))
    metrics["bits_per_token"] = loss / math.log(2)
    if bytes_per_token:
        metrics["bits_per_byte"] = metrics["bits_per_token"] / bytes_per_token
    return metrics


def _progress(cfg: TrainConfig):
    if not cfg.progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=cfg.max_steps, desc="train", unit="step", dynamic_ncols=True, leave=False)
