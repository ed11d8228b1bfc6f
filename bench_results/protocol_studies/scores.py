"""Test- and validation-based MAD scores of the panel's studies and their Kendall tau-b against
``long``: ``PYTHONPATH=. python bench_results/protocol_studies/scores.py OUT.json``.

Studies scored (label: folder, level prefix of the study files):

- ``quick600``, ``long``: ``bench_results/protocol_studies``;
- ``quick``: the packaged ``quick`` of 2026-12-05 (noisy recall 900 steps), seed 0, measured
  2026-12-06 (``bench_results/protocol_quick_2026-12-06``);
- ``quick_s0``, ``quick_s1``: ``quick`` with noisy recall at 1,500 steps, seeds 0 and 1
  (``bench_results/protocol_quick_2026-12-06_nr1500/seed0``, ``seed1``), and ``quick_mean``,
  the mean of their two scores per sequence;
- ``quick_sc2``: the packaged ``quick_sc2`` (``quick`` with selective copying at model seeds 0
  and 1), seed 0 (``bench_results/protocol_quick_sc2_2026-12-06/seed0``: copies of the seed-0
  ``quick`` studies, renamed and resumed, so only the seed-1 selective-copying runs trained);
  ``quick_sc2_s1``: the same at seed 1 (from the seed-1 ``quick`` studies: model seeds 1 and 2
  on seed 1's data).
- ``quick_sc2_1000``, ``quick_sc2_1000_s1``: ``quick_sc2`` with selective copying at 1,000
  steps instead of 1,500 (``bench_results/protocol_quick_sc2_1000_2026-12-06/seed0_[ab]``,
  ``seed1_[ab]``: copies of the ``quick_sc2`` studies, renamed and resumed, so only the two
  selective-copying runs of each sequence trained again), seeds 0 and 1.
- ``quick_sclr6``, ``quick_sclr6_s1``: ``quick`` with selective copying at learning rate 6e-3
  instead of 3e-3, one model seed (``bench_results/protocol_quick_sclr6_2026-12-06/seed0``,
  ``seed1``: copies of the ``quick_s0`` / ``quick_s1`` studies, renamed and resumed, so only the
  selective-copying run of each sequence trained again), seeds 0 and 1, for four sequences
  (Mamba, ``mlstm*2``, ``mlstm*3 slstm``, attention; ``partial_tau.py`` there projects the rest).
- ``quick_s2``: ``quick`` (noisy recall at 1,500 steps) at seed 2, an initialisation that neither
  seed of ``long2`` uses (``bench_results/protocol_quick_seed2_2026-12-06/[ab]``); ``quick_s3``:
  the same at seed 3, run as one process with two workers on a quiet machine
  (``bench_results/protocol_quick_seed3_2026-12-07``).

Each study is scored at the level it was last run at (``trials_at_level``): runs a level change
made stale are not counted.
"""

import glob
import json
import sys

import optuna
from optuna.trial import TrialState

from mad_search.bench import _common as common
from mad_search.bench.protocol import PANEL
from mad_search.protocol import aggregate
from mad_search.protocol_run import run_record, trials_at_level

STUDIES = (
    ("quick600", "bench_results/protocol_studies", "quick600"),
    ("long", "bench_results/protocol_studies", "long"),
    ("quick", "bench_results/protocol_quick_2026-12-06", "quick"),
    ("quick_s0", "bench_results/protocol_quick_2026-12-06_nr1500/seed0", "quick"),
    ("quick_s1", "bench_results/protocol_quick_2026-12-06_nr1500/seed1", "quick"),
    ("quick_sc2", "bench_results/protocol_quick_sc2_2026-12-06/seed0", "quick_sc2"),
    ("quick_sc2_s1", "bench_results/protocol_quick_sc2_2026-12-06/seed1", "quick_sc2"),
    ("quick_sc2_1000", "bench_results/protocol_quick_sc2_1000_2026-12-06/seed0_[ab]",
     "quick_sc2_1000"),
    ("quick_sc2_1000_s1", "bench_results/protocol_quick_sc2_1000_2026-12-06/seed1_[ab]",
     "quick_sc2_1000"),
    ("quick_sclr6", "bench_results/protocol_quick_sclr6_2026-12-06/seed0", "quick_sclr6"),
    ("quick_sclr6_s1", "bench_results/protocol_quick_sclr6_2026-12-06/seed1", "quick_sclr6"),
    ("quick_s2", "bench_results/protocol_quick_seed2_2026-12-06/[ab]", "quick"),
    ("quick_s3", "bench_results/protocol_quick_seed3_2026-12-07", "quick"),
)
MEAN = ("quick_mean", ("quick_s0", "quick_s1"))
COMPARED = (
    "quick600", "quick", "quick_s0", "quick_s1", "quick_mean", "quick_sc2", "quick_sc2_s1",
    "quick_sc2_1000", "quick_sc2_1000_s1", "quick_sclr6", "quick_sclr6_s1", "quick_s2",
    "quick_s3",
)


