"""Compile the Triton kernels of the ``triton`` backend for a CUDA GPU, on a machine without one.

The Triton interpreter (``TRITON_INTERPRET=1``, what the CPU tests use) runs the kernels as
NumPy code; it does not type-check or lower them, so a kernel can pass every interpreted test
and still fail to compile for a GPU. This script closes that gap without a GPU:

1. record: the launchers of ``fastshift.ops.triton`` run on CPU tensors with every kernel
   replaced by a recorder, so no kernel runs and each launch leaves its specialization as
   Triton's JIT would make it (each argument's type, alignment / divisibility-by-16 hints and
   ints equal to 1 compiled in, through Triton's own specialization function; the value of
   each ``tl.constexpr``), and once more without the pointers' alignment hints, as a view at
   an unaligned offset is launched. Cases: both fused ops, forward and backward, training
   and eval, k = 3/5/7, stride 1/2, float32/float64/float16/bfloat16, 1 or 2 row groups, over
   shapes whose channel and width counts reach every block size the launchers pick.
2. compile: specializations go through Triton's own compiler for the target (default
   ``cuda`` sm_90, the H100/H200) down to a cubin, ptxas included, in worker processes (one
   per core): a compiler that crashes (it has: see ``_channel_sums_kernel``) takes down its
   worker only, and the specialization it was compiling is reported as crashed with the
   signal. Where ``cuobjdump`` (shipped with triton) is found, each cubin's registers, stack
   and local memory are read.

By default a covering subset is compiled: per kernel, specializations are picked until every
pair of values of its ``tl.constexpr`` parameters, argument types and hints seen in the
recording has been compiled at least once (444 of 3,576; a few minutes on 2 cores with an
empty Triton cache, about 1 s per compile per core). ``--all`` compiles every one (at that
rate, about half an hour on 2 cores). Run it in a process where ``TRITON_INTERPRET`` is not
1 (the kernels must be JIT functions):

  python tests/triton_compile.py [--all] [--arch 90] [--jobs N] [--json OUT.json]

It prints one line per kernel (specializations, compiled, worst registers / stack / local
memory) and exits non-zero when any specialization fails or crashes.
``tests/test_triton_compile.py`` runs the default subset.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import inspect
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile

import torch

HALF = (torch.float16, torch.bfloat16)
# the launchers pick block sizes from the channel count (16..64) and the map width (4..16)
DW_CASES = [(2, c, hw, hw, k, s) for c in (5, 24, 40, 160) for hw in (3, 9, 28)
            for k in (3, 5, 7) for s in (1, 2)]
PW_CASES = [(2, c, o, hw, hw) for c, o in ((5, 11), (24, 40), (160, 160), (40, 640))
            for hw in (1, 9, 28)]
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _kernels():
    from fastshift.ops.triton import kernels
    return kernels


def kernel_names():
    """The kernels the launchers start (``kernels.<name>[grid](...)``), not the device helpers."""
    return [n for n, v in vars(_kernels()).items() if n.endswith("_kernel") and hasattr(v, "fn")]


class _Recorder:
    """Stands for a kernel: ``rec[grid](*args, **kwargs)`` records the specialization only."""

    def __init__(self, name, kernel, specs):
        self.name, self.specs = name, specs
        self.signature = inspect.signature(kernel.fn)

    def __getitem__(self, grid):
        return self._launch

    def _launch(self, *args, **kwargs):
        bound = self.signature.bind(*args, **kwargs)
        signature, constexprs, attrs = {}, {}, {}
        for name, param in self.signature.parameters.items():
            value = bound.arguments[name]
            if "constexpr" in str(param.annotation):
                signature[name] = "constexpr"
                constexprs[name] = ({"dtype": value.name} if hasattr(value, "primitive_bitwidth")
                                    else value)
                continue
            kind, key = _specialize(value)
            signature[name] = kind
            if kind == "constexpr":  # an int equal to 1: the JIT compiles it in
                constexprs[name] = value
            elif key:
                attrs[name] = key
        self.specs.append({"kernel": self.name, "signature": signature,
                           "constexprs": constexprs, "attrs": attrs})


def _specialize(value):
    """(type, key) of a runtime argument exactly as Triton's JIT launch specializes it: the
    type string, and "D" when a pointer is 16-byte aligned or an int divisible by 16 (the
    ``tt.divisibility`` hint); ints equal to 1 become constexprs. The CPU tensors recorded
    here have the GPU run's alignment: fresh allocations are aligned on both, and views keep
    the same offsets."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend
    return native_specialize_impl(BaseBackend, value, False, True, True)


