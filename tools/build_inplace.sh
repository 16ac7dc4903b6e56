#!/usr/bin/env bash
# Developer loop: build the extension (optimized, no LTO) and drop it next to the Python sources,
# where an editable install (`pip install -e .`) or PYTHONPATH=python imports it.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --features python --profile fastrel
# Copy then rename: overwriting a shared object in place crashes (SIGBUS) running processes
# that have it mapped.
target_dir="${CARGO_TARGET_DIR:-target}"
cp "$target_dir/fastrel/librsnorm.so" python/rsnorm/_rsnorm.abi3.so.tmp
mv -f python/rsnorm/_rsnorm.abi3.so.tmp python/rsnorm/_rsnorm.abi3.so
