"""The CPU bodies' 1x1-layer matrix products (csrc/cpu/gemm.h) against MKL's sgemm, one thread.

Compiles benchmarks/bench_gemm.cpp with the C++ compiler (g++ or $CXX) against the installed
torch (whose libtorch_cpu carries the MKL sgemm that at::mm calls), runs it with one OpenMP /
MKL thread and writes its JSON: per SPOS shape of `bench_ops.py --scale cpu` the forward
product z = x w^T and the weight gradient dw = dz^T x, milliseconds and GFLOP/s of each, after
checking both against MKL's result. One thread, so the numbers are the kernels' own; the
extension splits the same products over threads (block_cpu.cpp).

usage: python benchmarks/bench_gemm.py --out gemm.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_search import machine_name  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def build(out_dir: str) -> str:
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        raise SystemExit("bench_gemm: no C++ compiler found (set CXX)")
    lib = os.path.join(os.path.dirname(torch.__file__), "lib")
    binary = os.path.join(out_dir, "bench_gemm")
    cmd = [cxx, "-O3", "-std=c++20", "-Wno-psabi", os.path.join(HERE, "bench_gemm.cpp"),
           "-o", binary, f"-L{lib}", "-ltorch_cpu", "-lc10", f"-Wl,-rpath,{lib}"]
    subprocess.run(cmd, check=True)
    return binary


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=None, help="JSON output file")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        binary = build(tmp)
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        run = subprocess.run([binary], env=env, capture_output=True, text=True)
    if run.returncode != 0:
        sys.stderr.write(run.stderr)
        raise SystemExit(run.returncode)
    result = json.loads(run.stdout)
    result.update(machine=machine_name(), torch=torch.__version__)
    for row in result["rows"]:
        for key in ("forward", "weight_grad"):
            ms = row[f"{key}_ms"]
            row[f"{key}_speedup"] = ms["mkl"] / ms["fastshift"]
        print(f"M={row['M']:6d} C={row['C']:4d} O={row['O']:4d}  forward "
              f"{row['forward_gflops']['mkl']:6.1f} -> {row['forward_gflops']['fastshift']:6.1f}"
              f" GFLOP/s  weight grad {row['weight_grad_gflops']['mkl']:6.1f} -> "
              f"{row['weight_grad_gflops']['fastshift']:6.1f} GFLOP/s", flush=True)
    text = json.dumps(result, indent=2)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    else:
        print(text)


if __name__ == "__main__":
    main()
