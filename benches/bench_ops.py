"""Time every rsnorm op against naive NumPy, PyTorch and onnxruntime (when installed).

A thin wrapper over the engine shipped in the package, so this script and ``rsnorm bench``
always measure the same thing. Options: ``python benches/bench_ops.py --help``.

    python benches/bench_ops.py --quick --json bench.json --plot bench.png
"""

import sys

from rsnorm._bench import main

if __name__ == "__main__":
    sys.exit(main(prog="bench_ops.py"))
