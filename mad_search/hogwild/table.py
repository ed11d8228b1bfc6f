"""The shared embedding table: one per (task vocabulary, width), in shared memory, updated
lock-free by every worker (Hogwild!, Niu et al. 2011).

A :class:`SharedTable` holds the weights and everything the workers need to measure what sharing
does, all in shared memory so that every worker's counters are visible to the coordinator:

* ``weight`` (V, D) float32 and, for the ``adagrad`` rule, ``accum`` (V,) float32 (one
  accumulator per row, shared: no worker keeps optimiser state of its own for the table); for
  the ``adam`` rule, ``exp_avg`` and ``exp_avg_sq`` (V, D) float32, also shared (lazy Adam: only
  the rows a step touches move, their bias correction counted per row by ``touches``);
* ``writes`` (W,) int64: updates written by each worker slot (each slot has one writer, so the
  sum is an exact global clock without atomics);
* ``last_writer`` (V,) int32 and ``last_write`` (V,) int64: which slot last wrote each row, and the
  global clock at that moment; ``touches`` (V,) int64: updates that touched each row.

:class:`TableEmbedding` is the module a worker's model uses instead of ``nn.Embedding``: its
forward gathers the rows the batch touches into a small leaf tensor (moved to the trial's device
when that is a GPU), and :meth:`TableEmbedding.apply_update` writes the sparse update back without
any lock, after checking that nothing non-finite would be written.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

RULES = ("sgd", "adagrad", "adam")
ADAM_BETAS, ADAM_EPS = (0.9, 0.999), 1e-8


class SharedTable:
    """Weights plus measurement counters of one embedding table, placed in shared memory."""

    def __init__(
        self,
        vocab_size: int,
        d_model: int,
        num_slots: int,
        seed: int = 0,
        rule: str = "adagrad",
        share: bool = True,
    ):
        if rule not in RULES:
            raise ValueError(f"hogwild.rule must be one of {', '.join(RULES)}, got {rule!r}")
        gen = torch.Generator().manual_seed(seed)
        std = math.sqrt(2.0 / (5.0 * d_model))  # xLSTM's small init, as the model's own embedding
        self.vocab_size, self.d_model, self.rule = vocab_size, d_model, rule
        self.weight = torch.randn(vocab_size, d_model, generator=gen) * std
        self.accum = torch.zeros(vocab_size)
        moments = (vocab_size, d_model) if rule == "adam" else (0, d_model)
        self.exp_avg, self.exp_avg_sq = torch.zeros(moments), torch.zeros(moments)
        self.writes = torch.zeros(num_slots, dtype=torch.int64)
        self.last_writer = torch.full((vocab_size,), -1, dtype=torch.int32)
        self.last_write = torch.zeros(vocab_size, dtype=torch.int64)
        self.touches = torch.zeros(vocab_size, dtype=torch.int64)
        self.skipped = torch.zeros(num_slots, dtype=torch.int64)
        if share:
            for t in self.tensors():
                t.share_memory_()

    def tensors(self) -> list[torch.Tensor]:
        return [
            self.weight,
            self.accum,
            self.exp_avg,
            self.exp_avg_sq,
            self.writes,
            self.last_writer,
            self.last_write,
            self.touches,
            self.skipped,
        ]

    def clock(self) -> int:
        """Global number of updates written so far (all workers)."""
        return int(self.writes.sum())

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def summary(self) -> dict:
        """Table-wide measurements; ``delta`` is the paper's Delta (largest share of updates
        that one row is in)."""
        total = self.clock()
        return {
            "updates": total,
            "writes_per_worker": self.writes.tolist(),
            "delta": float(self.touches.max()) / total if total else 0.0,
            "rows_ever_touched": int((self.touches > 0).sum()),
            "skipped_nonfinite": int(self.skipped.sum()),
            "finite": bool(torch.isfinite(self.weight).all()),
        }


@dataclass
class UpdateStats:
    """Per-trial Hogwild measurements, accumulated by one worker."""

    steps: int = 0
    rows: int = 0
    collided_rows: int = 0
    staleness_sum: int = 0
    staleness_max: int = 0
    skipped_nonfinite: int = 0
    seconds_in_update: float = 0.0
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        steps = max(self.steps, 1)
        return {
            "hogwild_steps": self.steps,
            "rows_per_step": self.rows / steps,
            "collision_rate": self.collided_rows / max(self.rows, 1),
            "staleness_mean": self.staleness_sum / steps,
            "staleness_max": self.staleness_max,
            "skipped_nonfinite": self.skipped_nonfinite,
        }


class NonFiniteUpdate(RuntimeError):
    """Too many updates were refused because they would write non-finite values."""


class TableEmbedding(nn.Module):
    """Embedding lookup into a :class:`SharedTable`, with a lock-free sparse update.

    The table is deliberately not a parameter or buffer of this module: it never enters a
    ``state_dict``, a block optimiser or a checkpoint copy, and moving the model to a GPU leaves it
    in CPU shared memory (only the touched rows travel). The training loop's best-validation
    checkpoint copies it through :meth:`copy_weights`; :meth:`read_from` then makes this module
    read that copy (the test split is evaluated with the table the blocks were selected with),
    never writing the table itself, which other workers may share.
    """

    def __init__(
        self, table: SharedTable, slot: int, lr: float, max_nonfinite: int = 3, eps: float = 1e-10
    ):
        super().__init__()
        self.table, self.slot, self.lr = table, slot, lr
        self.max_nonfinite, self.eps = max_nonfinite, eps
        self.stats = UpdateStats()
        self._rows: torch.Tensor | None = None
        self._emb: torch.Tensor | None = None
        self._read_clock = 0
        self._frozen: torch.Tensor | None = None
        self.num_embeddings, self.embedding_dim = table.vocab_size, table.d_model
        self._device_probe = nn.Parameter(torch.zeros(0), requires_grad=False)  # follows .to()

    @property
    def weight(self) -> torch.Tensor:
        return self.table.weight if self._frozen is None else self._frozen

    def copy_weights(self) -> torch.Tensor:
        """A copy of the table's weights as they are now (for a checkpoint)."""
        return self.table.weight.detach().clone()

    def read_from(self, weights: torch.Tensor | None) -> None:
        """Read ``weights`` (a :meth:`copy_weights`) instead of the live table from now on;
        ``None`` reads the table again. Updates still go to the table."""
        if weights is not None and weights.shape != self.table.weight.shape:
            raise ValueError(f"table copy of shape {tuple(weights.shape)}, table "
                             f"{tuple(self.table.weight.shape)}")
        self._frozen = weights

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        rows, local = torch.unique(tokens.cpu(), return_inverse=True)
        self._read_clock = self.table.clock()
        emb = self.weight.index_select(0, rows)  # the read (a copy; others keep writing)
        emb = emb.to(self._device_probe.device).requires_grad_(self.training)
        self._rows, self._emb = rows, emb
        return F.embedding(local.to(emb.device), emb)

    @torch.no_grad()
    def apply_update(self, lr_factor: float = 1.0) -> None:
        """Write ``-lr * grad`` for the rows of the last forward pass, lock-free."""
        if self._emb is None or self._emb.grad is None:
            return
        grad = self._emb.grad.detach().to("cpu", torch.float32)
        self._emb = None
        write_update(self.table, self.slot, self._rows, grad, self.lr * lr_factor,
                     self._read_clock, self.stats, self.max_nonfinite, self.eps)


