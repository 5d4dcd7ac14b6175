#!/usr/bin/env bash
# The README's Performance table, measured on one GPU: each stage writes its JSON to OUT as soon as it ends,
# then the table and the target checks are printed from every JSON in OUT (and saved as OUT/table.md).
#
#   bash benchmarks/gpu_benchmarks.sh OUT [STAGE ...]      stages: sd15 sdxl compile (default: all three)
#
#   sd15     SD1.5 512 px batch 4 bf16: the default (CUDA graphs) and --cuda_graphs off; 400 steps end to end, both (~4 min)
#   sdxl     SDXL 1024 px batch 1 bf16: the default and --cuda_graphs off; 400 steps end to end, both     (~5 min)
#   compile  SD1.5 with --compile: cold compile in process, then a 400-step run with warm caches (~4 min)
#
# The stages share one work folder (the random pipelines are written once). On a machine with a 10-minute
# limit per command, run "sd15 sdxl" and then "compile" with the same OUT. Offline machines without diffusers:
# `pip download --no-deps diffusers==0.42.1 -d .whl` beforehand, there `pip install --no-deps --target /tmp/site
# .whl/*.whl` and PYTHONPATH=/tmp/site (the other requirements are in any CUDA PyTorch image with transformers). DTI_BENCH_ARGS is appended to every
# benchmark command (the test suite runs this file with DTI_BENCH_ARGS="--tiny --steps 2 ..."). Each stage prints the
# library versions and records them in its JSON.
set -uo pipefail
out=${1:?usage: gpu_benchmarks.sh OUT [sd15|sdxl|compile ...]}
shift
mkdir -p "$out"
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(sd15 sdxl compile)
here=$(cd "$(dirname "$0")" && pwd)
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
status=0
for stage in "${stages[@]}"; do
  start=$SECONDS
  case $stage in
    sd15) args=(--model sd15 --eager_row --e2e_steps 400 --json "$out/sd15.json") ;;
    sdxl) args=(--model sdxl --eager_row --e2e_steps 400 --json "$out/sdxl.json") ;;
    compile) args=(--model sd15 --compile --e2e_steps 400 --no_e2e_reference --json "$out/sd15_compile.json") ;;
    *) echo "unknown stage $stage (sd15, sdxl, compile)" >&2; exit 2 ;;
  esac
  # shellcheck disable=SC2086  # DTI_BENCH_ARGS is a list of flags
  "$py" "$here/benchmark_training.py" "${args[@]}" ${DTI_BENCH_ARGS:-} || status=1
  echo "stage $stage: $((SECONDS - start)) s, rc=$status"
done
# Each stage's JSON is also kept in $DTI_BENCH_RESULTS (default /tmp/dti-bench/results), so a later call on the
# same machine (e.g. "compile" after "sd15 sdxl") prints the whole table with the compile break-even.
keep=${DTI_BENCH_RESULTS:-/tmp/dti-bench/results}
mkdir -p "$keep"
existing=()
for name in sd15 sd15_compile sdxl; do
  [ -f "$out/$name.json" ] && cp "$out/$name.json" "$keep/$name.json"
  [ -f "$keep/$name.json" ] && existing+=("$keep/$name.json")
done
[ ${#existing[@]} -gt 0 ] && "$py" "$here/benchmark_training.py" --table "${existing[@]}" | tee "$out/table.md"
exit $status
