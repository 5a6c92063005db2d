"""pytest-benchmark wrapper of bench_search at the tiny scale:

    python -m pytest benchmarks/test_bench_search.py --benchmark-only
"""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_search  # noqa: E402

pytest.importorskip("pytest_benchmark")


@pytest.mark.parametrize("mode", ["reference", "sequential", "batched"])
def test_search_throughput_tiny(benchmark, mode):
    args = ["--scale", "tiny", "--candidates", "10", "--ks", "10", "--modes", mode]
    result = benchmark.pedantic(bench_search.main, args=(args,), rounds=1, iterations=1)
    row = next(iter(result["modes"].values()))
    assert row["candidates_per_s"] > 0
    benchmark.extra_info.update({k: v for k, v in row.items() if isinstance(v, (int, float))})
