#!/bin/bash
# The OpenMP workers' spin-wait against the native kernels' threads, at two torch threads:
# each GOMP_SPINCOUNT in its own process (libgomp reads its environment once, when torch loads
# it), the settings alternated ROUNDS times (default 3): our mLSTM block (cell auto) against the
# official one (2026-12-06b's script), then `bench step` at two threads. From the repository root:
#   bash bench_results/speed_2026-12-06c/omp_spin_ab.sh [ROUNDS] [SETTINGS...]
# (SETTINGS: GOMP_SPINCOUNT values, "default" for libgomp's own, 300000, which mad_search now
# replaces when nothing is set; default: default 10000 30000). The log here ran before
# that change, with "default" unset. Prints one line per process; the step benchmark's JSON
# goes to step_spin<S>_r<R>.json, its progress lines nowhere.
O=bench_results/speed_2026-12-06c
PY=.venv/bin/python
ROUNDS=${1:-3}; shift
SETTINGS=${*:-default 10000 30000}
for round in $(seq 1 "$ROUNDS"); do
  for s in $SETTINGS; do
    if [ "$s" = default ]; then E="env GOMP_SPINCOUNT=300000"; else E="env GOMP_SPINCOUNT=$s"; fi
    blk=$($E $PY bench_results/speed_2026-12-06b/mlstm_cell_forms.py 2 256 auto | awk 'NR<=2 {printf "%s %s ", $1, $3}')
    $E $PY -m mad_search.bench step threads=2 steps=10 warmup=3 \
      'patterns=[mlstm*4,slstm*4,(attention swiglu)*2,(mamba swiglu)*2]' \
      out=$O/step_spin${s}_r$round.json > /dev/null 2>&1
    step=$($PY -c "import json,sys; d=json.load(open(sys.argv[1])); print(' '.join(f\"{r['pattern']}={r['ms_per_step']:.1f}\" for r in d['rows']))" $O/step_spin${s}_r$round.json)
    echo "round $round spin $s | block ms: $blk| step ms: $step"
  done
done
