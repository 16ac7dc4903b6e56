#!/usr/bin/env bash
# GPU checks on a lent NVIDIA machine (the workplace's `device` tool), as one prepared script:
# the GPU tests on a real adapter, then `rsnorm.gpu.bench` against PyTorch CUDA in one process.
#
# That machine reaches no package index, so what it lacks travels with the working tree:
#   .whl/  wgpu-py and its pure-Python/cp312 dependencies (pip download --python-version 3.12)
#   .gl/   the Vulkan loader (libvulkan1 .deb; the NVIDIA ICD comes with the driver mount)
#   python/rsnorm/_rsnorm.abi3.so  this machine's build (abi3, so it loads in Python 3.12)
# Results land in $OUT (bench tables as text and JSON, the pytest log).
set -u
OUT=${OUT:-/tmp/rsnorm-device-out}
mkdir -p "$OUT"
for f in .gl/*.deb; do dpkg -x "$f" /; done
ldconfig
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=$PWD/python:/tmp/site PYTHONUNBUFFERED=1 RSNORM_GPU_ADAPTER=nvidia
icd=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
[ -e "$icd" ] || icd=$(find / -name nvidia_icd.json -not -path '/proc/*' 2>/dev/null | head -1)
[ -n "$icd" ] && export VK_DRIVER_FILES=$icd
echo "ICD: ${icd:-none}"
nvidia-smi -L
python3 -c "import rsnorm, torch, rsnorm.gpu as g; print(rsnorm.__version__, torch.__version__); print(g.info())" \
    2>&1 | tee "$OUT/info.txt" || exit 1

b() { timeout "$1" python3 -m rsnorm.gpu.bench "${@:2}"; }
b 100 --ops all --size-mib ${SIZES:-256} --json "$OUT/gpu_f32.json" 2>&1 | tee "$OUT/bench_f32.txt"
b 45 --ops bn,bn_eval,ln,rms,gn,in --layout nhwc --size-mib 256 --json "$OUT/gpu_nhwc.json" 2>&1 \
    | tee "$OUT/bench_nhwc.txt"
b 45 --ops bn,ln,rms,gn --dtype float16 --size-mib 256 --json "$OUT/gpu_f16.json" 2>&1 \
    | tee "$OUT/bench_f16.txt"
# How the statistics kernels depend on the reduction workgroup size (occupancy vs tree depth)
# and on re-reading x for the apply (keep_x: the fused kernel keeps it in registers).
b 60 --ops ln,rms,in,bn,gn,ln_bwd --red-wg 64,128 --keep-x --no-torch --json "$OUT/gpu_sweep.json" 2>&1 \
    | tee "$OUT/bench_sweep.txt"
timeout 100 python3 -m pytest -q -rf -p no:cacheprovider tests/python/test_gpu.py \
    tests/python/test_gpu_backward.py tests/python/hostile/test_gpu_limits.py >"$OUT/pytest_gpu.txt" 2>&1
tail -5 "$OUT/pytest_gpu.txt"
