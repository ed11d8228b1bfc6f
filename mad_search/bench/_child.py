"""Entry point of ``bench vs_independent``'s own processes: ``pool SPEC`` or ``independent SPEC``
(SPEC: a JSON file with the study config and the role's settings).

``pool`` does what ``python -m mad_search +sweep=...`` does: run the study (coordinator +
workers). ``independent`` is the script a user would write for the standard
way to parallelise Optuna: load the study from the shared storage and ``study.optimize`` the
in-process objective.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main() -> None:
    from omegaconf import OmegaConf

    role, spec_path = sys.argv[1], sys.argv[2]
    spec = json.loads(Path(spec_path).read_text())
    cfg = OmegaConf.create(spec["cfg"])
    if role == "pool":
        from mad_search.study import run_study

        run_study(cfg, spec["out_dir"])
        return
    import optuna
    import torch

    from mad_search.bench import _common as common
    from mad_search.bench.vs_independent import open_storage

    torch.set_num_threads(int(spec["threads"]))
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    data = common.load_data(cfg)
    study = optuna.load_study(
        study_name=cfg.study.name,
        storage=open_storage(spec["storage"]),
        sampler=optuna.samplers.RandomSampler(seed=int(cfg.seed)),
        pruner=optuna.pruners.NopPruner(),
    )
    study.optimize(common.make_objective(cfg, data), n_trials=int(spec["n_trials"]))
