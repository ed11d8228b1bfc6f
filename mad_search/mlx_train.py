"""Training with MLX (``backend=mlx``): the model's MLX twin and the MLX backend of the one
training loop (:func:`mad_search.train.run_loop`).

The model is :class:`mad_search.model.SequenceModel` (or the compression task's
:class:`~mad_search.model.EncoderDecoder`) built from the blocks' MLX twins, with the torch model's
parameter names, so a torch ``state_dict()`` loads into it by name. Training uses MLX's own AdamW
(bias-corrected like torch's; weight decay on matrices only, as the torch optimiser groups it) and
MLX's gradient clipping; the step size follows the same schedule function as the torch run
(:func:`mad_search.train.lr_factor`), so one config means the same run on both backends. Batches,
validation, early stopping and the best-checkpoint test are the shared loop's.

In a Hogwild pool an MLX worker's embedding is :class:`MLXTableEmbedding`: it reads the rows its
batch touches out of a NumPy view of the shared table (MLX copies them: it cannot wrap memory it did
not allocate on Linux) and writes its sparse update back with the table's one update rule
(:func:`mad_search.hogwild.table.write_update`), counters and non-finite guard included.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

import blocks.mlx  # noqa: F401  (loads the fast BLAS before MLX on Linux, registers the twins)

# isort: split
import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim

from blocks.mlx.base import linear, small_init
from mad_search.model import block_list
from mad_search.tasks.metrics import AccuracyMeter
from mad_search.tasks.task import IGNORE_INDEX
from mad_search.train import Diverged, EvalCallback, TrainConfig, TrainResult, run_loop

if TYPE_CHECKING:
    from mad_search.hogwild.table import SharedTable
    from mad_search.plan import RunPlan


class SequenceModel(nn.Module):
    """MLX twin of :class:`mad_search.model.SequenceModel`: embedding -> blocks -> norm -> head."""

    def __init__(self, vocab_size: int, d_model: int, layers: Sequence[str], max_len: int,
                 block_options: Mapping[str, Mapping] | None = None):
        super().__init__()
        self.layers = list(layers)
        self.embedding = nn.Embedding(vocab_size, d_model)
        self.embedding.weight = small_init((vocab_size, d_model), d_model)
        self.blocks = block_list(self.layers, d_model, max_len, block_options, backend="mlx")
        self.norm = nn.LayerNorm(d_model, bias=False)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        self.head.weight = small_init((vocab_size, d_model), d_model)

    def encode(self, tokens: mx.array) -> mx.array:
        x = self.embedding(tokens)
        for block in self.blocks:
            x = block(x)
        return x

    def __call__(self, tokens: mx.array) -> mx.array:
        return self.head(self.norm(self.encode(tokens)))

    def state_size(self, seq_len: int) -> int:
        return sum(int(b.state_size(seq_len)) for b in self.blocks)

    def num_params(self) -> int:
        from mlx.utils import tree_flatten

        return sum(v.size for k, v in tree_flatten(self.trainable_parameters())
                   if not k.startswith("embedding.rows"))


class EncoderDecoder(SequenceModel):
    """MLX twin of :class:`mad_search.model.EncoderDecoder` (compression): the last position's
    encoding plus sinusoidal positions, decoded by mad-lab's MLP (norm, linear, GELU, twice)."""

    def __init__(self, vocab_size: int, d_model: int, layers: Sequence[str], max_len: int, **kw):
        super().__init__(vocab_size, d_model, layers, max_len, **kw)
        from mad_search.model import sinusoidal_positions

        # not a parameter (the torch model's is a non-persistent buffer): kept off the tree
        object.__setattr__(self, "_positions", mx.array(sinusoidal_positions(max_len, d_model)
                                                         .numpy()))
        self.decoder = [nn.LayerNorm(d_model, bias=False), linear(d_model, d_model), nn.GELU(),
                        nn.LayerNorm(d_model, bias=False), linear(d_model, d_model), nn.GELU()]
        self.dec_norm = nn.LayerNorm(d_model, bias=False)

    def __call__(self, tokens: mx.array) -> mx.array:
        code = self.norm(self.encode(tokens)[:, -1])
        h = code[:, None, :] + self._positions[: tokens.shape[1]]
        for layer in self.decoder:
            h = layer(h)
        return self.head(self.dec_norm(h))


def build_model(plan: RunPlan) -> SequenceModel:
    """The MLX model of a run plan, initialised from MLX's RNG: seed it first."""
    cls = EncoderDecoder if plan.task_info.encoder_decoder else SequenceModel
    info = plan.task_info
    return cls(info.vocab_size, plan.d_model, plan.layers, info.seq_len,
               block_options=plan.block_options)


