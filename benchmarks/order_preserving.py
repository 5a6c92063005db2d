"""Does Supernet Shifting improve the local ranking? Measured against the built-in ground truth
(every architecture of the digits space trained from scratch, ``fastshift/resources``).

    python benchmarks/order_preserving.py --seeds 0 1 2 --plots docs/img

For every seed:
1. Pre-train a digits supernet by SPOS uniform single-path sampling on the train split.
2. Rank all 256 architectures (SPOS evaluation: frozen weights, BN statistics recomputed on
   ``--recalib-steps`` training batches, accuracy on the whole validation split) with
   (a) the pre-trained supernet (``spos``), (b) the supernet after a Supernet Shifting search in
   the released one-candidate-at-a-time order (``paper``), (c) after a batched shifting search
   (``batched``, ``batch_subnets=--batch-subnets``). A SPOS search (no shifting) on the same
   pre-trained supernet gives the architecture ``spos`` returns.
3. Order preservation against the ground-truth test accuracy: global Kendall tau / Spearman rho,
   local tau over the best 10 / 20 / 50 % by ground truth, top-k precision, and the ground-truth
   rank of the architecture each search returns (among all 256 and among those within the
   FLOPs limit). For the shifting searches the ranking is also measured after every
   generation (``search(on_generation=...)`` on a copy of the supernet).
4. Transfer (``--part transfer``): pre-train on digits 0-4, search on digits 5-9 with a fresh
   5-class head trained through the search (``num_classes=5``); compare with a supernet
   pre-trained on 5-9 directly and searched the same way, by the ground-truth accuracy on 5-9
   (``digits5-9`` table) of the architectures they return and by their ranking of 5-9.

The search settings are the released ones (lr 1e-4, momentum 0.9, weight decay 4e-5, 20
training steps of 150 per candidate, label smoothing 0.1, update every step) on a smaller
evolution (population 20, top 5, 10 mutations, 10 crossovers, 8 generations) because the
space has 256 architectures; the SPOS search scores its candidates 10 at a time (batched
engine, same per-candidate work). The ranking of all 256 is measured after every generation
(``--track-every N``: every N-th, and the last). The FLOPs limit is the median FLOPs of the
space. Nothing here is tuned to the result. Output: one JSON with every number and, with
``--plots DIR``, PNGs.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time

import numpy as np
import torch

import fastshift
from fastshift.analysis import BUILTIN_GROUND_TRUTH, load_ground_truth, order_preserving
from fastshift.shifting import score_architectures

TOPS = (0.1, 0.2, 0.5)


def pretrain(space, train, seed, args):
    net = fastshift.Supernet(space, generator=torch.Generator().manual_seed(seed))
    fastshift.train_supernet(net, train, iterations=args.pretrain_iterations, batch_size=64,
                             lr=args.pretrain_lr, seed=seed, progress=False)
    return net


def rank(net, archs, data, seed, args):
    """SPOS scores of ``archs`` on a copy of ``net`` (the search's supernet is not touched)."""
    return score_architectures(
        copy.deepcopy(net), archs, data["train"], data["val"], recalib_steps=args.recalib_steps,
        recalib_batch_size=128, val_batches=1, val_batch_size=len(data["val"][1]),
        seed=seed, batch_subnets=args.score_batch)


def metrics(scores, truth):
    out = {f"top{t:g}": order_preserving(scores, truth.accuracy, top=t).to_dict() for t in TOPS}
    out["k10_precision"] = order_preserving(scores, truth.accuracy, top=0.2, k=10).topk_precision
    return out


def found(truth, arch, feasible):
    acc = float(truth.lookup([arch])[0])
    feas_acc = truth.accuracy[feasible]
    return {"arch": list(arch), "gt_accuracy": acc, "gt_rank": truth.rank(arch),
            "gt_rank_feasible": int((feas_acc > acc).sum()) + 1,
            "feasible": int(feasible.sum())}


def search_kwargs(args, flops_limit, seed):
    return dict(flops_limit=flops_limit, population=20, top_k=5, mutations=10, crossovers=10,
                generations=args.generations, val_batches=1, val_batch_size=500, seed=seed,
                progress=False)


def run_seed(seed, truth, data, args, flops_limit, feasible):
    space = fastshift.spaces.digits()
    archs = truth.archs
    t0 = time.perf_counter()
    base = pretrain(space, data["train"], seed, args)
    out = {"pretrain_s": time.perf_counter() - t0}
    spos_scores = rank(base, archs, data, seed, args)
    out["spos"] = {"final": metrics(spos_scores, truth), "scores": spos_scores}
    res = fastshift.search(copy.deepcopy(base), data["train"], data["val"], shifting=False,
                           train_steps=args.recalib_steps, train_batch_size=128,
                           batch_subnets=args.batch_subnets,
                           **search_kwargs(args, flops_limit, seed))
    out["spos"]["found"] = found(truth, res.best_arch, feasible)
    out["spos"]["search_s"] = res.seconds
    for mode, k in (("paper", 1), ("batched", args.batch_subnets)):
        per_gen = []

        def track(gen, net, history, per_gen=per_gen):
            if gen % args.track_every == 0 or gen == args.generations:  # incl. generation 0
                scores = rank(net, archs, data, seed, args)
                per_gen.append({"generation": gen, **metrics(scores, truth), "scores": scores})

        t1 = time.perf_counter()
        res = fastshift.search(copy.deepcopy(base), data["train"], data["val"], shifting=True,
                               batch_subnets=k, on_generation=track, lr=args.shift_lr,
                               **search_kwargs(args, flops_limit, seed))
        final = per_gen[-1]
        out[mode] = {"final": {key: final[key] for key in final
                               if key not in ("generation", "scores")},
                     "scores": final["scores"],
                     "per_generation": [{k: v for k, v in g.items() if k != "scores"}
                                        for g in per_gen],
                     "found": found(truth, res.best_arch, feasible),
                     "search_s": res.seconds, "wall_s": time.perf_counter() - t1}
        print(f"seed {seed} {mode}: local tau@20% {out[mode]['final']['top0.2']['local_tau']:.3f}"
              f" (spos {out['spos']['final']['top0.2']['local_tau']:.3f}), found rank "
              f"{out[mode]['found']['gt_rank']}", flush=True)
    return out


def run_transfer(seed, args):
    """The two searches of one seed; the ground truth is looked up afterwards
    (:func:`score_transfer`), so the searches can start before the 5-9 table exists."""
    space5 = fastshift.spaces.digits(5)
    archs = list(space5.all_archs())
    src = fastshift.data.digits(seed=0, classes=range(5))
    dst = fastshift.data.digits(seed=0, classes=range(5, 10))
    out = {}
    for name, pre_data in (("transfer_0-4_to_5-9", src), ("direct_5-9", dst)):
        net = pretrain(space5, pre_data["train"], seed, args)
        kw = {"num_classes": 5} if name.startswith("transfer") else {}
        res = fastshift.search(net, dst["train"], dst["val"], shifting=True, lr=args.shift_lr,
                               **kw, **search_kwargs(args, args.flops_limit, seed))
        out[name] = {"best_arch": list(res.best_arch), "best_error_in_search": res.best_error,
                     "archs": [list(a) for a in archs],
                     "scores": rank(res.supernet, archs, dst, seed, args),
                     "search_s": res.seconds}
        print(f"seed {seed} {name}: found {res.best_arch}", flush=True)
    return out


def score_transfer(run, truth, feasible):
    for entry in run.values():
        scores = dict(zip(map(tuple, entry.pop("archs")), entry["scores"]))
        entry["scores"] = [scores[a] for a in truth.archs]
        entry["found"] = found(truth, entry["best_arch"], feasible)
        entry["final"] = metrics(entry["scores"], truth)
    return run


def summarize(runs, path):
    """mean and std over seeds of every number at ``path`` (a key list) in the runs."""
    vals = []
    for r in runs:
        v = r
        for key in path:
            v = v[key]
        vals.append(float(v))
    vals = np.asarray(vals)
    return {"mean": float(np.nanmean(vals)), "std": float(np.nanstd(vals, ddof=1))
            if len(vals) > 1 else 0.0, "values": vals.tolist()}


def plot(result, out_dir):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), dpi=120)
    for ax, key, title in ((axes[0], "global_tau", "global tau (all 256)"),
                           (axes[1], "local_tau", "local tau (best 20%)")):
        for mode, color in (("paper", "tab:red"), ("batched", "tab:blue")):
            gens = [g["generation"] for g in result["seeds"][0][mode]["per_generation"]]
            curves = np.array([[g["top0.2"][key] for g in r[mode]["per_generation"]]
                               for r in result["seeds"]])
            ax.plot(gens, curves.mean(0), "o-", c=color, label=f"{mode} (mean of seeds)")
            ax.fill_between(gens, curves.min(0), curves.max(0), color=color, alpha=0.15)
        spos = np.mean([r["spos"]["final"]["top0.2"][key] for r in result["seeds"]])
        ax.axhline(spos, c="0.3", ls="--", label="SPOS (pre-trained)")
        ax.set_xlabel("generation")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "tau_per_generation.png"))
    plt.close(fig)

    truth = np.asarray(result["truth_accuracy"])
    local = np.argsort(-truth, kind="mergesort")[:int(np.ceil(0.2 * truth.size))]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6), dpi=120, sharey=False)
    run = result["seeds"][0]
    for ax, mode in zip(axes, ("spos", "paper", "batched")):
        scores = np.asarray(run[mode]["scores"])
        ax.scatter(truth, scores, s=8, c="0.6", label="all 256")
        ax.scatter(truth[local], scores[local], s=10, c="tab:red", label="best 20% by truth")
        f = run[mode]["final"]["top0.2"]
        ax.set_title(f"{mode} (seed {result['args']['seeds'][0]}): global tau "
                     f"{f['global_tau']:.2f}, local {f['local_tau']:.2f}", fontsize=8)
        ax.set_xlabel("ground-truth test accuracy")
        ax.set_ylabel("supernet accuracy (SPOS eval)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "supernet_vs_truth.png"))
    plt.close(fig)


def _write(result, path, t0):
    result["seconds"] = time.perf_counter() - t0
    result["environment"] = {"torch": torch.__version__, "threads": torch.get_num_threads(),
                             "machine": platform.processor() or platform.machine(),
                             "python": sys.version.split()[0]}
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(result, f, indent=1)
    os.replace(path + ".tmp", path)
    print(json.dumps(result["summary"], indent=1))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", default="benchmarks/results/order_preserving.json")
    p.add_argument("--plots", default=None, help="folder for the PNGs")
    p.add_argument("--pretrain-iterations", type=int, default=2000)
    p.add_argument("--pretrain-lr", type=float, default=0.2)
    p.add_argument("--recalib-steps", type=int, default=40)
    p.add_argument("--generations", type=int, default=8)
    p.add_argument("--batch-subnets", type=int, default=10)
    p.add_argument("--score-batch", type=int, default=32)
    p.add_argument("--shift-lr", type=float, default=1e-4, help="shifting lr (released 1e-4)")
    p.add_argument("--track-every", type=int, default=1)
    p.add_argument("--part", choices=["order", "transfer", "all"], default="all",
                   help="order = steps 1-3, transfer = step 4 (separate runs write separate "
                   "files: --out gets a _transfer suffix for the transfer part)")
    args = p.parse_args(argv)
    if args.part == "all":
        main([*(argv if argv is not None else sys.argv[1:]), "--part", "order"])
        main([*(argv if argv is not None else sys.argv[1:]), "--part", "transfer"])
        return

    space = fastshift.spaces.digits()
    truth = load_ground_truth("digits", space)
    data = fastshift.data.digits(seed=0)
    flops = np.array([space.flops(a) for a in truth.archs])
    flops_limit = float(np.median(flops))
    feasible = flops <= flops_limit
    t0 = time.perf_counter()
    if args.part == "transfer":
        args.flops_limit = flops_limit
        raw = [run_transfer(s, args) for s in args.seeds]
        path59 = BUILTIN_GROUND_TRUTH["digits5-9"]
        while not os.path.isfile(path59):  # built concurrently by make_ground_truth.py
            print(f"waiting for {path59}", flush=True)
            time.sleep(30)
        truth59 = load_ground_truth("digits5-9", fastshift.spaces.digits(5))
        feasible59 = np.array([fastshift.spaces.digits(5).flops(a) <= flops_limit
                               for a in truth59.archs])
        transfer = [score_transfer(r, truth59, feasible59) for r in raw]
        result = {"args": vars(args), "flops_limit": flops_limit, "seeds": transfer,
                  "ground_truth": load_ground_truth("digits5-9").meta, "summary": {
            name: {"found_gt_accuracy": summarize(transfer, [name, "found", "gt_accuracy"]),
                   "found_gt_rank": summarize(transfer, [name, "found", "gt_rank"]),
                   "found_gt_rank_feasible": summarize(transfer,
                                                       [name, "found", "gt_rank_feasible"]),
                   "global_tau": summarize(transfer, [name, "final", "top0.2", "global_tau"]),
                   "local_tau@0.2": summarize(transfer, [name, "final", "top0.2", "local_tau"])}
            for name in ("transfer_0-4_to_5-9", "direct_5-9")}}
        _write(result, os.path.splitext(args.out)[0] + "_transfer.json", t0)
        return
    runs = [run_seed(s, truth, data, args, flops_limit, feasible) for s in args.seeds]
    result = {
        "args": vars(args), "flops_limit": flops_limit, "ground_truth": truth.meta,
        "best_feasible_gt_accuracy": float(truth.accuracy[feasible].max()),
        "truth_accuracy": truth.accuracy.tolist(), "archs": [list(a) for a in truth.archs],
        "seeds": runs,
        "summary": {mode: {
            **{f"{what}@{t:g}": summarize(runs, [mode, "final", f"top{t:g}", what])
               for t in TOPS for what in ("local_tau",)},
            "global_tau": summarize(runs, [mode, "final", "top0.2", "global_tau"]),
            "global_rho": summarize(runs, [mode, "final", "top0.2", "global_rho"]),
            "top10_precision": summarize(runs, [mode, "final", "k10_precision"]),
            "found_gt_rank": summarize(runs, [mode, "found", "gt_rank"]),
            "found_gt_rank_feasible": summarize(runs, [mode, "found", "gt_rank_feasible"]),
            "found_gt_accuracy": summarize(runs, [mode, "found", "gt_accuracy"]),
        } for mode in ("spos", "paper", "batched")},
    }
    _write(result, args.out, t0)
    if args.plots:
        plot(result, args.plots)


if __name__ == "__main__":
    main()