@contextlib.contextmanager
def _recording(specs):
    import fastshift.ops.triton as launchers
    kernels = _kernels()
    names = kernel_names()
    saved = {n: getattr(kernels, n) for n in names}
    check = launchers._check_common

    def as_checkable(t):  # half precision is CUDA-only at run time; recording is not a run
        return t.float() if t.dtype in HALF else t

    def check_any_device(op, x, weight, groups):
        check(op, as_checkable(x), as_checkable(weight), groups)

    try:
        for n in names:
            setattr(kernels, n, _Recorder(n, saved[n], specs))
        launchers._check_common = check_any_device
        yield names
    finally:
        for n in names:
            setattr(kernels, n, saved[n])
        launchers._check_common = check


def record():
    """Every distinct kernel specialization the launchers use over the cases above."""
    import fastshift.ops.triton as t
    specs = []
    with _recording(specs) as names:
        # groups 2 of the 2 rows: one row per group, an int equal to 1 that the JIT compiles in
        for dtype, training, g in itertools.product(DTYPES, (True, False), (1, 2)):
            for r, c, h, w, k, s in DW_CASES:
                x = torch.rand(r, c, h, w, dtype=dtype).contiguous(
                    memory_format=torch.channels_last)
                wt = torch.rand(c, 1, k, k, dtype=dtype)
                mean, var = torch.zeros(g, c, dtype=dtype), torch.ones(g, c, dtype=dtype)
                y, _, _ = t.dwconv_bn(x, wt, mean, var, s, g, 1e-5, training)
                t.dwconv_bn_backward(torch.rand_like(y), x, wt, y, var, s, g, 1e-5, training)
            for r, c, o, h, w in PW_CASES:
                x = torch.rand(r, c, h, w, dtype=dtype).contiguous(
                    memory_format=torch.channels_last)
                wt = torch.rand(o, c, 1, 1, dtype=dtype)
                mean, var = torch.zeros(g, o, dtype=dtype), torch.ones(g, o, dtype=dtype)
                y, xhat, _, _ = t.pwconv_bn_relu(x, wt, mean, var, g, 1e-5, training)
                t.pwconv_bn_relu_backward(torch.rand_like(y), x, wt, y, xhat, var, g, 1e-5,
                                          training)
    # A view that starts at an unaligned offset (a row slice of an odd-sized map, say) loses
    # the pointers' alignment hints: each launch is also kept in that form.
    for spec in list(specs):
        ptrs = {n for n, kind in spec["signature"].items() if kind.startswith("*")}
        specs.append(dict(spec, attrs={k: v for k, v in spec["attrs"].items() if k not in ptrs}))
    distinct = {json.dumps(s, sort_keys=True): s for s in specs}
    return names, list(distinct.values())


@functools.cache
def _cuobjdump():
    import triton.backends.nvidia as nvidia  # triton ships cuobjdump beside its ptxas
    candidates = (os.path.join(os.path.dirname(nvidia.__file__), "bin", "cuobjdump"),
                  shutil.which("cuobjdump") or "", "/usr/local/cuda/bin/cuobjdump")
    return next((p for p in candidates if p and os.path.exists(p)), None)


def _resources(cubin: bytes):
    """REG / STACK / LOCAL / SHARED of a cubin through cuobjdump, or None without it."""
    tool = _cuobjdump()
    if tool is None:
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "-res-usage", f.name], capture_output=True,
                              text=True).stdout
    out = {}
    for key in ("REG", "STACK", "LOCAL", "SHARED"):
        for tok in text.replace(",", " ").split():
            if tok.startswith(key + ":"):
                out[key.lower()] = int(tok.split(":")[1])
                break
    return out


def covering_subset(specs):
    """Per kernel, a greedy pairwise cover: specializations are taken until every pair of
    (constexpr or argument-type list, value) settings seen in the recording has been compiled
    at least once (crashes come from such pairs: MODE 2 with BLOCK_C >= 32, for one)."""
    def items(spec):
        out = [(name, json.dumps(v, sort_keys=True)) for name, v in spec["constexprs"].items()]
        return out + [("signature", json.dumps(spec["signature"], sort_keys=True)),
                      ("attrs", json.dumps(spec["attrs"], sort_keys=True))]

    chosen = []
    for kernel in dict.fromkeys(s["kernel"] for s in specs):
        mine = [s for s in specs if s["kernel"] == kernel]
        pairs = [set(itertools.combinations(items(s), 2)) or {tuple(items(s))} for s in mine]
        todo = set().union(*pairs)
        while todo:
            best = max(range(len(mine)), key=lambda i: len(pairs[i] & todo))
            chosen.append(mine[best])
            todo -= pairs[best]
    return chosen


