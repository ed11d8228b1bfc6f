"""How fast the machine ran in each sitting of `quick`, from the runs whose work does not depend
on the seed: ``PYTHONPATH=. python bench_results/protocol_quick_seed3_2026-12-07/speed_index.py
[OUT.json]`` from the repository root.

Fuzzy recall and compression never reach the stopping accuracy at `quick`, so every such run
trains its fixed number of steps (900 and 1,800) on one thread, whatever the seed: its tokens
per second measure the machine, not the run. For each sitting this prints, per layer sequence,
those runs' tokens per second relative to the same sequence and task in the seed-0 sitting
(``protocol_quick_2026-12-06_nr1500/seed0``), and their geometric mean: the sitting's speed. A
cost measured in a sitting at speed 0.67 is 1.5 times what the seed-0 sitting would have taken.
Seed 2's sitting shared the cores with other processes, so its index measures that contention.
Seed 0's fuzzy recall and compression runs are those of the re-measurement of 2026-12-06
(``protocol_quick_2026-12-06``), whose studies seed 0's were copied from.
"""

import glob
import json
import math
import sys

import optuna
from optuna.trial import TrialState

SITTINGS = {
    "seed0 (2026-12-06)": "bench_results/protocol_quick_2026-12-06_nr1500/seed0",
    "seed1 (2026-12-06)": "bench_results/protocol_quick_2026-12-06_nr1500/seed1",
    "seed2 (2026-12-06, contended)": "bench_results/protocol_quick_seed2_2026-12-06/[ab]",
    "seed3 (2026-12-07)": "bench_results/protocol_quick_seed3_2026-12-07",
}
FIXED = ("fuzzy_in_context_recall", "compression")


def rates(folder: str) -> dict[tuple[str, str], float]:
    """(pattern, task) -> tokens per second of the sitting's one-thread fixed-step runs."""
    out = {}
    for f in sorted(glob.glob(f"{folder}/quick__*.db")):
        storage = optuna.storages.RDBStorage(f"sqlite:///{f}")
        try:
            (summary,) = storage.get_all_studies()
            study = optuna.load_study(study_name=summary.study_name, storage=storage)
            for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
                a = t.user_attrs
                if a.get("task") in FIXED and a.get("threads", 1) == 1 and "tokens_per_s" in a:
                    out[(study.user_attrs["pattern"], a["task"])] = a["tokens_per_s"]
        finally:
            storage.remove_session()
            storage.engine.dispose()
    return out


def main() -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    got = {name: rates(folder) for name, folder in SITTINGS.items()}
    base = got["seed0 (2026-12-06)"]
    res = {}
    for name, r in got.items():
        ratios = {k: r[k] / base[k] for k in r if k in base}
        if not ratios:
            continue
        per_pattern: dict[str, list[float]] = {}
        for (p, _task), x in ratios.items():
            per_pattern.setdefault(p, []).append(x)
        speed = math.exp(sum(map(math.log, ratios.values())) / len(ratios))
        res[name] = {
            "speed_vs_seed0": speed,
            "runs": len(ratios),
            "per_pattern": {p: sum(v) / len(v) for p, v in per_pattern.items()},
        }
        print(f"{name:32} speed {speed:.2f} of seed 0's ({len(ratios)} runs)")
        for p, v in res[name]["per_pattern"].items():
            print(f"    {p:36} {v:.2f}")
    if len(sys.argv) > 1:
        with open(sys.argv[1], "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
