"""How far `long`, the CPU reference, moves with the model seed, and how the cheap levels agree
with it at each seed and with the two seeds' mean: ``PYTHONPATH=. python
bench_results/protocol_long_s1_2026-12-06/seed_noise.py [OUT.json]`` from the repository root.

- ``long_s0``: the `long` studies of ``bench_results/protocol_studies`` (model seed 0).
- ``long_s1``: `long` at model seed 1 on the same data: this folder's ``long_s1`` studies
  (compression and fuzzy recall at both rates, selective copying at 3e-3), with in-context
  recall, noisy recall and memorization taken from seed 0 (0.996-1.0 there for every sequence
  run; for GLA's noisy recall, 0.6, see the README). A sequence whose three tasks are not all
  done at seed 1 is left out of every comparison.
- ``long2_proj``: both seeds' runs together, averaged per (setting, rate) as a level's
  ``seeds: 2`` averages them (``aggregate``): the two-seed reference as far as it is trained. It
  reads the ``long2`` studies of ``bench_results/protocol_long2_2026-12-06/[ab]`` (seed 0's runs,
  the seed-1 runs above, and the seed-1 runs trained there since: selective copying at 1e-3 for
  six of the eight sequences, every run for three); a task a study has no seed-1 run of yet is
  scored from seed 0 alone. A study not yet resumed at ``long2`` is projected from the runs above.
- ``long2``: the packaged level ``long2`` itself, as trained to the end in
  ``bench_results/protocol_long2_2026-12-06/[ab]`` (every run at both seeds); only the sequences
  whose ``long2`` study is complete (24 runs).
- The cheap levels: the studies ``bench_results/protocol_studies/scores.py`` scores (its
  ``STUDIES``, read from that file).
"""

import glob
import importlib.util
import json
import sys

from mad_search.bench import _common as common
from mad_search.bench.protocol import PANEL, stored_runs
from mad_search.protocol import aggregate

HERE = "bench_results/protocol_long_s1_2026-12-06"
RESEEDED = ("compression", "fuzzy_in_context_recall", "selective_copying")
CHEAP = (
    "quick_s0", "quick_s1", "quick_s2", "quick_s3", "quick_sc2", "quick_sc2_s1", "quick_sc2_1000",
    "quick_sc2_1000_s1",
)


def _scored_studies() -> dict[str, tuple[str, str]]:
    """scores.py's STUDIES (label: folder, level prefix of the study files), from the file."""
    spec = importlib.util.spec_from_file_location(
        "panel_scores", "bench_results/protocol_studies/scores.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # defines the studies; scores only when run as a script
    return {label: (folder, prefix) for label, folder, prefix in module.STUDIES}


def runs_by_pattern(pattern_glob: str, level: str | None = None) -> dict[str, list[dict]]:
    """The studies' runs by layer sequence; with ``level``, only studies last run at it."""
    out = {}
    for f in sorted(glob.glob(pattern_glob)):
        if (stored := stored_runs(f, level)) is not None:
            out[stored[0]] = stored[1]
    return out


def mad(runs: list[dict]) -> dict:
    agg = aggregate(runs)
    return {"test": agg["mad_score"], "val": agg["mad_score_val"], "tasks_test": agg["tasks"]}


s0 = runs_by_pattern("bench_results/protocol_studies/long__*.db")
s1_new = {
    p: runs
    for p, runs in runs_by_pattern(f"{HERE}/[ab]/long_s1__*.db").items()
    if {r["task"] for r in runs} >= set(RESEEDED)
}
done = [p for p in PANEL if p in s1_new]
levels = {
    "long_s0": {p: mad(s0[p]) for p in done},
    "long_s1": {
        p: mad([r for r in s0[p] if r["task"] not in RESEEDED] + s1_new[p]) for p in done
    },
}
# the long2 studies' runs so far, where a study has been resumed at long2
long2_runs = runs_by_pattern("bench_results/protocol_long2_2026-12-06/[ab]/long2__*.db", "long2")
levels["long2_proj"] = {p: mad(long2_runs.get(p, s0[p] + s1_new[p])) for p in done}
levels["long2"] = {  # complete: 6 tasks x 2 rates x 2 seeds
    p: mad(long2_runs[p]) for p in done if len(long2_runs.get(p, ())) == 24
}
studies = _scored_studies()
for label in CHEAP:
    folder, prefix = studies[label]
    got = {  # complete studies only: every one of the six tasks
        p: mad(r)
        for p, r in runs_by_pattern(f"{folder}/{prefix}__*.db").items()
        if len({run["task"] for run in r}) == 6
    }
    levels[label] = {p: got[p] for p in done if p in got and got[p]["test"] is not None}

res = {"sequences": done, "levels": levels, "tau_b": {}}
refs = ("long_s0", "long_s1", "long2_proj", "long2")
for lv in levels:
    for ref in refs:
        if lv == ref or (lv in refs and refs.index(lv) > refs.index(ref)):
            continue
        ps = [p for p in done if p in levels[lv] and p in levels[ref]]
        if len(ps) >= 2:
            for kind in ("test", "val"):
                res["tau_b"][f"{lv}_vs_{ref}_{kind}"] = (
                    common.kendall_tau_b(
                        [levels[lv][p][kind] for p in ps], [levels[ref][p][kind] for p in ps]
                    ),
                    len(ps),
                )

print(f"{len(done)} sequences with long at seed 1: {done}")
print(f"{'MAD score, test/val':36}", "  ".join(f"{lv:>13}" for lv in levels))
for p in done:
    cells = [
        f"{levels[lv][p]['test']:.3f}/{levels[lv][p]['val']:.3f}" if p in levels[lv] else "-"
        for lv in levels
    ]
    print(f"{p:36}", "  ".join(f"{c:>13}" for c in cells))
trained = {p: len(long2_runs[p]) for p in done if p in long2_runs}
print("\nlong2 runs trained so far (of 24):", trained)
print("\nreseeded tasks at long, test score seed 0 -> seed 1:")
for p in done:
    a, b = levels["long_s0"][p]["tasks_test"], levels["long_s1"][p]["tasks_test"]
    print(f"  {p:36}", "  ".join(f"{t[:12]} {a[t]:.3f}->{b[t]:.3f}" for t in RESEEDED))
print("\nKendall tau-b (value, sequences):")
for k, v in res["tau_b"].items():
    print(f"  {k:40} {v[0]:.2f} ({v[1]})")
if len(sys.argv) > 1:
    with open(sys.argv[1], "w") as f:
        json.dump(res, f, indent=1)
