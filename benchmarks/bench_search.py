"""End-to-end search throughput: candidate evaluations per second, side by side in one process.

Modes (same space, same per-candidate work, same candidates):
  reference      the released algorithm: one candidate at a time, plain PyTorch modules
                 (backend "reference")
  sequential     the same semantics and code path (Shifter.evaluate, one candidate at a time,
                 what search(batch_subnets=1) runs) on fastshift's fastest ops backend: every
                 block through the fused ops, channels-last
  batched_kK     K candidates per step (Shifter.evaluate_many), K in --ks (default 10 25 50),
                 on the fastest ops backend, grouped as search(batch_subnets=K) groups them
                 (engine.prefix_groups: K at a time in sorted-architecture order)
  batched_kK_reference_ops   the same on the plain-PyTorch ops (--reference-ops-ks)

Workload per candidate (--scale):
  cpu   SPOS ShuffleNetV2 at 64x64, 20 train steps of 64 images, 25 validation batches of 128
  gpu   SPOS ShuffleNetV2 at 224x224, 20 x 150 train, 25 x 500 validation (released settings)
  tiny  the digits space (8x8), 5 x 32 train, 2 x 64 validation (for the pytest wrapper)
Data are synthetic tensors (1000 classes for the SPOS space). The candidates are a real evolved
generation (mutations and crossovers of a ranked random population, then random fill), so the
prefix sharing is that of an actual search.

Timing: every mode keeps its own supernet and Shifter for the whole run. The candidates are
split into --rounds consecutive slices and every mode runs each slice in turn, in forward order
in even rounds and reverse order in odd ones, so that a drift of the machine's speed (20-40 %
within minutes on the shared 2-core VM this project is measured on) falls on all modes alike;
"round_seconds" in the JSON shows it. fastshift.ops.tune_cpu_allocator() is applied to the
process first (it is what fastshift.search does on a CPU), so it applies to every mode.

GFLOP/s = 2 x multiply-adds of the useful work (a training step counted as 3 forward passes) /
seconds. peak_gflops: a 2048^3 fp32 matmul timed in the same run (the machine's practical peak).
matmul_bound: the seconds per candidate that the matmul-shaped work alone (1x1 convs and the
classifier) takes at that peak, everything else free; max_speedup_vs_reference is the ceiling it
puts on any mode, and each mode's matmul_floor_share is that floor over its own s/candidate.

usage: python benchmarks/bench_search.py --scale cpu --candidates 50 --ks 10 25 \
           --reference-ops-ks 25 --rounds 2 --out cpu.json
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time

import numpy as np
import torch

import fastshift
from fastshift.data import BatchStream, EvalSet
from fastshift.engine import prefix_groups
from fastshift.shifting import FitnessConfig, Shifter

SCALES = {
    "cpu": dict(space=lambda: fastshift.spaces.spos_shufflenetv2(64), train_steps=20,
                train_batch=64, val_batches=25, val_batch=128),
    "gpu": dict(space=lambda: fastshift.spaces.spos_shufflenetv2(224), train_steps=20,
                train_batch=150, val_batches=25, val_batch=500),
    "tiny": dict(space=fastshift.spaces.digits, train_steps=5, train_batch=32, val_batches=2,
                 val_batch=64),
}


def evolved_generation(space, n, seed=0):
    """Generation 1 of a seeded search whose generation 0 was ranked by a fixed score."""
    searcher = fastshift.EvolutionSearcher(space, population=max(n, 20), top_k=10,
                                           mutations=n // 2, crossovers=n // 2, seed=seed)
    gen0 = searcher.propose()
    for a in gen0:
        searcher.record(a, {"top1_err": float(np.sin(sum(a) * 1.7 + a[0]))})
    searcher.rank(gen0)
    return searcher.propose()[:n]


def peak_gflops(device):
    a = torch.randn(2048, 2048, device=device)
    b = torch.randn(2048, 2048, device=device)
    for _ in range(2):
        a @ b
    reps = 5
    _sync(device)
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    _sync(device)
    return 2 * 2048**3 * reps / (time.perf_counter() - t) / 1e9


def matmul_bound(space, archs, scale, peak):
    """The time the matmul-shaped work alone (every 1x1 conv and the classifier, the bulk of
    the multiply-adds) takes per candidate at ``peak`` GFLOP/s, with everything else free:
    a floor for any mode that does the useful work without sharing, and so a ceiling on its
    speedup. A training step counts 3 forward passes (forward, input and weight gradients)."""
    n_fwd = (3 * scale["train_steps"] * scale["train_batch"]
             + scale["val_batches"] * scale["val_batch"])
    kinds = [space.flops_by_kind(a) for a in archs]
    macs = {k: float(np.mean([d[k] for d in kinds])) for k in kinds[0]}
    dense = macs["pointwise"] + macs["classifier"]
    return {"macs_per_image_by_kind": macs,
            "matmul_share_of_macs": dense / sum(macs.values()),
            "s_per_candidate": 2 * dense * n_fwd / (peak * 1e9)}


def machine_name() -> str:
    """Host name / CPU model (from /proc/cpuinfo where there is one)."""
    model = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f
                          if line.startswith("model name")), model)
    except OSError:
        pass
    return f"{platform.node()} / {model}"


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def make_data(space, scale, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (space.in_channels, space.input_size, space.input_size)
    n_train = max(scale["train_batch"] * 8, 256)
    n_val = scale["val_batches"] * scale["val_batch"]
    train = (torch.randn(n_train, *shape, generator=g),
             torch.randint(0, space.num_classes, (n_train,), generator=g))
    val = (torch.randn(n_val, *shape, generator=g),
           torch.randint(0, space.num_classes, (n_val,), generator=g))
    return train, val


def make_shifter(net, train, val, scale, device, lr=1e-4, steps=None, val_batches=None,
                 dtype=torch.float32):
    cfg = FitnessConfig(train_steps=steps or scale["train_steps"],
                        train_batch_size=scale["train_batch"],
                        val_batches=val_batches or scale["val_batches"],
                        val_batch_size=scale["val_batch"], lr=lr)
    stream = BatchStream(train, cfg.train_batch_size, seed=1, device=device, dtype=dtype)
    val_set = EvalSet.balanced(val, cfg.val_batches, cfg.val_batch_size, device=device,
                               dtype=dtype)
    return Shifter(net, stream, val_set, cfg)


def with_backend(net, backend):
    net = copy.deepcopy(net)
    for m in net.modules():
        if hasattr(m, "backend"):
            m.backend = backend
    return net


def check_correctness(base, train, val, scale, device, fast_backend, archs):
    """Before timing, in float64 (the fp32 rounding of a deep random-init network is larger
    than any semantic tolerance): the fast backend (module path and engine with K = 1) equals
    the reference on one candidate, and batched fitness equals sequential fitness with lr = 0
    (same weights, statistics and batches)."""
    f64 = torch.float64
    base = copy.deepcopy(base).to(f64)
    base.dropout.p = 0.0  # the batched pass draws its masks in another order

    def shifter(backend, lr=1e-4):
        return make_shifter(with_backend(base, backend), train, val, scale, device, lr=lr,
                            steps=2, val_batches=1, dtype=f64)

    a = shifter("reference").evaluate(archs[0], seed=0)
    for b in (shifter(fast_backend).evaluate(archs[0], seed=0),
              shifter(fast_backend).evaluate_many([archs[0]], seed=0)[0]):
        assert abs(a["train_loss"] - b["train_loss"]) < 1e-9 * abs(a["train_loss"]), (a, b)
        assert a["top1_err"] == b["top1_err"] and a["top5_err"] == b["top5_err"], (a, b)
    k = min(4, len(archs))
    batched = shifter(fast_backend, lr=0.0).evaluate_many(archs[:k], seed=0)
    for arch, fit in zip(archs[:k], batched):
        seq = shifter("reference", lr=0.0).evaluate(arch, seed=0)
        assert seq["top1_err"] == fit["top1_err"] and seq["top5_err"] == fit["top5_err"]
        assert abs(seq["train_loss"] - fit["train_loss"]) < 1e-9 * abs(seq["train_loss"]), (
            seq, fit)


class ModeRunner:
    """One mode's supernet and Shifter, kept across rounds (the supernet shifts as in a real
    search); ``run`` times one slice of the candidates."""

    def __init__(self, base, backend, k, train, val, scale, device, max_rows=None):
        self.k, self.device, self.max_rows = k, device, max_rows
        self.shifter = make_shifter(with_backend(base, backend), train, val, scale, device)
        # a throw-away copy with one step and one validation batch, for the warm-up
        self.warm = make_shifter(with_backend(base, backend), train, val, scale, device,
                                 steps=1, val_batches=1)
        self.round_seconds = []

    def _evaluate(self, shifter, archs, offset):
        if self.k == 0:  # Shifter.evaluate, one candidate at a time
            for i, arch in enumerate(archs):
                shifter.evaluate(arch, seed=offset + i)
        else:  # the groups fastshift.search forms: K at a time in sorted order
            for indices in prefix_groups(archs, self.k):
                shifter.evaluate_many([archs[i] for i in indices], seed=offset + indices[0],
                                      max_rows=self.max_rows)

    def warm_up(self, archs):
        """One candidate (or one batch of K) on the throw-away copy, outside the timing; the
        copy is dropped afterwards."""
        self._evaluate(self.warm, archs[:max(self.k, 1)], 0)
        self.warm = None

    def run(self, archs, offset):
        _sync(self.device)
        t = time.perf_counter()
        self._evaluate(self.shifter, archs, offset)
        _sync(self.device)
        self.round_seconds.append(time.perf_counter() - t)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scale", choices=sorted(SCALES), default="cpu")
    parser.add_argument("--candidates", type=int, default=50)
    parser.add_argument("--ks", type=int, nargs="+", default=[10, 25, 50])
    parser.add_argument("--modes", nargs="+", default=None,
                        help="subset of reference sequential batched (default all)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--max-rows", type=int, default=None)
    parser.add_argument("--reference-ops-ks", type=int, nargs="*", default=[],
                        help="also time batched_kK on the plain-PyTorch ops (backend reference)")
    parser.add_argument("--rounds", type=int, default=2,
                        help="interleave the modes over this many slices of the candidates")
    parser.add_argument("--backend", default="auto",
                        choices=[b for b in fastshift.ops.BACKENDS if b != "reference"],
                        help="ops backend of the sequential and batched modes (default auto: "
                        "the fastest measured for the device)")
    parser.add_argument("--out", default=None, help="JSON output file")
    args = parser.parse_args(argv)
    allocator_tuned = fastshift.ops.tune_cpu_allocator(args.device)

    device = torch.device(args.device)
    scale = SCALES[args.scale]
    space = scale["space"]()
    base = fastshift.Supernet(space, generator=torch.Generator().manual_seed(0)).to(device)
    train, val = make_data(space, scale, device)
    archs = evolved_generation(space, args.candidates)
    fast_backend = fastshift.ops.resolve_backend(args.backend, device)
    check_correctness(base, train, val, scale, device, fast_backend, archs)

    per_candidate_macs = [
        space.flops(a) * (3 * scale["train_steps"] * scale["train_batch"]
                          + scale["val_batches"] * scale["val_batch"]) for a in archs]
    images = scale["train_steps"] * scale["train_batch"] + scale["val_batches"] * scale["val_batch"]
    wanted = set(args.modes or ["reference", "sequential", "batched"])
    plan = []
    if "reference" in wanted:
        plan.append(("reference", "reference", 0))
    if "sequential" in wanted:
        plan.append(("sequential", fast_backend, 0))
    if "batched" in wanted:
        plan += [(f"batched_k{k}", fast_backend, k) for k in args.ks if k <= len(archs)]
        if args.reference_ops_ks and fast_backend != "reference":
            plan += [(f"batched_k{k}_reference_ops", "reference", k)
                     for k in args.reference_ops_ks if k <= len(archs)]
    runners = {name: ModeRunner(base, backend, k, train, val, scale, device, args.max_rows)
               for name, backend, k in plan}
    for runner in runners.values():
        runner.warm_up(archs)
    # Rounds: the candidates are split into --rounds consecutive slices; every mode runs each
    # slice, in forward order in even rounds and reverse order in odd ones, so that a drift in
    # the machine's speed (large on a shared VM) is shared by all modes.
    rounds = max(1, min(args.rounds, len(archs)))
    bounds = np.linspace(0, len(archs), rounds + 1).round().astype(int)
    for r in range(rounds):
        order = list(runners.items()) if r % 2 == 0 else list(runners.items())[::-1]
        for name, runner in order:
            runner.run(archs[bounds[r]:bounds[r + 1]], int(bounds[r]))
            print(f"round {r}: {name:>26}: {runner.round_seconds[-1]:8.1f} s", flush=True)
    modes = {}
    for name, backend, k in plan:
        seconds = sum(runners[name].round_seconds)
        n = len(archs)
        modes[name] = {
            "round_seconds": runners[name].round_seconds,
            "backend": backend,
            "k": max(k, 1),
            "seconds": seconds,
            "s_per_candidate": seconds / n,
            "candidates_per_s": n / seconds,
            "images_per_s": images * n / seconds,
            "gflops": 2 * sum(per_candidate_macs) / seconds / 1e9,
        }
        print(f"{name:>26}: {seconds / n:.3f} s/candidate", flush=True)
    if "reference" in modes:
        for row in modes.values():
            row["speedup_vs_reference"] = modes["reference"]["seconds"] / row["seconds"]
    peak = peak_gflops(device)
    bound = matmul_bound(space, archs, scale, peak)
    for row in modes.values():
        row["matmul_floor_share"] = bound["s_per_candidate"] / row["s_per_candidate"]
    if "reference" in modes:
        bound["max_speedup_vs_reference"] = (modes["reference"]["s_per_candidate"]
                                             / bound["s_per_candidate"])
    result = {
        "benchmark": "bench_search",
        "scale": args.scale,
        "workload": {"space": space.name, "input_size": space.input_size,
                     "train_steps": scale["train_steps"], "train_batch": scale["train_batch"],
                     "val_batches": scale["val_batches"], "val_batch": scale["val_batch"],
                     "candidates": len(archs), "distinct_candidates": len(set(archs)),
                     "max_rows": args.max_rows, "rounds": rounds},
        "machine": machine_name(),
        "cpu_threads": torch.get_num_threads(),
        "cpu_allocator_tuned": allocator_tuned,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "peak_gflops": peak,
        "matmul_bound": bound,
        "modes": modes,
    }
    text = json.dumps(result, indent=2)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    print(text)
    return result


if __name__ == "__main__":
    main()