def cell(e: dict) -> str:
    t, v = e.get("test"), e.get("val")
    return "-" if t is None else f"{t:.3f}/{v:.3f}"


def main() -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    out: dict[str, dict] = {}
    for label, d, prefix in STUDIES:
        out[label] = {}
        for f in sorted(glob.glob(f"{d}/{prefix}__*.db")):
            st = optuna.storages.RDBStorage(f"sqlite:///{f}")
            sm = st.get_all_studies()[0]
            study = optuna.load_study(study_name=sm.study_name, storage=st)
            sup = sum(
                bool(t.user_attrs.get("superseded"))
                for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
            )
            runs = [run_record(t) for t in trials_at_level(study)]
            n_levels = len(study.user_attrs.get("protocol_level", {}).get("tasks", ())) or 6
            agg = aggregate(runs)
            complete = len({r["task"] for r in runs}) >= n_levels
            out[label][sm.user_attrs["pattern"]] = {
                "test": agg["mad_score"] if complete else None,
                "val": agg["mad_score_val"] if complete else None,
                "runs": len(runs),
                "superseded": sup,
                "seconds": sum(r["seconds"] or 0.0 for r in runs),
                "tasks_test": agg["tasks"],
            }
    name, parts = MEAN
    out[name] = {}
    for p in PANEL:
        entries = [out[lv].get(p) for lv in parts]
        if all(e and e["test"] is not None for e in entries):
            out[name][p] = {
                kind: sum(e[kind] for e in entries) / len(entries) for kind in ("test", "val")
            }
    res = {"levels": out, "tau_b_vs_long": {}}
    for lv in COMPARED:
        for kind in ("test", "val"):
            ps = [
                p
                for p in PANEL
                if out[lv].get(p, {}).get(kind) is not None
                and out["long"].get(p, {}).get(kind) is not None
            ]
            if len(ps) >= 2:
                res["tau_b_vs_long"][f"{lv}_{kind}"] = (
                    common.kendall_tau_b(
                        [out[lv][p][kind] for p in ps], [out["long"][p][kind] for p in ps]
                    ),
                    len(ps),
                )
    # the two seeds of one level against each other: how far one run per sequence is from another
    # (quick), and whether a second selective-copying seed steadies it (quick_sc2)
    for a, b in (MEAN[1], ("quick_sc2", "quick_sc2_s1"), ("quick_sc2_1000", "quick_sc2_1000_s1"),
                 ("quick_sclr6", "quick_sclr6_s1")):
        ps = [p for p in PANEL if all(out[lv].get(p, {}).get("test") is not None for lv in (a, b))]
        if len(ps) >= 2:
            for kind in ("test", "val"):
                res[f"tau_b_{a}_vs_{b}_{kind}"] = (
                    common.kendall_tau_b(
                        [out[a][p][kind] for p in ps], [out[b][p][kind] for p in ps]
                    ),
                    len(ps),
                )
    # cost: the runs' own seconds / 2 per architecture (2 cores), in minutes: mean, min, max
    res["cost_minutes_per_architecture"] = {
        lv: (sum(secs) / len(secs), min(secs), max(secs))
        for lv, _, _ in STUDIES
        if (secs := [e["seconds"] / 120 for e in out[lv].values() if e["test"] is not None])
    }

    print(f"{'test/val':36}", "  ".join(f"{lv:>13}" for lv in (*COMPARED, "long")))
    for p in PANEL:
        print(f"{p:36}", "  ".join(f"{cell(out[lv].get(p, {})):>13}" for lv in (*COMPARED, "long")))
    for k, v in res.items():
        if k != "levels":
            print(k, v)
    if len(sys.argv) > 1:
        json.dump(res, open(sys.argv[1], "w"), indent=1)


if __name__ == "__main__":
    main()
