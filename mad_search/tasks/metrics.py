"""Accuracy over scored positions: macro (mad-lab's) and micro.

mad-lab scores with ``torchmetrics.classification.MulticlassAccuracy(num_classes=vocab_size,
ignore_index=-100)`` (average ``"macro"``, top-1) on logits flattened to ``(positions, C)``.
Positions whose target is the ignore index are dropped (with their predictions), then per class
``c``: ``tp_c`` = correct predictions of ``c``, ``support_c`` = targets equal to ``c``,
``predicted_c`` = predictions equal to ``c``.

* micro = sum(tp) / sum(support): the fraction of scored positions predicted right.
* macro = the mean of ``tp_c / support_c`` (recall of class c) over the classes that occur at
  all, i.e. whose ``tp + fp + fn = support_c + predicted_c - tp_c`` is non-zero. A class that is
  neither a target nor a prediction is left out of the mean; a class that is predicted but
  never a target counts with recall 0 (so wrong guesses outside the target classes still cost).
  No scored position at all gives 0.

That is torchmetrics >= 1.0 (its macro-averaging fix, PR #1821, merged June 2023 for 1.0.0),
which mad-lab (released March 2024, torchmetrics unpinned) ran with. Before 1.0 (e.g. 0.11.4) every
one of the ``num_classes`` classes counted, absent ones as 0, which would cap recall tasks far
below 1 (only value tokens are ever targets), so mad-lab's 0.999 stopping rule implies >= 1.0.

Streaming: :class:`AccuracyMeter` accumulates the per-class counts over batches, so its result is
the accuracy of the whole split, independent of batch size (torchmetrics' ``compute()`` after all
``update()`` calls). mad-lab logs per-batch values through Lightning, whose epoch value is a
batch-size-weighted mean of per-batch accuracies; we report the exact split value instead.

``preds`` are class ids shaped like ``targets``; logits with one more (last) dimension are
reduced by argmax over that dimension first.
"""

from __future__ import annotations

import torch

from mad_search.tasks.task import IGNORE_INDEX

AVERAGES = ("macro", "micro")


def _counts(preds: torch.Tensor, targets: torch.Tensor, num_classes: int,
            ignore_index: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-class (true positives, support, predicted) over the scored positions."""
    if preds.dim() == targets.dim() + 1:
        preds = preds.argmax(dim=-1)
    if preds.shape != targets.shape:
        raise ValueError(f"preds shape {tuple(preds.shape)} does not match targets shape "
                         f"{tuple(targets.shape)}")
    preds, targets = preds.reshape(-1).long(), targets.reshape(-1).long()
    if ignore_index is not None:
        keep = targets != ignore_index
        preds, targets = preds[keep], targets[keep]
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= num_classes):
        raise ValueError(f"targets must be in [0, {num_classes}) or the ignore index "
                         f"{ignore_index}")
    if preds.numel() and (int(preds.min()) < 0 or int(preds.max()) >= num_classes):
        raise ValueError(f"predictions must be class ids in [0, {num_classes})")
    tp = torch.bincount(targets[preds == targets], minlength=num_classes)
    support = torch.bincount(targets, minlength=num_classes)
    predicted = torch.bincount(preds, minlength=num_classes)
    return tp, support, predicted


def _reduce(tp: torch.Tensor, support: torch.Tensor, predicted: torch.Tensor,
            average: str) -> float:
    if average == "micro":
        total = int(support.sum())
        return float(tp.sum()) / total if total else 0.0
    present = (support + predicted) > 0
    if not bool(present.any()):
        return 0.0
    recall = tp.double() / support.clamp(min=1).double()  # 0 where a class is never a target
    return float(recall[present].mean())


def _check_average(average: str) -> None:
    if average not in AVERAGES:
        raise ValueError(f"average must be one of {AVERAGES}, got {average!r}")


def accuracy(preds: torch.Tensor, targets: torch.Tensor, num_classes: int,
             average: str = "macro", ignore_index: int | None = IGNORE_INDEX) -> float:
    """Top-1 accuracy over positions whose target is not ``ignore_index`` (see module doc)."""
    _check_average(average)
    return _reduce(*_counts(preds, targets, num_classes, ignore_index), average)


class AccuracyMeter:
    """Streaming :func:`accuracy`: ``update(preds, targets)`` per batch, ``compute()`` at end."""

    def __init__(self, num_classes: int, average: str = "macro",
                 ignore_index: int | None = IGNORE_INDEX) -> None:
        _check_average(average)
        self.num_classes, self.average, self.ignore_index = num_classes, average, ignore_index
        self.reset()

    def reset(self) -> None:
        zeros = torch.zeros(self.num_classes, dtype=torch.long)
        self.tp, self.support, self.predicted = zeros.clone(), zeros.clone(), zeros.clone()

    def update(self, preds: torch.Tensor, targets: torch.Tensor) -> None:
        tp, support, predicted = _counts(preds.detach(), targets.detach(), self.num_classes,
                                         self.ignore_index)
        self.tp += tp.cpu()
        self.support += support.cpu()
        self.predicted += predicted.cpu()

    def compute(self) -> float:
        return _reduce(self.tp, self.support, self.predicted, self.average)
