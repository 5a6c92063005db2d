"""Ground truth for the order-preserving benchmark: every architecture of the built-in digits
space (4 layers x 4 choices = 256) trained from scratch as a standalone network, for several
seeds, on the fixed ``fastshift.data.digits(seed=0)`` split (train 1079 / val 359 / test 359).

    python benchmarks/make_ground_truth.py --out fastshift/resources/digits_ground_truth.csv
    python benchmarks/make_ground_truth.py --classes 5 6 7 8 9 --seeds 0 1 2 \
        --out fastshift/resources/digits59_ground_truth.csv

Protocol (one standalone network per (architecture, seed)):
- weights: the path of ``Supernet(space, generator=manual_seed(seed))`` (the released init), so
  architectures trained with the same seed start from the same shared-layer weights;
- data: ``BatchStream(train, batch_size, seed=seed)``: all architectures of a seed see the same
  batches in the same order (common random numbers: differences come from the architectures);
- SGD, Nesterov momentum 0.9, weight decay 5e-4, lr 0.1 with cosine decay to 0 over ``--steps``
  steps of 64, label smoothing 0.1, the space's dropout in the tail;
- BatchNorm (affine=False as in the supernet) uses batch statistics while training; for
  evaluation its statistics are recomputed exactly on the whole training split ("precise BN"),
  then top-1 accuracy is measured on the validation and test splits.

Batching: the networks of one seed are trained together, side by side. Their weights are
stacked per (layer, choice) block; activations are ``[B, M, C, H, W]`` for M networks; depthwise
convs run as one grouped conv over all (network, channel) pairs, 1x1 convs as one batched
matmul, BatchNorm as one per-(network, channel) batch norm; at each layer each choice runs once
on the stacked activations of the networks that pick it. The losses are summed, so one backward
gives every network its own gradient, and SGD is elementwise, so each network follows exactly
its standalone training. ``--check`` verifies this first in float64 against single networks.

Output: a CSV with one row per architecture, ``arch`` (``0-1-2-3``), ``accuracy`` (mean test
accuracy over seeds: the ground truth), ``accuracy_std``, ``val_accuracy``, ``val_accuracy_std``,
``flops``, ``params`` and ``seed_accuracies``; and ``<out>.json`` with the protocol, timing and
environment. Deterministic for a given torch build and thread count.

    python benchmarks/make_ground_truth.py --summarize fastshift/resources/digits_ground_truth.csv

prints how reliable a table is (seed-to-seed Kendall tau of the architectures' accuracies).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import fastshift
from fastshift import ops
from fastshift.data import BatchStream
from fastshift.supernet import Supernet


def _batch_stat_template(space, num_classes, dtype):
    """A reference-backend supernet whose BatchNorms always use batch statistics (no running
    buffers): the single-network oracle of ``check``."""
    net = Supernet(space, num_classes, backend="reference").to(dtype)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.track_running_stats = False
            m.running_mean = m.running_var = m.num_batches_tracked = None
    return net


def _stacked_seq(seq: nn.Sequential, params: dict, prefix: str, h: torch.Tensor):
    """Apply the template ``seq`` to ``h [B, M, C, H, W]`` (M networks side by side) with the
    stacked weights ``params[prefix + f"{i}.weight"]`` ``[M, *shape]``; BatchNorm uses each
    network's own batch statistics (per network and channel, over B, H, W)."""
    mods = list(seq)
    skip = False
    for i, m in enumerate(mods):
        if skip:
            skip = False
            continue
        nets = h.shape[1]
        if isinstance(m, nn.Conv2d):
            w = params[f"{prefix}{i}.weight"]
            if m.groups > 1:  # depthwise + its BN: one fused op over all (network, channel)
                assert isinstance(mods[i + 1], nn.BatchNorm2d)
                y = ops.dwconv_bn(h.flatten(1, 2), w.flatten(0, 1), m.stride[0], None, None,
                                  training=True, eps=mods[i + 1].eps)
                h, skip = y.unflatten(1, (nets, -1)), True
            else:  # 1x1: a batched matmul per network
                assert m.kernel_size == (1, 1)
                h = torch.einsum("bmchw,moc->bmohw", h, w.flatten(2))
        elif isinstance(m, nn.BatchNorm2d):
            y = F.batch_norm(h.flatten(1, 2), None, None, training=True, eps=m.eps)
            h = y.unflatten(1, (nets, -1))
        elif isinstance(m, nn.ReLU):
            h = F.relu(h)
        else:
            raise TypeError(f"unexpected module {type(m).__name__} in a block")
    return h


