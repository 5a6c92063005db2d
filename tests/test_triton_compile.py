"""The Triton kernels compile for the GPU (sm_90) at the specializations the backend launches,
through Triton's own compiler and ptxas, without a GPU (tests/triton_compile.py). The CPU tests
run the kernels in Triton's interpreter, which neither type-checks nor lowers them."""

import json
import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")

HERE = os.path.dirname(os.path.abspath(__file__))


def _has_nvidia_backend():
    try:
        import triton.backends.nvidia.compiler  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means: cannot compile here
        return False
    return True


@pytest.mark.skipif(not _has_nvidia_backend(), reason="triton without its NVIDIA backend")
def test_triton_kernels_compile_for_sm90(tmp_path):
    out = tmp_path / "compile.json"
    env = dict(os.environ, TRITON_INTERPRET="0",
               PYTHONPATH=os.pathsep.join([os.path.dirname(HERE),
                                           os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, os.path.join(HERE, "triton_compile.py"),
                           "--arch", "90", "--json", str(out)],
                          capture_output=True, text=True, env=env, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    result = json.loads(out.read_text())
    from triton_compile import kernel_names
    launched = set(kernel_names())
    compiled = {r["kernel"] for r in result["results"] if r["ok"]}
    assert launched and compiled == launched, (launched, compiled)
    assert all(r["ok"] for r in result["results"])
    # float16 / bfloat16 (CUDA-only at run time) are among the compiled specializations
    types = {t for r in result["results"] for t in r["signature"].values()}
    assert {"*fp32", "*fp64", "*fp16", "*bf16"} <= types, types