@torch.no_grad()
def write_update(table: SharedTable, slot: int, rows: torch.Tensor, grad: torch.Tensor, lr: float,
                 read_clock: int, stats: UpdateStats, max_nonfinite: int = 3,
                 eps: float = 1e-10) -> None:
    """The table's update rule for the gradient ``grad`` (len(rows), D) of the rows ``rows`` a
    worker read at global clock ``read_clock``, written lock-free from worker slot ``slot``: the
    one rule every worker uses, torch and MLX alike. Nothing non-finite is ever written: such an
    update is refused and counted, and after ``max_nonfinite`` refusals
    :class:`NonFiniteUpdate` stops the trial."""
    t = table
    acc = m = v = None
    if t.rule == "adagrad":
        acc = t.accum.index_select(0, rows) + grad.square().mean(dim=1)
        delta = -lr * grad / (acc.sqrt()[:, None] + eps)
    elif t.rule == "adam":  # lazy Adam: each touched row's k-th update, k from touches
        (b1, b2), k = ADAM_BETAS, (t.touches.index_select(0, rows) + 1).to(torch.float32)
        m = b1 * t.exp_avg.index_select(0, rows) + (1 - b1) * grad
        v = b2 * t.exp_avg_sq.index_select(0, rows) + (1 - b2) * grad.square()
        m_hat, v_hat = m / (1 - b1**k)[:, None], v / (1 - b2**k)[:, None]
        delta = -lr * m_hat / (v_hat.sqrt() + ADAM_EPS)
    else:
        delta = -lr * grad
    new_rows = t.weight.index_select(0, rows) + delta
    state = [x for x in (acc, m, v) if x is not None]
    if not (torch.isfinite(new_rows).all() and all(torch.isfinite(x).all() for x in state)):
        t.skipped[slot] += 1
        stats.skipped_nonfinite += 1
        if stats.skipped_nonfinite > max_nonfinite:
            raise NonFiniteUpdate(
                f"{stats.skipped_nonfinite} embedding updates refused: they would have "
                f"written non-finite values into the shared table"
            )
        return
    # Measure before writing: rows another worker wrote since our read are collisions.
    clock = t.clock()
    lw = t.last_writer.index_select(0, rows)
    collided = (
        (lw >= 0) & (lw != slot) & (t.last_write.index_select(0, rows) >= read_clock)
    )
    staleness = clock - read_clock  # updates by others between our read and our write
    # The lock-free write (Hogwild!): per-row adds, no lock, other workers may interleave.
    t.weight.index_add_(0, rows, delta)
    if acc is not None:
        t.accum.index_add_(0, rows, grad.square().mean(dim=1))
    if m is not None:  # moments written whole: a row another worker moved since is stale
        t.exp_avg.index_copy_(0, rows, m)
        t.exp_avg_sq.index_copy_(0, rows, v)
    t.last_writer.index_fill_(0, rows, slot)
    t.last_write.index_fill_(0, rows, clock)
    t.touches.index_add_(0, rows, torch.ones_like(rows))
    t.writes[slot] += 1
    s = stats
    s.steps += 1
    s.rows += rows.numel()
    s.collided_rows += int(collided.sum())
    s.staleness_sum += staleness
    s.staleness_max = max(s.staleness_max, staleness)
