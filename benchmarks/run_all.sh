#!/bin/sh
# Run every benchmark in turn and print its Markdown tables (paste them into the README).
# Usage: benchmarks/run_all.sh [--quick]   (--quick: fewer repeats, smaller sizes; for a smoke run)
set -eu
cd "$(dirname "$0")"
if [ "${1:-}" = "--quick" ]; then
    python bench_plan.py --sessions 2000 --deep-sessions 100 --repeat 2
    python bench_download.py --only small --repeat 1
    python bench_check.py --sessions 500 --outputs 20 --hash-files 8 --repeat 1
    python bench_lock.py --sizes 1000
    python bench_apply.py --sessions 4
else
    python bench_plan.py
    python bench_download.py
    python bench_check.py
    python bench_lock.py
    python bench_apply.py
fi
