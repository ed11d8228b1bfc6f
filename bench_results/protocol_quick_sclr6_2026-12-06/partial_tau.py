"""Kendall tau-b against ``long`` of ``quick_sclr6`` where only some sequences' selective-copying
runs at 6e-3 exist: those sequences scored from their ``quick_sclr6`` studies, the others from
the ``quick`` studies they were copied from (selective copying at 3e-3), i.e. a projection that
the others' selective copying would not move. ``PYTHONPATH=. python
bench_results/protocol_quick_sclr6_2026-12-06/partial_tau.py`` from the repository root."""

import glob

import optuna

from mad_search.bench import _common as common
from mad_search.bench.protocol import PANEL, stored_runs
from mad_search.protocol import aggregate

optuna.logging.set_verbosity(optuna.logging.WARNING)


def scores(pattern_glob: str, level: str | None = None) -> dict:
    """MAD scores (test, validation, selective copying's test score) per pattern of the studies
    whose six tasks are complete at the level they were last run at (and named ``level``)."""
    out = {}
    for f in sorted(glob.glob(pattern_glob)):
        stored = stored_runs(f, level)
        if stored is None:
            continue  # a copy not yet resumed at the new level
        pattern, runs = stored
        if len({r["task"] for r in runs}) < 6:
            continue  # selective copying not yet trained at this level
        agg = aggregate(runs)
        sc = agg["tasks"].get("selective_copying")
        out[pattern] = (agg["mad_score"], agg["mad_score_val"], sc)
    return out


long = scores("bench_results/protocol_studies/long__*.db")
for seed in (0, 1):
    new = scores(f"bench_results/protocol_quick_sclr6_2026-12-06/seed{seed}/*.db", "quick_sclr6")
    old = scores(f"bench_results/protocol_quick_2026-12-06_nr1500/seed{seed}/*.db")
    merged = {p: new.get(p, old[p]) for p in PANEL}
    print(f"seed {seed}: measured at 6e-3: {sorted(new)}")
    for p in PANEL:
        src = "6e-3" if p in new else "3e-3"
        print(f"  {p:36} test {merged[p][0]:.3f} val {merged[p][1]:.3f} (selective copying "
              f"{src}: {merged[p][2]:.3f}; at 3e-3 {old[p][2]:.3f})  long {long[p][0]:.3f}")
    for k, kind in ((0, "test"), (1, "val")):
        tau = common.kendall_tau_b([merged[p][k] for p in PANEL], [long[p][k] for p in PANEL])
        print(f"  tau-b vs long ({kind}): {tau:.2f}")
