"""``python -m benchmarks.bench_ops``: :mod:`colabx.bench.ops` (also ``colabx bench``) with its
JSON written under ``benchmarks/results/`` (see that module for the options)."""

import sys

from colabx.bench.ops import main

if __name__ == "__main__":
    main(sys.argv[1:], prog="python -m benchmarks.bench_ops",
         default_out="benchmarks/results/ops_{device}.json")
