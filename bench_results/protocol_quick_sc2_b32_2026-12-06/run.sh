#!/bin/bash
# usage: run.sh GROUP (a or b); runs seed 0 then seed 1 for that group's four sequences
D=bench_results/protocol_quick_sc2_b32_2026-12-06
LV='extra_levels={quick_sc2_b32: {settings: baseline, warmup_steps: 100, lrs: [0.003], weight_decays: [0.0], d_model: 64, batch_size: 64, epochs: null, max_steps: 900, max_train_examples: 4096, num_test_examples: 256, eval_every: 100, per_task: {selective_copying: {max_steps: 1500, batch_size: 32, seeds: 2}, noisy_in_context_recall: {max_steps: 1500}, compression: {max_steps: 1800}}}}'
if [ "$1" = a ]; then P='patterns=[mamba*4,(gated_linear_attention swiglu)*2,(attention swiglu)*2,slstm*2]'
else P='patterns=[mlstm*3 slstm,(hyena swiglu)*2,hyena swiglu attention swiglu,mlstm*2]'; fi
for s in 0 1; do
  .venv/bin/python -m mad_search.bench protocol "$P" 'levels=[quick_sc2_b32]' reference= seed=$s workers=1 "$LV" storage_dir=$D/seed${s}_$1 out=$D/seed${s}_$1/bench_protocol_quick_sc2_b32_seed${s}_$1.json
done
