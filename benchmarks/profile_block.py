"""Where one mixed-choice block's forward + backward spends its time, per backend: wall time,
the time the device was busy, and the kernels (or CPU ops) that took it.

For each picked block of bench_ops.py's workloads (--scale, training mode, float32) and each
backend, after a warm-up: `wall_ms` is the median wall time of one synchronized forward +
backward; then one profiled run of --repeats of them (torch.profiler) gives, per repeat,
`device_ms` (the summed time of the device kernels on a GPU; on CPU the summed self time of
the aten / fastshift ops, slowed by the profiler, so it can exceed wall_ms there),
`launches` (kernels, or those op calls on CPU) and the top --top entries by time. On a GPU,
wall_ms much larger than device_ms means the block is bound by host work (Python, dispatch,
launches), not by the kernels. --host-top N adds where that host time goes: `host_ms` (one
step's host time: the forward + backward calls without the final synchronisation, median of
--repeats), `host_top` (the N largest self host times of the profiled run: aten / fastshift
ops, CUDA runtime calls) and `python_top` (the N largest own times of Python functions under
cProfile, which inflates them about 2x: compare within a run).

usage: python benchmarks/profile_block.py --scale gpu --device cuda --backends reference cuda \\
           --blocks shuffle3:1 shuffle3:17 --out profile.json
(--blocks: choice:layer, the layer index of the SPOS space; default one large-map and one
small-map block of each choice.)
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_ops import SCALES, _input, _params, median_seconds, workloads  # noqa: E402
from bench_search import _sync, machine_name  # noqa: E402

import fastshift  # noqa: E402

DEFAULT_BLOCKS = [f"{c}:{i}" for c in ("shuffle3", "shuffle7", "xception") for i in (1, 17)]


def _pick(space, batch, wanted):
    blocks = {f"{e['choice']}:{e['layer']}": e for e in workloads(space, batch)
              if e["kind"] == "block"}
    missing = [w for w in wanted if w not in blocks]
    if missing:
        raise SystemExit(f"unknown blocks {missing}; choose from {sorted(blocks)}")
    return [blocks[w] for w in wanted]


def _python_top(step, device, repeats, top):
    """The `top` Python functions (and C calls) by own time per step under cProfile."""
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(repeats):
        step()
    _sync(device)
    prof.disable()
    stats = pstats.Stats(prof).stats  # (file, line, name) -> (cc, nc, tottime, cumtime, ...)
    rows = sorted(stats.items(), key=lambda kv: -kv[1][2])[:top]
    return [{"name": f"{os.path.basename(f)}:{line}({name})"[:90], "ms": v[2] * 1e3 / repeats,
             "calls": v[1] / repeats} for (f, line, name), v in rows]


def profile_entry(entry, backend, device, batch, repeats, top, host_top=0):
    fn, _ = _params(entry["make"](torch.float32, device, batch))
    x = _input(entry, batch, torch.float32, device, backend)

    def step():
        y = fn(backend, x)
        y.backward(torch.ones_like(y))

    for _ in range(3):
        step()
    wall = median_seconds(step, device, repeats)
    cuda = torch.device(device).type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        for _ in range(repeats):
            step()
        _sync(device)
    rows = []
    for ev in prof.key_averages():
        if cuda:
            t = getattr(ev, "self_device_time_total", getattr(ev, "self_cuda_time_total", 0))
            if t <= 0 or ev.device_type != torch.autograd.DeviceType.CUDA:
                continue
        else:
            t = ev.self_cpu_time_total
            if t <= 0 or not ev.key.startswith(("aten::", "fastshift::")):
                continue
        rows.append((ev.key, t / 1e3 / repeats, ev.count / repeats))
    rows.sort(key=lambda r: -r[1])
    result = {
        "wall_ms": wall * 1e3,
        "device_ms": sum(r[1] for r in rows),
        "launches": sum(r[2] for r in rows),
        "top": [{"name": n[:90], "ms": ms, "calls": c} for n, ms, c in rows[:top]],
    }
    if host_top:
        host = sorted(((ev.key, ev.self_cpu_time_total / 1e3 / repeats, ev.count / repeats)
                       for ev in prof.key_averages()
                       if ev.device_type == torch.autograd.DeviceType.CPU
                       and ev.self_cpu_time_total > 0), key=lambda r: -r[1])
        result["host_ms"] = median_seconds(step, device, repeats, sync_after=False) * 1e3
        result["host_top"] = [{"name": n[:90], "ms": ms, "calls": c}
                              for n, ms, c in host[:host_top]]
        result["python_top"] = _python_top(step, device, repeats, host_top)
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scale", choices=sorted(SCALES), default="cpu")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backends", nargs="+", default=None,
                        help="default: reference and every compiled backend usable here")
    parser.add_argument("--blocks", nargs="+", default=DEFAULT_BLOCKS)
    parser.add_argument("--batch", type=int, default=None, help="default: the scale's batch")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--top", type=int, default=8)
    parser.add_argument("--host-top", type=int, default=0,
                        help="also break the host time down (N largest entries)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    scale = SCALES[args.scale]
    batch = args.batch or scale["batch"]
    backends = args.backends or fastshift.ops.available_backends(device)
    space = fastshift.spaces.spos_shufflenetv2(scale["input_size"])
    result = {"benchmark": "profile_block", "scale": args.scale, "batch": batch,
              "machine": machine_name(), "device": (torch.cuda.get_device_name(device)
                                                    if device.type == "cuda" else "cpu"),
              "torch": torch.__version__, "blocks": {}}
    for entry in _pick(space, batch, args.blocks):
        per = result["blocks"][entry["name"]] = {}
        for b in backends:
            per[b] = profile_entry(entry, b, device, batch, args.repeats, args.top,
                                   args.host_top)
            p = per[b]
            print(f"{entry['name']:>40} {b:>9}: wall {p['wall_ms']:7.2f} ms  device "
                  f"{p['device_ms']:7.2f} ms  {p['launches']:5.0f} launches  top: "
                  + ", ".join(f"{t['name'][:28]} {t['ms']:.2f}" for t in p["top"][:3]),
                  flush=True)
            if args.host_top:
                print(f"{'':>40} host {p['host_ms']:.2f} ms per step; host ops: "
                      + ", ".join(f"{t['name'][:40]} {t['ms']:.3f} ({t['calls']:.0f})"
                                  for t in p["host_top"]), flush=True)
                print(f"{'':>40} python (cProfile): "
                      + ", ".join(f"{t['name']} {t['ms']:.3f} ({t['calls']:.0f})"
                                  for t in p["python_top"]), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
