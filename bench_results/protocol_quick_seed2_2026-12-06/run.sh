#!/bin/bash
# `quick` at model seed 2, an initialisation neither seed of the reference `long2` uses (seeds 0
# and 1): the clean test of whether `quick`'s agreement with `long2` comes from shared initial
# weights. One worker x one thread; two processes side by side:
#   bash bench_results/protocol_quick_seed2_2026-12-06/run.sh a & bash .../run.sh b
# Scored against long2 by bench_results/protocol_long_s1_2026-12-06/seed_noise.py.
D=bench_results/protocol_quick_seed2_2026-12-06
case $1 in
  a) P='patterns=[mamba*4,(hyena swiglu)*2,(gated_linear_attention swiglu)*2,slstm*2]' ;;
  b) P='patterns=[(attention swiglu)*2,mlstm*3 slstm,mlstm*2,hyena swiglu attention swiglu]' ;;
esac
P=${2:-$P}
.venv/bin/python -m mad_search.bench protocol "$P" 'levels=[quick]' reference= seed=2 workers=1 storage_dir=$D/$1 out=$D/$1/bench_protocol_quick_seed2_$1.json
