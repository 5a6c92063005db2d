"""The build: the C++ unit tests through CMakeLists.txt, and `fastshift info`."""

import os
import shutil
import subprocess
import sys

import pytest

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
