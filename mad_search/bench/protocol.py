"""How well a cheap protocol level agrees with a stronger one, and what each costs.

    python -m mad_search.bench protocol [patterns=[...]] [levels=[quick]] [reference=standard]
                                        [workers=2] [extra_levels={NAME: {...}}]
                                        [storage_dir=DIR] [out=PATH]

A fixed panel of layer sequences (``patterns``, 8 by default: attention, mLSTM, sLSTM, Mamba,
Hyena, GLA and two hybrids) runs the MAD protocol (:mod:`mad_search.protocol_run`, through the
Hogwild pool, a fresh study each) at every level in ``levels`` and at ``reference``. Per level:
each pattern's MAD score, Kendall's tau-b of the level's ranking against the reference's, wall
time per architecture and trial-hours (the runs' own seconds added up). ``extra_levels`` adds
levels (the same keys as ``conf/protocol/mad.yaml``) without editing the package.

``storage_dir`` keeps every (pattern, level) study in ``DIR/<level>__<pattern>.db`` (SQLite)
instead of a temporary directory, so a panel too long for one sitting resumes where it stopped:
rerun the same command and finished runs are not run again (the protocol's own resume). Levels
can be added in later sittings, e.g. the cheap levels first with ``reference=`` (empty: no
reference, no tau), the reference later. ``trial_hours`` counts every run's own seconds across
sittings; ``wall_s`` adds up the sittings in which each study finished or progressed
(``DIR/walls.json``).
"""

from __future__ import annotations

import json
import re
import tempfile
import time
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from mad_search.bench import BenchError, compose_config
from mad_search.bench import _common as common

PANEL = [
    "(attention swiglu)*2",
    "mlstm*2",
    "slstm*2",
    "mamba*4",
    "(hyena swiglu)*2",
    "(gated_linear_attention swiglu)*2",
    "hyena swiglu attention swiglu",
    "mlstm*3 slstm",
]

DEFAULTS: dict[str, Any] = {
    "patterns": PANEL,
    "levels": ["quick"],
    "reference": "standard",
    "workers": 2,
    "threads_per_worker": 1,
    "extra_levels": {},
    "storage_dir": "",
    "seed": 0,
}


def _config(pattern: str, level: str, opts: dict, storage: str):
    cfg = compose_config(["+protocol=mad"])
    values = {
        "model.pattern": pattern,
        "protocol.level": level,
        "study.storage": storage,
        "hogwild.workers": opts["workers"],
        "hogwild.threads_per_worker": opts["threads_per_worker"],
        "seed": opts["seed"],
    }
    for name, spec in opts["extra_levels"].items():
        values[f"protocol.levels.{name}"] = spec
    for key, value in values.items():
        OmegaConf.update(cfg, key, value, merge=False)
    return cfg


def run(**options: Any) -> dict:
    """Score every pattern at every level and the reference; return the JSON result."""
    from mad_search.protocol_run import score, validate_protocol
    from mad_search.study import run_jobs

    opts = _validate(options)
    patterns = list(opts["patterns"])
    levels = [*opts["levels"], *([opts["reference"]] if opts["reference"] else [])]
    common.check_patterns(patterns)
    with tempfile.TemporaryDirectory(prefix="mad-bench-protocol-") as tmp:
        keep = Path(opts["storage_dir"]).expanduser().resolve() if opts["storage_dir"] else None
        if keep is not None:
            keep.mkdir(parents=True, exist_ok=True)
        walls_path = (keep or Path(tmp)) / "walls.json"
        walls = json.loads(walls_path.read_text()) if walls_path.exists() else {}

        def storage(i: int, pattern: str, level: str) -> str:
            if keep is None:
                return f"sqlite:///{tmp}/{i}.db"
            return f"sqlite:///{keep}/{level}__{_slug(pattern)}.db"

        # every (pattern, level) checked before anything trains
        plans = {
            (p, lv): validate_protocol(_config(p, lv, opts, storage(i, p, lv)))
            for i, (p, lv) in enumerate((p, lv) for lv in levels for p in patterns)
        }
        by_level: dict[str, dict] = {lv: {"patterns": {}} for lv in levels}
        for (pattern, level), protocol in plans.items():
            common.note(f"protocol: level {level}, {pattern} ({len(protocol.runs)} runs) ...")
            t0 = time.perf_counter()
            with common.stdout_to(Path(tmp) / "protocol.log"):  # the table stays readable
                out = run_jobs(protocol, Path(tmp) / "run")
            key = f"{level}|{pattern}"
            walls[key] = walls.get(key, 0.0) + time.perf_counter() - t0
            walls_path.write_text(json.dumps(walls, indent=1))
            if out.interrupted:  # Ctrl-C: the study is saved; the rest of the panel waits too
                raise KeyboardInterrupt
            wall = walls[key]
            scores = score(protocol, out.study)
            seconds = sum(r["seconds"] or 0.0 for r in scores["runs"])
            by_level[level]["patterns"][pattern] = {
                "mad_score": scores["mad_score"],
                "tasks": {t: v["score"] for t, v in scores["tasks"].items()},
                "runs": scores["runs_total"],
                "wall_s": wall,
                "trial_hours": seconds / 3600,
            }
    ref = by_level[opts["reference"]]["patterns"] if opts["reference"] else None
    for entry in by_level.values():
        mine = entry["patterns"]
        both = [
            p
            for p in patterns
            if ref and mine[p]["mad_score"] is not None and ref[p]["mad_score"] is not None
        ]
        entry["kendall_tau_vs_reference"] = common.kendall_tau_b(
            [mine[p]["mad_score"] for p in both], [ref[p]["mad_score"] for p in both]
        ) if ref else None
        entry["wall_s"] = sum(v["wall_s"] for v in mine.values())
        entry["wall_s_per_architecture"] = entry["wall_s"] / len(mine)
        entry["trial_hours"] = sum(v["trial_hours"] for v in mine.values())
        entry["ranking"] = common.ranking(
            {p: mine[p]["mad_score"] for p in patterns if mine[p]["mad_score"] is not None}
        )
    return {
        "config": {**opts, "cores": common.available_cores()},
        "machine": common.machine(),
        "levels": by_level,
    }


