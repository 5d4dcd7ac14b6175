#!/usr/bin/env bash
# The real-path checks to run on a GPU before a release (benchmarks/gpu_checks.py says what they assert):
#
#   bash benchmarks/gpu_checks.sh OUT            full-size random SD1.5 and SDXL pipelines (about 3 minutes on an H100)
#   bash benchmarks/gpu_checks.sh OUT --tiny     tiny pipelines on the CPU, as CI runs it: every check but the capture
#
# The pipelines go to $DTI_BENCH_WORKDIR (default /tmp/dti-bench), shared with gpu_benchmarks.sh. On an offline machine
# without diffusers, carry its wheel as gpu_benchmarks.sh explains. The exit code is the number of failed checks.
set -uo pipefail
out=${1:?usage: gpu_checks.sh OUT [--tiny]}
shift
mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || true
"${PYTHON:-python3}" "$(cd "$(dirname "$0")" && pwd)/gpu_checks.py" --out "$out" --workdir "${DTI_BENCH_WORKDIR:-/tmp/dti-bench}" "$@" | tee "$out/checks.txt"
