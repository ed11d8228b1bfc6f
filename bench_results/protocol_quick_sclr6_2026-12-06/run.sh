#!/bin/bash
# `quick` with selective copying at learning rate 6e-3 instead of 3e-3 (one model seed, 1,500
# steps as before): the `quick` studies of bench_results/protocol_quick_2026-12-06_nr1500/seed<S>
# copied, renamed mad:quick_sclr6:... and resumed, so only the selective-copying run of each
# sequence trains. One worker x one thread; run seeds 0 and 1 side by side:
#   bash bench_results/protocol_quick_sclr6_2026-12-06/run.sh 0 & bash .../run.sh 1
# A second argument replaces the patterns (e.g. 'patterns=[mlstm*3 slstm,(attention swiglu)*2]').
D=bench_results/protocol_quick_sclr6_2026-12-06
LV='extra_levels={quick_sclr6: {settings: baseline, warmup_steps: 100, lrs: [0.003], weight_decays: [0.0], d_model: 64, batch_size: 64, epochs: null, max_steps: 900, max_train_examples: 4096, num_test_examples: 256, eval_every: 100, per_task: {selective_copying: {max_steps: 1500, lrs: [0.006]}, noisy_in_context_recall: {max_steps: 1500}, compression: {max_steps: 1800}}}}'
P=${2:-'patterns=[mamba*4,mlstm*2,mlstm*3 slstm,(attention swiglu)*2,hyena swiglu attention swiglu,slstm*2,(hyena swiglu)*2,(gated_linear_attention swiglu)*2]'}
.venv/bin/python -m mad_search.bench protocol "$P" 'levels=[quick_sclr6]' reference= seed=$1 workers=1 "$LV" storage_dir=$D/seed$1 out=$D/seed$1/bench_protocol_quick_sclr6_seed$1.json
