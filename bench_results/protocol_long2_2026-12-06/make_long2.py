"""Start the `long2` studies (`long` at model seeds 0 and 1, averaged) from runs already trained:
each `long` study of ``bench_results/protocol_studies`` (model seed 0) copied here as
``a/`` or ``b/long2__<pattern>.db`` (the seed-1 study's folder: ``run.sh``'s two halves),
renamed ``mad:long2:...``, with the complete runs of the seed-1 study
of ``bench_results/protocol_long_s1_2026-12-06`` added as its second-seed runs. Resuming with
``run.sh`` then trains only the second-seed runs still missing.

The added runs are exactly `long2`'s: a level's second-seed run trains with model seed
``seed + 1`` (``seed=0``: 1), as a one-seed run at ``seed=1`` does, on the same data and the same
initial embedding table (``hogwild.seed``), at the same budget. They keep their records (value,
test accuracy, learning curve, seconds, budget), with the run id and ``seed`` a level's second
seed gives them (``...|seed=1``, 1). ``PYTHONPATH=. python
bench_results/protocol_long2_2026-12-06/make_long2.py``: a pattern whose copy exists, or whose
seed-1 study still has runs to train, is left alone (run it again later).
"""

import glob
import shutil
import sqlite3
from pathlib import Path

import optuna
from optuna.trial import TrialState, create_trial

from mad_search.protocol_run import trials_at_level

HERE = Path("bench_results/protocol_long2_2026-12-06")
optuna.logging.set_verbosity(optuna.logging.WARNING)


def load(path: Path) -> optuna.Study:
    storage = optuna.storages.RDBStorage(f"sqlite:///{path}")
    return optuna.load_study(study_name=storage.get_all_studies()[0].study_name, storage=storage)


for seed1_db in sorted(glob.glob("bench_results/protocol_long_s1_2026-12-06/[ab]/long_s1__*.db")):
    slug = Path(seed1_db).name.removeprefix("long_s1__")
    dst = HERE / Path(seed1_db).parent.name / f"long2__{slug}"  # a/ or b/, as the seed-1 study
    dst.parent.mkdir(exist_ok=True)
    if dst.exists():
        print(f"{dst} exists: left alone")
        continue
    seed1 = load(Path(seed1_db))
    if seed1.get_trials(deepcopy=False, states=(TrialState.WAITING, TrialState.RUNNING)):
        print(f"{seed1_db}: runs still to train, left for later")
        continue
    shutil.copyfile(f"bench_results/protocol_studies/long__{slug}", dst)
    with sqlite3.connect(dst) as db:
        db.execute("UPDATE studies SET study_name = replace(study_name, 'mad:long:', 'mad:long2:')")
    study = load(dst)
    added = 0
    for t in trials_at_level(seed1):
        assert t.state == TrialState.COMPLETE and t.user_attrs.get("seed", 0) == 0
        attrs = {**t.user_attrs, "run": f"{t.user_attrs['run']}|seed=1", "seed": 1}
        study.add_trial(
            create_trial(
                state=TrialState.COMPLETE,
                value=t.value,
                user_attrs=attrs,
                intermediate_values=t.intermediate_values,
            )
        )
        added += 1
    print(f"{dst}: {study.study_name}, {added} second-seed runs added")
