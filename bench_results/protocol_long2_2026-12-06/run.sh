#!/bin/bash
# `long2` (`long` at model seeds 0 and 1, their accuracies averaged): resumes the studies that
# make_long2.py started here, so only the second-seed runs not yet trained run. One worker x one
# thread; two processes side by side:
#   bash bench_results/protocol_long2_2026-12-06/run.sh a & bash .../run.sh b
# A second argument replaces the patterns.
D=bench_results/protocol_long2_2026-12-06
LV='extra_levels={long2: {settings: baseline, warmup_steps: 100, lrs: [0.001, 0.003], weight_decays: [0.0], d_model: 64, batch_size: 64, epochs: null, max_steps: 1800, max_train_examples: 4096, num_test_examples: 256, eval_every: 200, seeds: 2}}'
case $1 in
  a) P='patterns=[mamba*4,(hyena swiglu)*2,(gated_linear_attention swiglu)*2]' ;;
  b) P='patterns=[(attention swiglu)*2,mlstm*3 slstm,slstm*2,mlstm*2,hyena swiglu attention swiglu]' ;;
esac
P=${2:-$P}
.venv/bin/python -m mad_search.bench protocol "$P" 'levels=[long2]' reference= seed=0 workers=1 "$LV" storage_dir=$D/$1 out=$D/$1/bench_protocol_long2_$1.json