class StackedNetworks:
    """The standalone networks ``archs``, weights stacked per block, trained side by side.

    ``params`` maps ``"stem"``, ``(layer, choice)`` and ``"tail"`` to dicts of stacked tensors
    ``[M_block, *shape]`` (leaves, requires_grad), M_block = how many networks use the block;
    ``forward`` runs each (layer, choice) once on the stacked activations of its networks.
    """

    def __init__(self, space, archs, init: Supernet, dtype=torch.float32):
        self.space, self.archs = space, [tuple(a) for a in archs]
        self.template = init
        self.dropout = space.dropout
        m = len(self.archs)

        def stack(module, count, prefix=""):
            return {prefix + k: v.detach().to(dtype).unsqueeze(0).repeat(count, *[1] * v.dim())
                    .requires_grad_() for k, v in module.named_parameters()}

        self.params = {"stem": stack(init.first_conv, m),
                       "tail": {**stack(init.conv_last, m, "conv_last."),
                                **stack(init.classifier, m, "classifier.")}}
        self.members = {}
        for layer in range(space.num_layers):
            for choice in range(space.num_choices):
                idx = [i for i, a in enumerate(self.archs) if a[layer] == choice]
                if idx:
                    self.members[layer, choice] = torch.tensor(idx)
                    self.params[layer, choice] = stack(init.features[layer][choice], len(idx))

    def leaves(self):
        return [t for group in self.params.values() for t in group.values()]

    def _block(self, block, params, h):
        if block.stride == 1:
            proj, main = h[:, :, 0::2], h[:, :, 1::2]  # the released channel shuffle
        else:
            proj = _stacked_seq(block.branch_proj, params, "branch_proj.", h)
            main = h
        return torch.cat((proj, _stacked_seq(block.branch_main, params, "branch_main.", main)),
                         2)

    def forward(self, x, training: bool = True):
        """``x [B, C, H, W]`` (shared by all networks) -> logits ``[M, B, classes]``;
        ``training`` switches dropout (BN always uses batch statistics)."""
        stem, w = self.template.first_conv, self.params["stem"]["0.weight"]
        h = F.conv2d(x, w.flatten(0, 1), None, stem[0].stride, stem[0].padding)  # shared input
        h = _stacked_seq(stem[1:], {}, "", h.unflatten(1, (w.shape[0], -1)))
        for layer in range(self.space.num_layers):
            outs, order = [], []
            for choice in range(self.space.num_choices):
                idx = self.members.get((layer, choice))
                if idx is None:
                    continue
                block = self.template.features[layer][choice]
                outs.append(self._block(block, self.params[layer, choice], h[:, idx]))
                order.append(idx)
            h = torch.cat(outs, 1)[:, torch.argsort(torch.cat(order))]
        tail = self.params["tail"]
        h = _stacked_seq(self.template.conv_last, tail, "conv_last.", h).mean((3, 4))
        h = F.dropout(h, self.dropout, training)
        return torch.einsum("bmc,moc->mbo", h, tail["classifier.0.weight"])

    def network(self, i: int, backend=None) -> Supernet:
        """Network ``i`` as a plain Supernet (its path holds the trained weights)."""
        net = Supernet(self.space, self.template.num_classes, backend=backend)
        sd = net.state_dict()
        for key, group in self.params.items():
            where = self.locate(i, key)
            if where is None:
                continue
            prefix, row = where
            for name, value in group.items():
                sd[prefix + name].copy_(value[row].detach())
        net.load_state_dict(sd)
        return net

    def locate(self, i: int, key):
        """``(supernet key prefix, row)`` of network ``i`` in the stacked block ``key``, or
        None when network ``i`` does not use that block."""
        if key == "stem":
            return "first_conv.", i
        if key == "tail":
            return "", i
        layer, choice = key
        if self.archs[i][layer] != choice:
            return None
        return f"features.{layer}.{choice}.", int((self.members[key] == i).nonzero())


