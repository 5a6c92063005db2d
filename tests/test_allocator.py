"""fastshift.ops.tune_cpu_allocator: the glibc setting takes effect (a freed large tensor stays
in the heap instead of being unmapped), and the opt-out works. Each case runs in a fresh
process because the setting is process-wide."""

import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")

PROBE = textwrap.dedent("""
    import ctypes, sys, torch
    import fastshift.ops as ops

    class MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in
                    ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                     "uordblks", "fordblks", "keepcost")]

    libc = ctypes.CDLL(None)
    if not hasattr(libc, "mallinfo2"):
        print("no-mallinfo2"); sys.exit(0)
    libc.mallinfo2.restype = MallInfo2
    tuned = ops.tune_cpu_allocator(sys.argv[1])
    t = torch.empty(64 * 2**20, dtype=torch.uint8)  # 64 MiB, above glibc's mmap threshold
    t.fill_(1)
    del t
    # Kept: the freed 64 MiB are free bytes of the heap (fordblks). Unmapped: they are gone.
    # (The heap's growth is not the measure: it can fall a few KB short of 64 MiB when the
    # block starts in free space already at the top of the heap.)
    print(tuned, libc.mallinfo2().fordblks >= 64 * 2**20)
""")


def probe(device, **env):
    out = subprocess.run([sys.executable, "-c", PROBE, device], capture_output=True, text=True,
                         env={**os.environ, **env}, timeout=120)
    assert out.returncode == 0, out.stderr
    if out.stdout.strip() == "no-mallinfo2":
        pytest.skip("the C library has no mallinfo2")
    return out.stdout.split()


def test_tuned_allocator_keeps_freed_large_blocks():
    assert probe("cpu") == ["True", "True"]


def test_opt_out_and_non_cpu_devices_leave_malloc_alone():
    assert probe("cpu", FASTSHIFT_CPU_ALLOCATOR="0") == ["False", "False"]
    assert probe("cuda") == ["False", "False"]
