#!/bin/bash
# `quick` at model seed 3 (data and initial weights neither seed of the reference `long2` uses),
# run as the cost measurement is meant to be: one process, two workers x one thread, the panel's
# eight sequences one after another, on a quiet machine. Gives a fourth seed for the agreement
# with `long2` and a wall time per architecture.
#   bash bench_results/protocol_quick_seed3_2026-12-07/run.sh
# Scored against long2 by bench_results/protocol_long_s1_2026-12-06/seed_noise.py.
D=bench_results/protocol_quick_seed3_2026-12-07
.venv/bin/python -m mad_search.bench protocol 'levels=[quick]' reference= seed=3 workers=2 storage_dir=$D out=$D/bench_protocol_quick_seed3.json "$@"
