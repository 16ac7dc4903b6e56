#!/usr/bin/env bash
# Developer loop: build the extension (optimized, no LTO) and drop it next to the Python sources,
# where an editable install (`pip install -e .`) or PYTHONPATH=python imports it.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --features python --profile fastrel
cp target/fastrel/librsnorm.so python/rsnorm/_rsnorm.abi3.so
