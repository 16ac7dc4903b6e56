"""GPU benchmark of rsnorm.gpu (WebGPU) against PyTorch CUDA when present.

A thin wrapper: the benchmark ships with the wheel as ``rsnorm.gpu.bench`` (also reachable as
``rsnorm bench --backend gpu``). Example on a GPU machine::

    python benches/gpu_bench.py --ops all --size-mib 64,256 --json gpu.json
    python benches/gpu_bench.py --layout nhwc --dtype float16

See ``python -m rsnorm.gpu.bench --help`` for the options and the meaning of each column.
"""

import sys

from rsnorm.gpu.bench import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
