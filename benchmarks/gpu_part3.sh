#!/usr/bin/env bash
# Issue 15, part 3: every GPU measurement in one device run (never part of CI).
#
# The lent machine (device tool, nvidia-h200 image) has torch, Triton, transformers and
# peft but not optree, and older transformers/peft than CI tests; carry wheels. Once, in
# the repo root on the development machine:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#       -d .whl optree==0.20.0 transformers==5.24.0 peft==0.21.2
# then the device tool's run: command "bash benchmarks/gpu_part3.sh", carry [".whl"], timeout_s 600.
# The image's Triton 3.6 compiles all 72 kernel variants for sm_90
# (benchmarks/results/compile-sm90-triton3.6.md); its interpreter is not used there.
# Writes device.txt, tests.log, <preset>.log and the benchmarks' .md/.json into a staging folder
# and, after every step, packs it into $OUT/gpu-part3.tar.gz (the device tool brings back at most
# 8 files; a run cut short keeps what its finished steps wrote); unpack it and copy the .md/.json
# into benchmarks/results/. The steps' timeouts add up to 550 s (590 s without pytest-xdist).
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/funcprobe-gpu}
STAGE=$(mktemp -d)
mkdir -p "$OUT"
pack() { tar -C "$STAGE" -czf "$STAGE.tar.gz" . && mv "$STAGE.tar.gz" "$OUT/gpu-part3.tar.gz"; }
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, triton, transformers, peft, optree; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
} 2>&1 | tee "$STAGE/device.txt"; pack
# 1. the kernels compiled, against MATH / the blockwise attention / the generic path (CUDA tensors);
#    compiling the tests' kernel variants is CPU work: 8 pytest-xdist workers (in the image)
XDIST=$(python3 -c "import xdist" 2>/dev/null && echo "-n 8")
timeout -k 5 "$([ -n "$XDIST" ] && echo 110 || echo 150)" python3 -m pytest -q -p no:cacheprovider $XDIST \
  tests/test_triton_attention.py tests/test_jvp_rules.py tests/test_forward.py 2>&1 | tee "$STAGE/tests.log"; pack
# 2. attention alone: kernels vs SDPA's flash forward, T = 1k..8k
timeout -k 5 90 python3 benchmarks/flash_jvp.py --out "$STAGE" 2>&1 | tee "$STAGE/flash-jvp.log"; pack
# 3. where the jvp's time goes on the 0.5B shape at T = 1280: the probe's float32 compute (the
#    default for bf16 weights) against precision=model, then kernels="triton" (benchmarks/gpu_diag.py)
timeout -k 5 190 python3 benchmarks/gpu_diag.py --preset qwen2.5-0.5b --precision auto,model --triton \
  2>&1 | tee "$STAGE/diag-qwen2.5-0.5b.log"; pack
# 4. the issue's table on the 0.5B preset, one repeat: on 2026-12-04 (H200) one funcprobe jvp took 25 s
#    there (31 s with Triton's compile; no-grad MATH forward 1.7 s), so three repeats of six methods on
#    two presets (the former step) cannot finish in one call (benchmarks/results/gpu-h200-2026-12-04/);
#    funcprobe_jvp is now the default kernels="off" (23.7 s there), funcprobe_jvp_triton the kernels
timeout -k 5 140 python3 benchmarks/bench_conditional_variance.py --preset qwen2.5-0.5b --repeats 1 --no-plots \
  --out "$STAGE" --methods nograd_forward_flash,nograd_forward,funcprobe_jvp 2>&1 | tee "$STAGE/qwen2.5-0.5b.log"; pack