def load_torch_state(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Copy a torch model's ``state_dict()`` into its MLX twin, by name (strict)."""
    model.load_weights([(k, mx.array(v.detach().cpu().numpy())) for k, v in state_dict.items()],
                       strict=True)


class MLXTableEmbedding(nn.Module):
    """The shared table as an MLX worker's embedding: the rows of the current batch are this
    module's only parameter (``rows``), read from a NumPy view of the table before each forward
    pass; their gradient is written back by :meth:`apply_update` with the table's update rule."""

    def __init__(self, table: SharedTable, slot: int, lr: float, max_nonfinite: int = 3,
                 eps: float = 1e-10):
        super().__init__()
        from mad_search.hogwild.table import UpdateStats

        for key, value in dict(table=table, slot=slot, lr=lr, max_nonfinite=max_nonfinite,
                               eps=eps, stats=UpdateStats(), _view=table.weight.numpy(),
                               _ids=None, _local=None, _read_clock=0).items():
            object.__setattr__(self, key, value)  # plain attributes, not parameters
        self.rows = mx.zeros((0, table.d_model))

    def copy_weights(self) -> np.ndarray:
        """A copy of the table's weights as they are now (for a checkpoint)."""
        return self._view.copy()

    def read_from(self, weights: np.ndarray | None) -> None:
        """Read ``weights`` (a :meth:`copy_weights`) instead of the live table from now on;
        ``None`` reads the table again. Updates still go to the table."""
        if weights is not None and weights.shape != self.table.weight.shape:
            raise ValueError(f"table copy of shape {weights.shape}, table "
                             f"{tuple(self.table.weight.shape)}")
        view = self.table.weight.numpy() if weights is None else weights
        object.__setattr__(self, "_view", view)

    def read(self, tokens: np.ndarray) -> None:
        """Gather the rows ``tokens`` touch (a copy: other workers keep writing)."""
        ids, local = np.unique(tokens, return_inverse=True)
        object.__setattr__(self, "_read_clock", self.table.clock())
        self.rows = mx.array(self._view[ids])
        object.__setattr__(self, "_ids", ids)
        object.__setattr__(self, "_local", mx.array(local.reshape(tokens.shape)))

    def __call__(self, tokens: mx.array) -> mx.array:
        return self.rows[self._local]

    def apply_update(self, grad: mx.array, lr_factor: float = 1.0) -> None:
        from mad_search.hogwild.table import write_update

        g = torch.from_numpy(np.array(grad, dtype=np.float32))
        write_update(self.table, self.slot, torch.from_numpy(self._ids), g, self.lr * lr_factor,
                     self._read_clock, self.stats, self.max_nonfinite, self.eps)


def masked_cross_entropy(logits: mx.array, targets: mx.array) -> tuple[mx.array, mx.array]:
    """Mean cross entropy over scored positions (ignore index -100) and their number."""
    keep = targets != IGNORE_INDEX
    ce = nn.losses.cross_entropy(logits, mx.where(keep, targets, 0), reduction="none")
    n = keep.sum()
    return (ce * keep).sum() / mx.maximum(n, 1), n


def _aux_loss(model: nn.Module) -> mx.array | None:
    total = None
    for _, module in model.named_modules():
        value = getattr(module, "aux_loss", None)
        if isinstance(value, mx.array):
            total = value if total is None else total + value
    return total


def _decays(path: str, grad: mx.array) -> bool:
    """AdamW's weight decay applies to matrices only: not to norms, biases, gains or the
    embedding (the torch optimiser's grouping, :func:`mad_search.train.make_optimizers`)."""
    return grad.ndim >= 2 and not path.startswith("embedding.") and not path.endswith(".bias")


class MLXSteps:
    """The MLX backend of :func:`mad_search.train.run_loop`."""

    def __init__(self, model: SequenceModel, cfg: TrainConfig, num_classes: int):
        if cfg.embedding_optimizer != "adamw" and not isinstance(model.embedding,
                                                                   MLXTableEmbedding):
            raise ValueError("backend=mlx trains the embedding with AdamW only "
                             "(train.embedding_optimizer=adamw)")
        self.model, self.cfg, self.num_classes = model, cfg, num_classes
        self.table = model.embedding if isinstance(model.embedding, MLXTableEmbedding) else None
        common = dict(learning_rate=cfg.lr, betas=list(cfg.betas), eps=1e-8, bias_correction=True)
        self.opts = [optim.AdamW(weight_decay=cfg.weight_decay, **common),
                     optim.AdamW(weight_decay=0.0, **common)]
        self.opt = optim.MultiOptimizer(self.opts, [_decays])
        self.loss_and_grad = nn.value_and_grad(model, self._loss)
        model.train()

    def _loss(self, x: mx.array, y: mx.array) -> mx.array:
        loss, _ = masked_cross_entropy(self.model(x), y)
        aux = _aux_loss(self.model)
        return loss if aux is None else loss + aux

    def step(self, inputs, targets, factor, emb_factor, step):
        x_np = inputs.numpy()
        if self.table is not None:
            self.table.read(x_np)
        loss, grads = self.loss_and_grad(mx.array(x_np), mx.array(targets.numpy()))
        # the table's rows are written by the table's own rule, not by the optimiser
        emb_grad = grads.pop("embedding")["rows"] if self.table is not None else None
        if self.cfg.grad_clip:
            grads, norm = optim.clip_grad_norm(grads, self.cfg.grad_clip)
        else:
            norm = mx.array(0.0)
        for opt in self.opts:
            opt.learning_rate = self.cfg.lr * factor
        mx.eval(loss, norm)
        loss_value = loss.item()
        if not math.isfinite(loss_value):
            raise Diverged(f"non-finite training loss at step {step}")
        if not math.isfinite(norm.item()):
            raise Diverged(f"non-finite gradient norm at step {step}")
        self.opt.update(self.model, grads)
        mx.eval(self.model.parameters(), self.opt.state)
        if self.table is not None:
            self.table.apply_update(emb_grad, emb_factor)
        return loss_value

    def evaluate(self, inputs, targets):
        cfg = self.cfg
        self.model.eval()
        meters = {avg: AccuracyMeter(self.num_classes, average=avg) for avg in ("macro", "micro")}
        total_loss, total_count = 0.0, 0
        for start in range(0, inputs.shape[0], cfg.eval_batch_size):
            x_np = inputs[start: start + cfg.eval_batch_size].numpy()
            y = targets[start: start + cfg.eval_batch_size]
            if self.table is not None:
                self.table.read(x_np)
            logits = self.model(mx.array(x_np))
            loss, n = masked_cross_entropy(logits, mx.array(y.numpy()))
            preds = logits.argmax(-1)
            mx.eval(loss, n, preds)
            total_loss += loss.item() * n.item()
            total_count += n.item()
            preds_t = torch.from_numpy(np.array(preds))
            for meter in meters.values():
                meter.update(preds_t, y)
        self.model.train()
        out = {f"accuracy_{k}": float(m.compute()) for k, m in meters.items()}
        out["accuracy"] = out[f"accuracy_{cfg.accuracy}"]
        out["loss"] = total_loss / max(total_count, 1)
        return out

    def snapshot(self):
        from mlx.utils import tree_flatten

        # MLX updates replace arrays rather than writing into them: references are a copy. The
        # shared table is written in place by every worker: its weights are copied.
        params = [(k, v) for k, v in tree_flatten(self.model.parameters())
                  if not k.startswith("embedding.rows")]
        return {"params": params,
                "table": None if self.table is None else self.table.copy_weights()}

    def restore(self, state):
        self.model.load_weights(state["params"], strict=False)
        if self.table is not None:
            self.table.read_from(state["table"])


def train_plan_mlx(
    plan: RunPlan,
    data: dict[str, tuple[torch.Tensor, torch.Tensor]],
    *,
    embedding: MLXTableEmbedding | None = None,
    on_eval: EvalCallback | None = None,
    seed: int | None = None,
    init: str = "mlx",
) -> tuple[SequenceModel, TrainResult]:
    """:func:`mad_search.train.train_plan` for ``backend=mlx``: build the MLX model (with
    ``embedding`` in place of its own: the pool's shared table) and train it. ``init="mlx"``
    draws the initial weights from MLX's RNG seeded with ``seed``; ``init="torch"`` starts from
    exactly the weights the torch model gets with that seed (a pool's trial then does not depend
    on which kind of worker ran it)."""
    seed = plan.seed if seed is None else seed
    mx.random.seed(seed)
    model = build_model(plan)
    if init == "torch":
        from mad_search.model import build_model as build_torch_model

        torch.manual_seed(seed)
        load_torch_state(model, build_torch_model(plan).state_dict())
    if embedding is not None:
        model.embedding = embedding
    plan.train.validate()
    result = run_loop(MLXSteps(model, plan.train, plan.task_info.num_classes), data, plan.train,
                      on_eval, plan.task_info)
    return model, result