def precise_bn_accuracy(net: Supernet, arch, train_x, evals):
    """Recompute every BN's statistics on the whole training split, then top-1 accuracy on each
    ``(x, y)`` of ``evals``."""
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.reset_running_stats()
                m.momentum = None  # cumulative average: one batch = its exact statistics
        net.train()
        net(train_x, arch)
        net.eval()
        return [float((net(x, arch).argmax(1) == y).float().mean()) for x, y in evals]


def check(space, num_classes, data):
    """float64: logits and gradients of the stacked networks equal single networks."""
    gen = torch.Generator().manual_seed(123)
    init = Supernet(space, num_classes, generator=gen).double()
    archs = [(0, 1, 2, 3), (3, 3, 0, 1), (0, 1, 1, 0), (2, 2, 2, 2)]
    stacked = StackedNetworks(space, archs, init, torch.float64)
    x, y = data["train"][0][:16].double(), data["train"][1][:16]
    logits = stacked.forward(x, training=False)  # no dropout (BN uses batch statistics)
    loss = sum(F.cross_entropy(lg, y) for lg in logits)
    grads = torch.autograd.grad(loss, stacked.leaves())
    for i, arch in enumerate(archs):
        single = _batch_stat_template(space, num_classes, torch.float64)
        single.load_state_dict(init.state_dict(), strict=False)
        single.eval()
        out = single(x, arch)
        torch.testing.assert_close(logits[i], out, rtol=1e-10, atol=1e-12)
        g = torch.autograd.grad(F.cross_entropy(out, y), list(single.parameters()),
                                allow_unused=True)
        named = dict(zip([n for n, _ in single.named_parameters()], g))
        stacked_grads = dict(zip(
            [(k, n) for k, grp in stacked.params.items() for n in grp], grads))
        for (key, name), gs in stacked_grads.items():
            where = stacked.locate(i, key)
            if where is not None:
                torch.testing.assert_close(gs[where[1]], named[where[0] + name], rtol=1e-9,
                                           atol=1e-12)
    print("check: stacked float64 logits and gradients equal single networks", flush=True)


def train_seed(space, num_classes, archs, data, seed, args):
    init = Supernet(space, num_classes, generator=torch.Generator().manual_seed(seed))
    nets = StackedNetworks(space, archs, init)
    leaves = nets.leaves()
    opt = torch.optim.SGD(leaves, lr=args.lr, momentum=0.9, nesterov=True,
                          weight_decay=args.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps)))
    stream = BatchStream(data["train"], args.batch_size, seed=seed)
    torch.manual_seed(seed)  # dropout
    t0 = time.perf_counter()
    for step in range(args.steps):
        x, y = stream.next()
        logits = nets.forward(x, training=True)
        losses = F.cross_entropy(logits.flatten(0, 1), y.repeat(len(archs)),
                                 label_smoothing=args.label_smoothing, reduction="none")
        loss = losses.view(len(archs), -1).mean(1).sum()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"seed {seed}: loss is {float(loss)} at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0 or step == args.steps - 1:
            print(f"seed {seed} step {step}/{args.steps} mean loss "
                  f"{float(loss.detach()) / len(archs):.4f} ({time.perf_counter() - t0:.0f} s)",
                  flush=True)
    train_x = data["train"][0]
    evals = [data["val"], data["test"]]
    accs = []
    for i, arch in enumerate(archs):
        accs.append(precise_bn_accuracy(nets.network(i), arch, train_x, evals))
    return np.asarray(accs)  # [M, 2]: val, test


