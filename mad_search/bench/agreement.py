"""Does the default study rank layer sequences as longer training does?

    python -m mad_search.bench agreement [steps_factor=3] [lrs=[2e-3,4e-3]] [config={...}]
                                         [digits=2] [out=PATH]

Runs the default study exactly as ``python -m mad_search +sweep=layer_patterns`` does (its
sampler, pruner, shared table and budget; ``config`` sets dotted keys on top, e.g.
``config={study.n_trials: 16}``), timing it. Each layer sequence it ran gets its study score: the
best validation accuracy of its trials (a pruned trial counts with the best value it reported).
Then the same layer sequences are trained at a stronger level through the same pool:
``steps_factor`` times the steps, every learning rate in ``lrs`` (best of them), no pruner, each
run its own embedding table; that is the reference score. The result is Kendall's tau-b between
the two rankings, over the scores rounded to ``digits`` decimals (accuracies that differ by less
than that are ties in both: at these sizes a difference of 0.0004 between two solved runs is
noise, not a ranking), with the unrounded tau beside it; the fraction of pairs both order alike
(tau-b is undefined when every score of one side ties, e.g. when every pattern solves the
task: then identical rankings are full agreement); and whether the study's attention baseline
reached 0.9.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from mad_search.bench import BenchError
from mad_search.bench import _common as common

DEFAULTS: dict[str, Any] = {
    "steps_factor": 3.0,
    "lrs": [2.0e-3, 4.0e-3],
    "config": {},  # dotted keys set on the default study (and on the reference runs)
    "digits": 2,
    "attention": "(attention swiglu)*2",  # the baseline whose study score must reach 0.9
}


def _scores(study) -> dict[str, float]:
    """Best validation accuracy per layer sequence; a pruned trial by its best report."""
    from optuna.trial import TrialState

    out: dict[str, float] = {}
    for t in study.get_trials(deepcopy=False):
        pattern = t.user_attrs.get("pattern")
        if pattern is None:
            continue
        if t.state == TrialState.COMPLETE and t.value is not None:
            value = t.value
        elif t.state == TrialState.PRUNED and t.intermediate_values:
            value = max(t.intermediate_values.values())
        else:
            continue
        out[pattern] = max(value, out.get(pattern, float("-inf")))
    return out


def run(**options: Any) -> dict:
    """Run the default study, then its layer sequences at the stronger level; the JSON result."""
    import optuna

    opts = _validate(options)
    base = common.compose_base()
    for key, value in opts["config"].items():
        OmegaConf.update(base, key, value, merge=False)
    OmegaConf.update(base, "train.progress", False, merge=False)
    steps = int(base.train.max_steps)
    with tempfile.TemporaryDirectory(prefix="mad-bench-agreement-") as tmp:
        cfg = base.copy()
        OmegaConf.update(cfg, "study.storage", f"sqlite:///{tmp}/study.db", merge=False)
        common.load_data(cfg)  # the task's data cache, built before the clock starts
        common.note(f"agreement: the default study ({cfg.study.n_trials} trials) ...")
        t0 = time.perf_counter()
        study_rec = common.run_pool(cfg, Path(tmp) / "study")
        study_total = time.perf_counter() - t0
        study = optuna.load_study(study_name=cfg.study.name, storage=cfg.study.storage)
        study_scores = _scores(study)
        pruned = sum(t.state.name == "PRUNED" for t in study.get_trials(deepcopy=False))
        patterns = list(study_scores)
        if len(patterns) < 2:
            raise BenchError(f"the study finished only {len(patterns)} layer sequence(s)")

        ref = base.copy()
        ref_steps = max(1, round(steps * opts["steps_factor"]))
        runs = [{"spec": p, "train.lr": lr} for p in patterns for lr in opts["lrs"]]
        values = {
            "study.name": "agreement-reference",
            "study.storage": f"sqlite:///{tmp}/reference.db",
            "study.n_trials": len(runs),
            "study.timeout": None,
            "study.sampler": {"name": "random", "seed": 0},
            "study.pruner": {"name": "none"},
            "hogwild.embedding": "private",
            "train.max_steps": ref_steps,
            "search": {
                "pattern": {"kind": "choice", "choices": patterns},
                "params": {},
                "reference": runs,
            },
        }
        for key, value in values.items():
            OmegaConf.update(ref, key, value, merge=False)
        common.note(
            f"agreement: {len(patterns)} layer sequences x {len(opts['lrs'])} learning rates, "
            f"{ref_steps} steps each ..."
        )
        t0 = time.perf_counter()
        ref_rec = common.run_pool(ref, Path(tmp) / "reference")
        ref_total = time.perf_counter() - t0
        ref_study = optuna.load_study(study_name="agreement-reference", storage=ref.study.storage)
        ref_scores = _scores(ref_study)

    per_pattern = [
        {"pattern": p, "study": study_scores[p], "reference": ref_scores.get(p)}
        for p in sorted(patterns, key=lambda p: -study_scores[p])
    ]
    attention = study_scores.get(opts["attention"])
    return {
        "config": {**opts, "cores": common.available_cores(), "study_steps": steps,
                   "reference_steps": ref_steps},
        "machine": common.machine(),
        **compare(per_pattern, opts["digits"]),
        "attention_study_score": attention,
        "attention_reaches_0_9": None if attention is None else attention >= 0.9,
        "study_wall_s": study_total,
        "study_pool_wall_s": study_rec["wall_s"],
        "study_trials": study_rec["trials"],
        "study_pruned": pruned,
        "reference_wall_s": ref_total,
        "per_pattern": per_pattern,
        "study": study_rec,
        "reference": ref_rec,
    }


def compare(per_pattern: list[dict], digits: int) -> dict:
    """Agreement of the study's scores with the reference's over the patterns both have:
    Kendall's tau-b of the scores rounded to ``digits`` decimals (None where it is undefined:
    every score of one side tied), the same unrounded, and ``pair_agreement``: the fraction of
    pairs of patterns that both sides order the same way (better, worse or tied after
    rounding; 1.0 is the same ranking, ties included)."""
    rows = [r for r in per_pattern if r.get("reference") is not None]
    x = [round(r["study"], digits) for r in rows]
    y = [round(r["reference"], digits) for r in rows]
    pairs = [(i, j) for i in range(len(rows)) for j in range(i + 1, len(rows))]

    def sign(v: float) -> int:
        return (v > 0) - (v < 0)

    same = sum(sign(x[i] - x[j]) == sign(y[i] - y[j]) for i, j in pairs)
    return {
        "kendall_tau": common.kendall_tau_b(x, y),
        "kendall_tau_unrounded": common.kendall_tau_b(
            [r["study"] for r in rows], [r["reference"] for r in rows]
        ),
        "pair_agreement": same / len(pairs) if pairs else None,
        "patterns_compared": len(rows),
    }


def table(result: dict) -> str:
    """The two scores per layer sequence, then tau and the attention check."""
    cfg = result["config"]
    lines = [
        f"agreement: the default study ({result['study_trials']} trials, "
        f"{result['study_pruned']} pruned, {cfg['study_steps']} steps) against "
        f"{cfg['reference_steps']} steps at lr {cfg['lrs']} (best), private tables",
        "",
    ]
    fmt = "{:<28} {:>10} {:>10}"
    lines.append(fmt.format("pattern", "study", "reference"))
    lines.append("-" * len(fmt.format("", "", "")))
    for row in result["per_pattern"]:
        lines.append(
            fmt.format(row["pattern"][:28], common.fmt(row["study"], ".4f"),
                       common.fmt(row["reference"], ".4f"))
        )
    lines += [
        "",
        f"scores rounded to {cfg['digits']} decimals, {result['patterns_compared']} patterns: "
        f"pairs ordered alike {common.fmt(result['pair_agreement'], '.3f')}, kendall_tau (tau-b) "
        f"{common.fmt(result['kendall_tau'], '.3f', 'undefined (one side all tied)')} "
        f"(target >= 0.7: {_tau_verdict(result)}); unrounded tau-b "
        f"{common.fmt(result['kendall_tau_unrounded'], '.3f')}",
        f"attention baseline {cfg['attention']}: study score "
        f"{common.fmt(result['attention_study_score'], '.4f')} (target >= 0.9: "
        f"{common.verdict(result['attention_reaches_0_9'])})",
        f"default study wall time {common.fmt(result['study_wall_s'], '.1f')} s (target < 600 s: "
        f"{common.verdict(result['study_wall_s'] < 600)}); reference runs "
        f"{common.fmt(result['reference_wall_s'], '.1f')} s",
    ]
    return "\n".join(lines)


def _tau_verdict(result: dict) -> str:
    """tau-b >= 0.7; where tau-b is undefined, identical rankings (every pair ordered alike,
    i.e. both sides all tied) meet the target and anything else misses it."""
    tau = result["kendall_tau"]
    if tau is not None:
        return common.verdict(tau >= 0.7)
    agree = result["pair_agreement"]
    if agree is None:
        return common.verdict(None)
    return "met (identical rankings)" if agree == 1.0 else common.verdict(False)


def _validate(opts: dict) -> dict:
    opts = dict(opts)
    if not opts["steps_factor"] > 0:
        raise BenchError(f"option steps_factor must be positive, got {opts['steps_factor']}")
    lrs = opts["lrs"]
    if not lrs or not all(isinstance(v, (int, float)) and v > 0 for v in lrs):
        raise BenchError(f"option lrs must be a non-empty list of positive numbers, got {lrs!r}")
    if not isinstance(opts["config"], dict):
        raise BenchError(f"option config must be a mapping of dotted keys, got {opts['config']!r}")
    if not 0 <= opts["digits"] <= 6:
        raise BenchError(f"option digits must be between 0 and 6, got {opts['digits']}")
    return opts
