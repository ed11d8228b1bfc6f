"""Test- and validation-based MAD scores of the panel's studies (quick600, long, and quick
of 2026-12-06) and their Kendall tau-b against long:
``PYTHONPATH=. python bench_results/protocol_studies/scores.py OUT.json``.
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

optuna.logging.set_verbosity(optuna.logging.WARNING)
out = {}
for level, d in (
    ("quick600", "bench_results/protocol_studies"),
    ("long", "bench_results/protocol_studies"),
    ("quick", "bench_results/protocol_quick_2026-12-06"),
):
    out[level] = {}
    for f in sorted(glob.glob(f"{d}/{level}__*.db")):
        st = optuna.storages.RDBStorage(f"sqlite:///{f}")
        sm = st.get_all_studies()[0]
        study = optuna.load_study(study_name=sm.study_name, storage=st)
        runs = []
        sup = 0
        for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)):
            sup += bool(t.user_attrs.get("superseded"))
        # the runs at the level the study was last run at (not those a level change superseded)
        runs = [run_record(t) for t in trials_at_level(study)]
        agg = aggregate(runs)
        out[level][sm.user_attrs["pattern"]] = {
            "test": agg["mad_score"],
            "val": agg["mad_score_val"],
            "runs": len(runs),
            "superseded": sup,
            "tasks_test": agg["tasks"],
        }
res = {"levels": out, "tau_b_vs_long": {}}
for lv in ("quick600", "quick"):
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
for p in PANEL:
    print(
        f"{p:36}",
        "  ".join(
            f"{lv}: {e.get('test') or float('nan'):.3f}/{e.get('val') or float('nan'):.3f}"
            f" ({e.get('runs')}r)"
            for lv, e in ((lv, out[lv].get(p, {})) for lv in ("quick600", "quick", "long"))
        ),
    )
print(res["tau_b_vs_long"])
if len(sys.argv) > 1:
    json.dump(res, open(sys.argv[1], "w"), indent=1)
