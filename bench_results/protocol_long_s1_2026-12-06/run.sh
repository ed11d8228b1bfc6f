#!/bin/bash
# `long` at model seed 1 (seed 0's data), for the tasks whose `long` scores are not saturated:
# compression and fuzzy recall at both of `long`'s learning rates, selective copying at 3e-3
# (the rate that won it at seed 0 for every sequence, by 0.01-0.30 in validation accuracy, or a
# tie at 0.998 for attention). In-context recall, noisy recall and memorization, 0.996-1.0 at seed
# 0 for every sequence but GLA (noisy recall 0.61), are taken from seed 0. One worker x one thread; two processes side by side:
#   bash bench_results/protocol_long_s1_2026-12-06/run.sh a & bash .../run.sh b
# A second argument replaces the patterns.
D=bench_results/protocol_long_s1_2026-12-06
LV='extra_levels={long_s1: {tasks: [compression, fuzzy_in_context_recall, selective_copying], settings: baseline, warmup_steps: 100, lrs: [0.001, 0.003], weight_decays: [0.0], d_model: 64, batch_size: 64, epochs: null, max_steps: 1800, max_train_examples: 4096, num_test_examples: 256, eval_every: 200, per_task: {selective_copying: {lrs: [0.003]}}}}'
case $1 in
  a) P='patterns=[mamba*4,(hyena swiglu)*2,(gated_linear_attention swiglu)*2]' ;;
  b) P='patterns=[(attention swiglu)*2,mlstm*3 slstm,slstm*2,mlstm*2,hyena swiglu attention swiglu]' ;;
esac
P=${2:-$P}
.venv/bin/python -m mad_search.bench protocol "$P" 'levels=[long_s1]' reference= seed=1 workers=1 "$LV" storage_dir=$D/$1 out=$D/$1/bench_protocol_long_s1_$1.json
