"""The build: the C++ unit tests through CMakeLists.txt, and `fastshift info`."""

import os
import shutil
import subprocess
import sys

import pytest
import torch

from fastshift import info, ops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake not installed")
def test_cmake_build_and_ctest(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable)
    build = tmp_path / "cmake"
    proc = subprocess.run(["bash", os.path.join(ROOT, "scripts", "ctest.sh"), str(build)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "100% tests passed" in proc.stdout


def test_info_reports_the_build():
    facts = info.collect()
    assert facts["extension_built"] == ops.HAVE_C
    assert "reference" in facts["backends_usable"]
    text = info.report()
    assert "fastshift._C: built" in text or "NOT built" in text
    out = subprocess.run([sys.executable, "-m", "fastshift", "info", "--json"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert '"extension_built": true' in out.stdout


def _setup_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("fastshift_setup", os.path.join(ROOT, "setup.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # setup() itself runs only under __main__
    return mod


@pytest.mark.skipif(not ops.HAVE_C, reason="fastshift._C not built")
def test_extension_uses_the_shared_cxx_runtime():
    """fastshift._C takes __cxa_throw & co. from the shared libstdc++: with its own copy, a
    C++ argument error would crash the process instead of raising (setup.py refuses that)."""
    from fastshift import _C

    own = _setup_module().own_cxx_runtime(_C.__file__)
    if own is None:
        pytest.skip("nm not available")
    assert own == []


@pytest.mark.skipif(shutil.which("g++") is None or shutil.which("nm") is None,
                    reason="needs g++ and nm")
@pytest.mark.parametrize("static", [False, True])
def test_own_cxx_runtime_detects_static_libstdcxx(tmp_path, static):
    src = tmp_path / "t.cpp"
    src.write_text('#include <stdexcept>\nextern "C" void f(int x) '
                   '{ if (x) throw std::runtime_error("x"); }\n')
    lib = tmp_path / "t.so"
    cmd = ["g++", "-shared", "-fPIC", str(src), "-o", str(lib)]
    proc = subprocess.run(cmd + (["-static-libstdc++"] if static else []), capture_output=True,
                          text=True, timeout=120)
    if proc.returncode != 0 and static:
        pytest.skip(f"no static libstdc++ to link here: {proc.stderr[-200:]}")
    assert proc.returncode == 0, proc.stderr
    own = _setup_module().own_cxx_runtime(str(lib))
    assert own == (["__cxa_throw", "__gxx_personality_v0"] if static else [])


def test_cuda_arch_codes_parses_the_arch_list():
    codes = _setup_module().cuda_arch_codes
    assert codes("9.0") == [90]
    assert codes("8.0;9.0a") == [80, 90]
    assert codes("7.5 8.6+PTX") == [75, 1086]
    assert codes("Hopper;9.0") == [90]  # names are left out
    assert codes("") == []


def test_extension_reports_its_cuda_archs():
    """The build records the GPUs its CUDA bodies were compiled for; `auto` reads them."""
    archs = list(torch.ops.fastshift.cuda_archs()) if ops.HAVE_C else []
    if not ops.cuda_built():
        assert archs == [] and ops.CUDA_ARCHS == ()
        return
    assert archs and all(30 <= a % 1000 < 200 for a in archs)
    assert ops.CUDA_ARCHS == tuple(archs)
    assert "sm_" in info.report()