def summarize(path: str) -> dict:
    """Reliability of a built table: can its seeds tell the architectures apart? Kendall tau
    between the per-seed test accuracies of every pair of seeds (mean), and between the means
    of the first and second half of the seeds (split-half); with the per-seed noise and the
    spread of the architectures' means, and the tau of FLOPs / params with accuracy."""
    from fastshift.analysis import kendall_tau, load_ground_truth

    truth = load_ground_truth(path)
    with open(path, newline="") as f:
        seeds = np.array([[float(v) for v in row["seed_accuracies"].split()]
                          for row in csv.DictReader(f)])
    s = seeds.shape[1]
    pairs = [kendall_tau(seeds[:, i], seeds[:, j]) for i in range(s) for j in range(i + 1, s)]
    half = s // 2
    return {
        "table": path, "architectures": len(truth), "seeds": s,
        "mean_accuracy": float(seeds.mean()),
        "min_max_mean_accuracy": [float(truth.accuracy.min()), float(truth.accuracy.max())],
        "mean_seed_std": float(seeds.std(1, ddof=1).mean()),
        "spread_of_means": float(truth.accuracy.std(ddof=1)),
        "pairwise_seed_tau": float(np.mean(pairs)),
        "split_half_tau": float(kendall_tau(seeds[:, :half].mean(1), seeds[:, half:].mean(1))),
        "flops_tau": float(kendall_tau(truth.columns["flops"], truth.accuracy)),
        "params_tau": float(kendall_tau(truth.columns["params"], truth.accuracy)),
        "val_test_tau": float(kendall_tau(truth.columns["val_accuracy"], truth.accuracy)),
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--summarize", metavar="CSV", help="only print the reliability summary of "
                   "an existing table (see summarize())")
    p.add_argument("--out", help="CSV path (a .json with the protocol is written next to it)")
    p.add_argument("--classes", type=int, nargs="+", default=None,
                   help="keep only these digits (relabelled 0..n-1), e.g. 5 6 7 8 9")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--limit", type=int, default=None, help="only the first N architectures "
                   "(for a quick run)")
    p.add_argument("--no-check", action="store_true")
    args = p.parse_args(argv)
    if args.summarize:
        print(json.dumps(summarize(args.summarize), indent=1))
        return
    if not args.out:
        p.error("--out is required")

    data = fastshift.data.digits(seed=0, classes=args.classes)
    num_classes = len(args.classes) if args.classes else 10
    space = fastshift.spaces.digits(num_classes)
    archs = list(space.all_archs())[:args.limit]
    if not args.no_check:
        check(space, num_classes, data)
    t0 = time.perf_counter()
    per_seed = np.stack([train_seed(space, num_classes, archs, data, s, args)
                         for s in args.seeds])  # [S, M, 2]
    seconds = time.perf_counter() - t0
    val, test = per_seed[..., 0], per_seed[..., 1]
    os.makedirs(os.path.dirname(os.path.abspath(args.out)) or ".", exist_ok=True)
    tmp = args.out + ".tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["arch", "accuracy", "accuracy_std", "val_accuracy", "val_accuracy_std",
                    "flops", "params", "seed_accuracies"])
        for i, arch in enumerate(archs):
            w.writerow(["-".join(map(str, arch)), f"{test[:, i].mean():.6f}",
                        f"{test[:, i].std(ddof=1) if len(args.seeds) > 1 else 0.0:.6f}",
                        f"{val[:, i].mean():.6f}",
                        f"{val[:, i].std(ddof=1) if len(args.seeds) > 1 else 0.0:.6f}",
                        space.flops(arch, num_classes), space.params(arch, num_classes),
                        " ".join(f"{a:.6f}" for a in test[:, i])])
    os.replace(tmp, args.out)
    meta = {
        "space": space.config(), "classes": args.classes or list(range(10)),
        "split": {k: int(v[1].numel()) for k, v in data.items()}, "split_seed": 0,
        "seeds": args.seeds, "steps": args.steps, "batch_size": args.batch_size,
        "optimizer": {"sgd_nesterov_momentum": 0.9, "lr": args.lr, "schedule": "cosine",
                      "weight_decay": args.weight_decay},
        "label_smoothing": args.label_smoothing, "bn_eval": "precise BN on the train split",
        "architectures": len(archs), "seconds": round(seconds, 1),
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(), "python": sys.version.split()[0],
        "mean_test_accuracy": float(test.mean()),
        "mean_seed_std": float(test.std(0, ddof=1).mean()) if len(args.seeds) > 1 else 0.0,
        "spread_of_means": float(test.mean(0).std(ddof=1)),
    }
    with open(args.out + ".json.tmp", "w") as f:
        json.dump(meta, f, indent=1)
    os.replace(args.out + ".json.tmp", os.path.splitext(args.out)[0] + ".json")
    print(json.dumps({k: meta[k] for k in ("architectures", "seconds", "mean_test_accuracy",
                                           "mean_seed_std", "spread_of_means")}))


if __name__ == "__main__":
    main()