def compile_one(spec, arch=90):
    """Compile one recorded specialization -> result dict (ok, error, resources)."""
    import triton
    import triton.language as tl
    from triton.backends.compiler import BaseBackend, GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(_kernels(), spec["kernel"])
    constexprs = {k: (tl.dtype(v["dtype"]) if isinstance(v, dict) else v)
                  for k, v in spec["constexprs"].items()}
    attrs = {(fn.arg_names.index(k),): BaseBackend.parse_attr(v)
             for k, v in spec["attrs"].items()}
    res = dict(spec)
    try:
        compiled = triton.compile(ASTSource(fn=fn, signature=spec["signature"],
                                            constexprs=constexprs, attrs=attrs),
                                  target=GPUTarget("cuda", arch, 32))
        res["ok"] = True
        res["resources"] = _resources(compiled.asm["cubin"])
    except Exception as exc:  # noqa: BLE001 - every failure is reported, none hidden
        res["ok"] = False
        res["error"] = f"{type(exc).__name__}: {str(exc)[-2000:]}"
    return res


def _worker(path, arch):
    """Compile the specs in the JSON file ``path``, announcing each before compiling it."""
    with open(path) as f:
        specs = json.load(f)
    for i, spec in enumerate(specs):
        print(f"BEGIN {i}", flush=True)
        print("RESULT " + json.dumps(compile_one(spec, arch)), flush=True)


def compile_all(specs, arch=90, jobs=None):
    """Compile every spec in worker subprocesses; a worker that dies (a compiler crash) marks
    the spec it had begun as crashed, and a new worker goes on with the rest of its share."""
    import concurrent.futures

    jobs = max(1, min(jobs or os.cpu_count() or 1, len(specs) or 1))
    env = dict(os.environ, TRITON_INTERPRET="0")

    def run_share(share):
        results = []
        while share:
            with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
                json.dump(share, f)
            try:
                proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker",
                                       f.name, "--arch", str(arch)], capture_output=True,
                                      text=True, env=env)
            finally:
                os.unlink(f.name)
            begun, done = None, 0
            for line in proc.stdout.splitlines():
                if line.startswith("BEGIN "):
                    begun = int(line.split()[1])
                elif line.startswith("RESULT "):
                    results.append(json.loads(line[len("RESULT "):]))
                    begun, done = None, done + 1
            if proc.returncode == 0 and done == len(share):
                break
            if begun is None:  # died outside a compile: report it, do not loop
                raise RuntimeError(f"compile worker failed (exit {proc.returncode}):\n"
                                   f"{proc.stderr[-3000:]}")
            how = (f"killed by {signal.Signals(-proc.returncode).name}"
                   if proc.returncode < 0 else f"exit {proc.returncode}")
            results.append(dict(share[begun], ok=False, error=(
                f"the compiler crashed (worker {how}) " + proc.stderr.strip()[-1500:])))
            share = share[begun + 1:]
        return results

    shares = [specs[i::jobs] for i in range(jobs)]
    with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
        return [r for part in pool.map(run_share, shares) for r in part]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability x10")
    parser.add_argument("--json", default=None, help="write every result here")
    parser.add_argument("--all", action="store_true",
                        help="every recorded specialization, not the covering subset")
    parser.add_argument("--jobs", type=int, default=None, help="worker processes (cores)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("run without TRITON_INTERPRET=1: the kernels must be JIT functions")
    if args.worker:
        _worker(args.worker, args.arch)
        return 0
    import triton

    names, specs = record()
    recorded = len(specs)
    if not args.all:
        specs = covering_subset(specs)
    results = compile_all(specs, args.arch, args.jobs)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"triton": triton.__version__, "torch": torch.__version__,
                       "arch": args.arch, "kernels": names, "recorded": recorded,
                       "results": results}, f, indent=1)
    failed = [r for r in results if not r["ok"]]
    print(f"triton {triton.__version__}, target cuda sm_{args.arch}: {len(results)} of "
          f"{recorded} recorded specializations of {len(names)} kernels compiled, "
          f"{len(failed)} failed")
    for name in names:
        mine = [r for r in results if r["kernel"] == name]
        res = [r["resources"] for r in mine if r["ok"] and r.get("resources")]
        worst = (f"regs <= {max(x.get('reg', 0) for x in res)}, "
                 f"stack <= {max(x.get('stack', 0) for x in res)}, "
                 f"local <= {max(x.get('local', 0) for x in res)}") if res else "no resources"
        print(f"  {name}: {len(mine)} specializations, {sum(r['ok'] for r in mine)} compiled; "
              f"{worst}")
    for r in failed[:5]:
        print(f"FAILED {r['kernel']} {r['signature']} {r['constexprs']}\n  {r['error']}")
    return 1 if failed or not results else 0


if __name__ == "__main__":
    sys.exit(main())
