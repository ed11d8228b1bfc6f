#!/bin/bash
# The packaged level `long2` (`long` at model seeds 0 and 1, accuracies averaged): resumes the
# studies that make_long2.py started here, so only the second-seed runs not yet trained run. One
# worker x one thread; two processes side by side:
#   bash bench_results/protocol_long2_2026-12-06/run.sh a & bash .../run.sh b
# A second argument replaces the patterns.
D=bench_results/protocol_long2_2026-12-06
case $1 in
  a) P='patterns=[mamba*4,(hyena swiglu)*2,(gated_linear_attention swiglu)*2]' ;;
  b) P='patterns=[(attention swiglu)*2,mlstm*3 slstm,slstm*2,mlstm*2,hyena swiglu attention swiglu]' ;;
esac
P=${2:-$P}
.venv/bin/python -m mad_search.bench protocol "$P" 'levels=[long2]' reference= seed=0 workers=1 storage_dir=$D/$1 out=$D/$1/bench_protocol_long2_$1.json
