"""Per-op and per-block speed of every usable backend against the plain-PyTorch reference.

Workload (--scale): the SPOS ShuffleNetV2 shapes of bench_search.py's scale:
  cpu   64x64 input, batch 64           gpu   224x224 input, batch 150
For every stage of the space, its first layer (stride 2) and its second (stride 1) are taken;
at those layers:
  dwconv_bn        the main-branch depthwise conv + BN of each Shuffle choice (k = 3, 5, 7)
  pwconv_bn_relu   the first 1x1 conv + BN + ReLU of the Shuffle units
  shuffle_cat      a stride-1 unit's concat fused with the next unit's channel split
                   (reference: torch.cat, then the even/odd split, then the concat of the halves)
  block            the whole mixed-choice block of each choice (Shuffle3/5/7, Xception)
and once, at the network's head:
  linear           the classifier (last_channels -> classes, no bias) on the pooled features
                   (input [batch, C, 1, 1], flattened inside the timed call)
Each entry is timed in training mode (batch statistics, running statistics updated), as
forward alone ("fwd") and forward + backward ("fwd_bwd"), median of --repeats after a warm-up.
The reference gets its natural input (contiguous NCHW); compiled backends get channels-last
input (what the previous fused layer hands them).

Correctness first: every backend is compared with the reference in float64 at the same shapes
on 4 rows (values and both gradients, relative error < 1e-9) before anything is timed.

GFLOP/s = 2 x multiply-adds / s (fwd + bwd counted as 3 forwards). GB/s = the tensors an op
must at least read and write (input, weight, output; x3 for fwd + bwd) / s.
The summary gives, per backend, the block fwd + bwd speedup averaged over the four choices
and both strides (mean of per-block ratios), and the ratio of total times. matmul_floor: each
block's 1x1 convs alone at the in-run matmul peak (peak_gflops), everything else free; the
summary's ceiling is the mean of reference time / that floor.

usage: python benchmarks/bench_ops.py --scale cpu --out ops_cpu.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_search import _sync, machine_name, peak_gflops  # noqa: E402

import fastshift  # noqa: E402
from fastshift import ops  # noqa: E402
from fastshift.blocks import build_block  # noqa: E402

SCALES = {"cpu": dict(input_size=64, batch=64), "gpu": dict(input_size=224, batch=150)}


def _layers(space):
    """First (stride 2) and second (stride 1) layer of every stage."""
    picked, seen = [], set()
    for layer in space.layers:
        key = (layer.out_channels, layer.stride)
        if key not in seen:
            seen.add(key)
            picked.append(layer)
    return picked


def workloads(space, batch):
    """(kind, name, make(dtype, device, rows) -> (fn(backend, x), x, params), macs, bytes/elt)."""
    out = []
    dw_seen, pw_seen = set(), set()
    for layer in _layers(space):
        mid, h_in, h = layer.mid_channels, layer.in_size, layer.out_size
        c_in = layer.in_channels
        for choice in space.choices:
            if choice.kind == "shuffle":
                key = (mid, h_in, choice.kernel, layer.stride)
                if key not in dw_seen:
                    dw_seen.add(key)
                    out.append(_dw_entry(mid, h_in, h, choice.kernel, layer.stride, batch))
            out.append(_block_entry(space, layer, choice, batch))
        if layer.stride == 1:
            out.append(_shuffle_entry(c_in, layer.out_channels - c_in, h, batch))
        key = (c_in, mid, h_in)
        if key not in pw_seen:
            pw_seen.add(key)
            out.append(_pw_entry(c_in, mid, h_in, batch))
    out.append(_linear_entry(space.last_channels, space.num_classes, batch))
    return out


def _dw_entry(c, h_in, h, k, stride, batch):
    def make(dtype, device, rows):
        w = torch.randn(c, 1, k, k, dtype=dtype, device=device, requires_grad=True)
        rm, rv = torch.zeros(c, dtype=dtype, device=device), torch.ones(c, dtype=dtype,
                                                                          device=device)

        def fn(backend, x):
            return ops.dwconv_bn(x, w, stride, rm, rv, training=True, backend=backend)

        return fn, [w]
    elems = batch * c * (h_in * h_in + h * h)
    return dict(kind="dwconv_bn", name=f"dwconv_bn c{c} {h_in}x{h_in} k{k} s{stride}",
                make=make, in_shape=(c, h_in), macs=batch * c * h * h * k * k, elems=elems)


def _pw_entry(c_in, c_out, h, batch):
    def make(dtype, device, rows):
        w = torch.randn(c_out, c_in, 1, 1, dtype=dtype, device=device, requires_grad=True)
        rm = torch.zeros(c_out, dtype=dtype, device=device)
        rv = torch.ones(c_out, dtype=dtype, device=device)

        def fn(backend, x):
            return ops.pwconv_bn_relu(x, w, rm, rv, training=True, backend=backend)

        return fn, [w]
    elems = batch * h * h * (c_in + c_out) + c_in * c_out
    return dict(kind="pwconv_bn_relu", name=f"pwconv_bn_relu {c_in}->{c_out} {h}x{h}",
                make=make, in_shape=(c_in, h), macs=batch * h * h * c_in * c_out, elems=elems)


def _shuffle_entry(c_a, c_b, h, batch):
    def make(dtype, device, rows):
        def fn(backend, x):  # a, b: channel ranges of x (as the previous unit's output)
            a, b = x.split([c_a, c_b], 1)
            return ops.shuffle_cat(a, b, backend=backend)

        return fn, []
    return dict(kind="shuffle_cat", name=f"shuffle_cat {c_a}+{c_b} {h}x{h}", make=make,
                in_shape=(c_a + c_b, h), macs=0, elems=2 * batch * (c_a + c_b) * h * h)


def _linear_entry(c, classes, batch):
    def make(dtype, device, rows):
        w = torch.randn(classes, c, dtype=dtype, device=device) / c ** 0.5
        w.requires_grad_()

        def fn(backend, x):
            return ops.linear(x.flatten(1), w, backend=backend)

        return fn, [w]
    return dict(kind="linear", name=f"linear {c}->{classes}", make=make, in_shape=(c, 1),
                macs=batch * c * classes, elems=batch * (c + classes) + c * classes)


def _block_entry(space, layer, choice, batch):
    c_in = layer.in_channels if layer.stride == 2 else 2 * layer.in_channels
    h_in = layer.in_size

    def make(dtype, device, rows):
        torch.manual_seed(0)
        block = build_block(layer, choice).to(device=device, dtype=dtype).train()
        with torch.no_grad():
            for m in block.modules():
                if isinstance(m, torch.nn.Conv2d):
                    m.weight.normal_(0.0, 1.0 / m.weight.shape[1] ** 0.5)
        copies = {}

        def fn(backend, x):
            if backend not in copies:
                copies[backend] = copy.deepcopy(block)
                copies[backend].backend = backend
            return copies[backend](x)

        return fn, None, copies
    parts = space._block_parts(layer, choice)
    flops = sum(f for _, f, _ in parts)
    matmul = sum(f for kind, f, _ in parts if kind == "pointwise")
    elems = batch * (c_in * h_in * h_in + layer.out_channels * layer.out_size ** 2)
    return dict(kind="block", name=f"block {choice.name} layer{layer.index} s{layer.stride} "
                f"{c_in}x{h_in}x{h_in}", make=make, in_shape=(c_in, h_in), macs=batch * flops,
                matmul_macs=batch * matmul, elems=elems, choice=choice.name, stride=layer.stride,
                layer=layer.index)


def _input(entry, rows, dtype, device, backend):
    c, h = entry["in_shape"]
    x = torch.randn(rows, c, h, h, dtype=dtype, device=device)
    if backend != "reference":
        x = x.contiguous(memory_format=torch.channels_last)
    return x.requires_grad_()


def _params(made):
    fn, params = made[0], made[1]
    if params is not None:
        return fn, lambda backend: params
    copies = made[2]
    return fn, lambda backend: list(copies[backend].parameters())


def check(entry, backend, device):
    """float64, 4 rows: values and gradients (input and parameters) against the reference."""
    torch.manual_seed(1)
    fn, params_of = _params(entry["make"](torch.float64, device, 4))
    x_ref = _input(entry, 4, torch.float64, device, "reference")
    results = {}
    for b in ("reference", backend):
        x = x_ref.detach().clone()
        if b != "reference":
            x = x.contiguous(memory_format=torch.channels_last)
        x.requires_grad_()
        y = fn(b, x)
        g = torch.linspace(-1, 1, y.numel(), dtype=y.dtype, device=device).view_as(y)
        grads = torch.autograd.grad(y, [x, *params_of(b)], g)
        results[b] = (y.detach(), grads)
    (y0, g0), (y1, g1) = results["reference"], results[backend]
    for name, a, b in [("output", y0, y1)] + [(f"grad{i}", a, b) for i, (a, b) in
                                              enumerate(zip(g0, g1))]:
        err = ((a - b).abs().max() / a.abs().max().clamp_min(1e-30)).item()
        if not err < 1e-9:
            raise AssertionError(f"{entry['name']}: backend {backend} {name} differs from the "
                                 f"reference by {err:.3g} (relative, float64)")


def time_entry(entry, backend, device, batch, repeats):
    fn, params_of = _params(entry["make"](torch.float32, device, batch))
    x = _input(entry, batch, torch.float32, device, backend)

    def fwd():
        with torch.no_grad():
            fn(backend, x)

    def fwd_bwd():
        y = fn(backend, x)
        y.backward(torch.ones_like(y))

    out = {}
    for label, f in (("fwd", fwd), ("fwd_bwd", fwd_bwd)):
        f()
        out[label] = median_seconds(f, device, repeats)
    return out


def median_seconds(f, device, repeats, sync_after=True):
    """Median wall time of ``f()`` over ``repeats`` calls, synchronized before and after each
    (``sync_after=False``: not after, so on a GPU it is the host time of issuing the work)."""
    times = []
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        f()
        if sync_after:
            _sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scale", choices=sorted(SCALES), default="cpu")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backends", nargs="+", default=None,
                        help="default: every backend usable on the device")
    parser.add_argument("--kinds", nargs="+",
                        default=["dwconv_bn", "pwconv_bn_relu", "shuffle_cat", "block", "linear"])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    allocator_tuned = fastshift.ops.tune_cpu_allocator(args.device)  # every backend alike
    device = torch.device(args.device)
    scale = SCALES[args.scale]
    space = fastshift.spaces.spos_shufflenetv2(scale["input_size"])
    batch = scale["batch"]
    backends = args.backends or [b for b in ops.available_backends(device) if b != "reference"]
    entries = [e for e in workloads(space, batch) if e["kind"] in args.kinds]

    for entry in entries:  # correctness before any timing
        for backend in backends:
            check(entry, backend, device)
    print(f"correctness: {len(entries)} workloads x {backends} match the reference (float64)",
          flush=True)

    rows = []
    for entry in entries:
        row = {k: entry[k] for k in ("kind", "name", "macs") if k in entry}
        row.update({k: entry[k] for k in ("choice", "stride", "matmul_macs") if k in entry})
        for backend in ["reference", *backends]:
            t = time_entry(entry, backend, device, batch, args.repeats)
            elt = 4 * entry["elems"]
            row[backend] = {
                "fwd_ms": 1e3 * t["fwd"], "fwd_bwd_ms": 1e3 * t["fwd_bwd"],
                "fwd_gflops": 2 * entry["macs"] / t["fwd"] / 1e9,
                "fwd_bwd_gflops": 6 * entry["macs"] / t["fwd_bwd"] / 1e9,
                "fwd_gbs": elt / t["fwd"] / 1e9, "fwd_bwd_gbs": 3 * elt / t["fwd_bwd"] / 1e9,
            }
            if backend != "reference":
                ref = row["reference"]
                row[backend]["fwd_speedup"] = ref["fwd_ms"] / row[backend]["fwd_ms"]
                row[backend]["fwd_bwd_speedup"] = ref["fwd_bwd_ms"] / row[backend]["fwd_bwd_ms"]
        rows.append(row)
        print(f"{row['name']:>44}: " + "  ".join(
            f"{b} {row[b]['fwd_ms']:.2f}/{row[b]['fwd_bwd_ms']:.2f} ms"
            for b in ["reference", *backends]), flush=True)

    peak = peak_gflops(device)
    summary = {}
    blocks = [r for r in rows if r["kind"] == "block"]
    # the block's 1x1 convs alone at the in-run matmul peak, everything else free: a floor for
    # any backend, and reference / floor the ceiling on its speedup
    for r in blocks:
        r["matmul_floor_ms"] = {"fwd": 2e3 * r["matmul_macs"] / (peak * 1e9),
                                "fwd_bwd": 6e3 * r["matmul_macs"] / (peak * 1e9)}
    if blocks:
        summary["matmul_floor"] = {
            "block_fwd_bwd_speedup_ceiling_mean": statistics.mean(
                r["reference"]["fwd_bwd_ms"] / r["matmul_floor_ms"]["fwd_bwd"] for r in blocks)}
    for backend in backends:
        if blocks:
            ratios = [r[backend]["fwd_bwd_speedup"] for r in blocks]
            summary[backend] = {
                "block_fwd_bwd_speedup_mean": statistics.mean(ratios),
                "block_fwd_bwd_speedup_total": sum(r["reference"]["fwd_bwd_ms"] for r in blocks)
                / sum(r[backend]["fwd_bwd_ms"] for r in blocks),
                "block_fwd_speedup_mean": statistics.mean(r[backend]["fwd_speedup"]
                                                          for r in blocks),
            }
    result = {
        "benchmark": "bench_ops", "scale": args.scale,
        "workload": {"space": space.name, "input_size": scale["input_size"], "batch": batch,
                     "mode": "training (batch statistics)", "repeats": args.repeats},
        "machine": machine_name(),
        "cpu_threads": torch.get_num_threads(),
        "cpu_allocator_tuned": allocator_tuned,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "peak_gflops": peak,
        "backends": backends, "summary": summary, "rows": rows,
    }
    text = json.dumps(result, indent=2)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    print(json.dumps({"summary": summary}, indent=2))
    return result


if __name__ == "__main__":
    main()
