"""Typed study / Hogwild settings (validated once, defaults from the packaged YAML), the
learning-curves legend and the dashboard command the CLI prints."""

from __future__ import annotations

import random
import shlex
import sys
from pathlib import Path

import optuna
import pytest
from omegaconf import OmegaConf

from mad_search import report
from mad_search.errors import ConfigError, UserError
from mad_search.settings import HogwildSettings, StudySettings, available_cores

CONF = Path(__file__).resolve().parents[1] / "conf"


def test_settings_defaults_come_from_the_packaged_yaml():
    hog_yaml = OmegaConf.to_container(OmegaConf.load(CONF / "hogwild" / "default.yaml"))
    hog = HogwildSettings.from_config({})
    for key in ("embedding", "device", "rule", "lr", "max_nonfinite", "seed"):
        assert getattr(hog, key) == hog_yaml[key], key
    assert hog_yaml["workers"] == "auto" and hog.workers == available_cores()
    assert hog.threads_per_worker == max(1, available_cores() // hog.workers)
    study_yaml = OmegaConf.to_container(
        OmegaConf.load(CONF / "study" / "default.yaml"), resolve=True
    )  # storage: MAD_SEARCH_STORAGE or the SQLite file
    study = StudySettings.from_config(None)
    for key in (
        "name", "storage", "n_trials", "timeout", "direction", "sampler", "pruner",
        "outage_timeout",
    ):
        assert getattr(study, key) == study_yaml[key], key
    beat = study_yaml["heartbeat"]
    assert study.heartbeat["interval"] == beat["interval"]
    assert study.heartbeat["grace_period"] == (beat["grace_period"] or 3 * beat["interval"])
    assert study.storage_options()["heartbeat_interval"] == beat["interval"]


def test_given_settings_override_defaults_and_auto_threads_split_the_cores():
    workers = random.randint(1, 8)
    lr = random.uniform(0.001, 1.0)
    hog = HogwildSettings.from_config(OmegaConf.create({"workers": workers, "lr": lr}))
    assert (hog.workers, hog.lr) == (workers, lr)
    assert hog.threads_per_worker == max(1, available_cores() // workers)
    n = random.randint(1, 100)
    study = StudySettings.from_config({"n_trials": n, "name": "s"})
    assert (study.n_trials, study.name) == (n, "s")
    assert isinstance(study.make_sampler(), optuna.samplers.TPESampler)
    assert isinstance(study.make_pruner(), optuna.pruners.MedianPruner)


@pytest.mark.parametrize(
    "cls, given, fragment",
    [
        (HogwildSettings, {"workres": 2}, "unknown hogwild setting 'workres'; valid: "),
        (HogwildSettings, {"workers": True}, "hogwild.workers must be a positive integer or auto"),
        (HogwildSettings, {"threads_per_worker": 0}, "hogwild.threads_per_worker must be"),
        (HogwildSettings, {"embedding": "both"}, "hogwild.embedding must be 'shared' or"),
        (HogwildSettings, {"rule": "rmsprop"}, "hogwild.rule must be sgd, adagrad or adam"),
        (StudySettings, {"heartbeat": {"interval": 0}}, "study.heartbeat.interval must be"),
        (StudySettings, {"heartbeat": {"interval": 10, "grace_period": 5}},
         "study.heartbeat.grace_period must be seconds above the interval (10)"),
        (StudySettings, {"heartbeat": {"beat": 1}}, "unknown study.heartbeat setting 'beat'"),
        (HogwildSettings, {"seed": 1.5}, "hogwild.seed must be an integer"),
        (StudySettings, {"n_trial": 3}, "unknown study setting 'n_trial'"),
        (StudySettings, {"timeout": -1}, "study.timeout must be a positive number"),
        (StudySettings, {"outage_timeout": 0}, "study.outage_timeout must be a positive number"),
        (StudySettings, {"outage_timeout": "1h"}, "or null (wait for the storage forever)"),
        (StudySettings, {"direction": "minimize"}, "study.direction must be maximize"),
        (StudySettings, {"name": ""}, "study.name must be a non-empty string"),
        (StudySettings, {"sampler": {"name": "cmaes"}}, "study.sampler.name 'cmaes' unknown"),
        (StudySettings, {"pruner": {"name": "median", "bogus": 1}}, "study.pruner (median)"),
    ],
)
def test_bad_settings_are_one_line_user_errors(cls, given, fragment):
    with pytest.raises(ConfigError) as err:
        cls.from_config(given)
    assert isinstance(err.value, UserError)
    assert fragment in str(err.value) and "\n" not in str(err.value)


def _study_with_curves(n: int) -> optuna.Study:
    study = optuna.create_study(direction="maximize")
    for i in range(n):
        trial = study.ask()
        trial.set_user_attr("pattern", f"mlstm*{i + 1} slstm")
        finals = [random.random() for _ in range(3)]
        for step, value in zip((10, 20, 30), finals):
            trial.report(value, step)
        study.tell(trial, finals[-1])
    return study


def test_learning_curves_name_each_line_by_pattern(tmp_path):
    study = _study_with_curves(5)
    labels = report.write_learning_curves(study, tmp_path / "curves.png")
    assert sorted(labels) == sorted(f"#{i} mlstm*{i + 1} slstm" for i in range(5))
    assert (tmp_path / "curves.png").stat().st_size > 0


def test_learning_curves_legend_keeps_the_best_when_crowded(tmp_path):
    study = _study_with_curves(report.LEGEND_MAX + 7)
    labels = report.write_learning_curves(study, tmp_path / "curves.png")
    assert len(labels) == report.LEGEND_MAX
    best = sorted(study.trials, key=lambda t: -t.intermediate_values[30])[: report.LEGEND_MAX]
    assert {label.split()[0] for label in labels} == {f"#{t.number}" for t in best}


def test_dashboard_command_runs_from_anywhere(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exe, url = shlex.split(report.dashboard_command("sqlite:///outputs/my study.db"))
    assert Path(exe).is_absolute() and Path(exe).exists()
    assert Path(exe).parent == Path(sys.executable).parent
    assert url == f"sqlite:///{tmp_path / 'outputs' / 'my study.db'}"
    _, url = shlex.split(report.dashboard_command("postgresql://mad:s3cret@db:5432/x"))
    assert "s3cret" not in url and "***" in url