def stored_runs(path: str | Path, level: str | None = None) -> tuple[str, list[dict]] | None:
    """The layer sequence of the protocol study stored in the SQLite file ``path`` (a
    ``storage_dir`` study) and the records of the runs a score of it counts: its complete runs
    at the budget and on the grid of the level it was last run at (``trials_at_level``), as
    ``mad_score.json`` lists them. None where ``level`` names another level than that one (a
    copied study not yet resumed at its new level). For scripts that score stored panels
    (``bench_results/protocol_*``), with :func:`mad_search.protocol.aggregate`."""
    import optuna

    from mad_search.protocol_run import run_record, trials_at_level

    storage = optuna.storages.RDBStorage(f"sqlite:///{Path(path)}")
    try:
        (summary,) = storage.get_all_studies()
        study = optuna.load_study(study_name=summary.study_name, storage=storage)
        if level is not None and study.user_attrs["protocol_level"].get("name") != level:
            return None
        return study.user_attrs["pattern"], [run_record(t) for t in trials_at_level(study)]
    finally:
        storage.remove_session()
        storage.engine.dispose()


def table(result: dict) -> str:
    """One row per pattern (its MAD score at each level), then tau and cost per level."""
    cfg = result["config"]
    levels = [*cfg["levels"], *([cfg["reference"]] if cfg["reference"] else [])]
    fmt = "{:<34}" + " {:>12}" * len(levels)
    lines = [
        f"protocol benchmark: {len(cfg['patterns'])} layer sequences, levels "
        f"{', '.join(cfg['levels'])} against {cfg['reference'] or 'no reference'}; "
        f"{cfg['workers']} workers x "
        f"{cfg['threads_per_worker']} thread(s)",
        "",
        fmt.format("pattern (MAD score)", *levels),
        "-" * len(fmt.format("", *levels)),
    ]
    for p in cfg["patterns"]:
        row = [common.fmt(result["levels"][lv]["patterns"][p]["mad_score"], ".4f") for lv in levels]
        lines.append(fmt.format(p[:34], *row))
    lines.append("")
    for lv in levels:
        e = result["levels"][lv]
        lines.append(
            f"{lv}: tau vs {cfg['reference']} {common.fmt(e['kendall_tau_vs_reference'], '.3f')}, "
            f"wall {e['wall_s']:.0f} s ({e['wall_s_per_architecture']:.0f} s per architecture), "
            f"{e['trial_hours']:.2f} trial-hours"
        )
    return "\n".join(lines)


def _slug(pattern: str) -> str:
    """A file-name-safe form of a layer sequence (distinct sequences stay distinct)."""
    import hashlib

    text = re.sub(r"[^A-Za-z0-9]+", "_", pattern).strip("_")[:60]
    return f"{text}_{hashlib.sha1(pattern.encode()).hexdigest()[:8]}"


def _validate(opts: dict) -> dict:
    opts = dict(opts)
    common.check_at_least_one(opts, ("workers", "threads_per_worker"))
    if len(opts["patterns"]) < 2 or len(set(opts["patterns"])) != len(opts["patterns"]):
        raise BenchError("option patterns needs at least 2 distinct layer sequences to rank")
    if not opts["levels"]:
        raise BenchError("option levels must name at least one protocol level")
    if not isinstance(opts["extra_levels"], dict):
        raise BenchError("option extra_levels must map level names to level settings")
    return opts
