"""The ``fastshift`` command: train-supernet, search, export, evaluate, info.

Data: ``--data digits`` (built-in, scikit-learn's 8x8 digits, fixed seeded split) or
``--train-dir`` / ``--val-dir`` ImageFolder trees (ImageNet layout).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from . import data as fsdata
from . import distributed, spaces
from .checkpoint import atomic_save, load_state_dict
from .search import CHECKPOINT_NAME, search
from .space import SearchSpace
from .supernet import Supernet
from .train import train_supernet

# Settings of `fastshift search --demo`: a digits supernet and a shifting search that together
# run in about a minute on a 2-core CPU.
DEMO = {
    "train_iterations": 400,
    "train_batch_size": 64,
    "train_lr": 0.2,
    "search": dict(population=20, top_k=5, mutations=10, crossovers=10, generations=8,
                   train_steps=5, train_batch_size=100, val_batches=1, val_batch_size=500),
}


class CliError(Exception):
    pass


def _space(args, num_classes=None) -> SearchSpace:
    if getattr(args, "space_config", None):
        with open(args.space_config) as f:
            cfg = json.load(f)
        return SearchSpace.from_config(cfg)
    kwargs = {}
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if args.space == "spos_shufflenetv2" and args.input_size:
        kwargs["input_size"] = args.input_size
    return spaces.get(args.space, **kwargs)


def _data(args, need_val=True):
    """(train, val, test-or-None, num_classes) from the CLI data options."""
    if args.data == "digits":
        split = fsdata.digits(seed=args.data_seed)
        return split["train"], split["val"], split["test"], 10
    if args.data != "folder":
        raise CliError(f"--data must be 'digits' or 'folder', got {args.data!r}")
    if not args.train_dir or (need_val and not args.val_dir):
        raise CliError("--data folder needs --train-dir" + (" and --val-dir" if need_val else ""))
    size = args.input_size or 224
    train = fsdata.image_folder(args.train_dir, input_size=size, train=True,
                                convention=args.convention)
    val = (fsdata.image_folder(args.val_dir, input_size=size, train=False,
                               convention=args.convention) if need_val else None)
    return train, val, None, len(train.classes)


def _add_data_args(p):
    p.add_argument("--data", default="digits", help="digits (built-in) or folder")
    p.add_argument("--data-seed", type=int, default=0, help="seed of the digits split")
    p.add_argument("--train-dir", help="ImageFolder root of training images")
    p.add_argument("--val-dir", help="ImageFolder root of validation images")
    p.add_argument("--convention", default="spos", choices=["spos", "imagenet"],
                   help="image input convention: spos = BGR 0-255 (released checkpoints)")
    p.add_argument("--space", default=None,
                   help=f"built-in space: {', '.join(spaces.BUILTIN)} (default: digits for "
                   "--data digits, else spos_shufflenetv2)")
    p.add_argument("--space-config", help="JSON file with a SearchSpace config")
    p.add_argument("--input-size", type=int, default=None, help="input size of spos_shufflenetv2")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if "
                   "available)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _device(args):
    if args.device:
        return torch.device(args.device)
    if torch.cuda.is_available() and distributed.active():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _default_space(args):
    if args.space is None:
        args.space = "digits" if args.data == "digits" else "spos_shufflenetv2"


def cmd_train_supernet(args):
    _default_space(args)
    train, _, _, num_classes = _data(args, need_val=False)
    space = _space(args, num_classes)
    net = Supernet(space, num_classes=args.num_classes or num_classes,
                   generator=torch.Generator().manual_seed(args.seed))
    bins = tuple(args.flops_bins) if args.flops_bins else None
    os.makedirs(args.out, exist_ok=True)
    stats = train_supernet(
        net, train, iterations=args.iterations, batch_size=args.batch_size, lr=args.lr,
        momentum=args.momentum, weight_decay=args.weight_decay, flops_bins=bins,
        seed=args.seed, device=_device(args), checkpoint_dir=args.out,
        checkpoint_every=args.checkpoint_every, resume=args.resume,
        progress=not args.no_progress,
    )
    out = os.path.join(args.out, "supernet.pt")
    if distributed.is_main():
        atomic_save({"state_dict": net.state_dict(), "space": space.config()}, out)
        print(json.dumps({**stats, "supernet": out, "world_size": distributed.world_size()},
                         indent=2))


def _search_kwargs(args) -> dict:
    kw = {}
    if args.config:
        with open(args.config) as f:
            kw.update(json.load(f))
    names = ["flops_limit", "params_limit", "update", "population", "top_k", "mutations",
             "mutation_prob", "crossovers", "generations", "train_steps", "train_batch_size",
             "val_batches", "val_batch_size", "lr", "momentum", "weight_decay",
             "label_smoothing", "zero_grad", "seed", "num_classes", "batch_subnets",
             "max_rows"]
    for name in names:
        value = getattr(args, name)
        if value is not None:
            kw[name] = value
    if args.no_shifting:
        kw["shifting"] = False
    return kw


def _load_supernet(path, space, num_classes):
    state = load_state_dict(path)
    classes = state.get("classifier.0.weight")
    n = int(classes.shape[0]) if classes is not None else num_classes
    net = Supernet(space, num_classes=n)
    net.load_state_dict(state)
    return net


def _read(path):
    """The raw checkpoint object, with the same clear errors as ``load_state_dict``."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling errors come in many types
        raise CliError(f"cannot read checkpoint {path}: {type(exc).__name__}: {exc}") from exc


def _space_from_checkpoint(path):
    obj = _read(path)
    if isinstance(obj, dict) and "space" in obj:
        return SearchSpace.from_config(obj["space"])
    if isinstance(obj, dict) and "config" in obj and "space" in obj["config"]:
        return SearchSpace.from_config(obj["config"]["space"])
    return None


def cmd_search(args):
    device = _device(args)
    os.makedirs(args.out, exist_ok=True)
    log_path = args.log or os.path.join(args.out, "search_log.jsonl")
    if args.demo:
        args.data, args.space = "digits", "digits"
        train, val, test, num_classes = _data(args)
        space = _space(args, num_classes)
        net = Supernet(space, num_classes=num_classes,
                       generator=torch.Generator().manual_seed(args.seed or 0))
        if distributed.is_main():
            print(f"demo: training a {space!r} supernet on digits "
                  f"({DEMO['train_iterations']} iterations)", flush=True)
        train_supernet(net, train, iterations=DEMO["train_iterations"],
                       batch_size=DEMO["train_batch_size"], lr=DEMO["train_lr"],
                       seed=args.seed or 0, device=device, progress=not args.no_progress)
        if distributed.is_main():
            atomic_save({"state_dict": net.state_dict(), "space": space.config()},
                        os.path.join(args.out, "supernet_pretrained.pt"))
        kw = {**DEMO["search"], **_search_kwargs(args)}
        if distributed.is_main():
            print("demo: Supernet Shifting search", flush=True)
    else:
        _default_space(args)
        if not args.supernet and not args.resume:
            raise CliError("search needs --supernet PATH (or --demo, or --resume DIR)")
        train, val, test, num_classes = _data(args)
        space = None
        if args.supernet:
            space = _space_from_checkpoint(args.supernet) if not args.space_config else None
        if space is None:
            space = _space(args)
        kw = _search_kwargs(args)
        if args.supernet:
            net = _load_supernet(args.supernet, space, num_classes)
        else:
            net = Supernet(space, num_classes=num_classes)
    resume = args.resume
    if resume is None and args.auto_resume and os.path.isfile(
            os.path.join(args.out, CHECKPOINT_NAME)):
        resume = args.out
    t0 = time.perf_counter()
    result = search(net, train, val, device=device, checkpoint_dir=args.out, resume=resume,
                    log_path=log_path, keep_supernets=args.keep_supernets,
                    progress=not args.no_progress, **kw)
    summary = result.to_json()
    summary["flops"] = space.flops(result.best_arch, net.num_classes)
    summary["params"] = space.params(result.best_arch, net.num_classes)
    if test is not None:
        x, y = test
        sub = result.supernet.subnet(result.best_arch).eval()
        with torch.no_grad():
            pred = sub(x.to(device)).argmax(1).cpu()
        summary["test_error_inherited_weights"] = float((pred != y).float().mean())
    summary["wall_seconds"] = time.perf_counter() - t0
    summary["world_size"] = distributed.world_size()
    if not distributed.is_main():  # rank 0 writes and reports
        return
    atomic_save({"state_dict": result.supernet.state_dict(), "space": space.config()},
                os.path.join(args.out, "supernet_shifted.pt"))
    _write_json(os.path.join(args.out, "result.json"), summary)
    print(f"best architecture: {tuple(result.best_arch)} = {' / '.join(summary['best_choices'])}")
    print(f"validation top-1 error {result.best_error:.4f}, {summary['flops']} FLOPs, "
          f"{summary['params']} params; {len(result.history)} evaluations in "
          f"{result.seconds:.1f} s")
    if "test_error_inherited_weights" in summary:
        print(f"test error of the best architecture with the shifted supernet's weights: "
              f"{summary['test_error_inherited_weights']:.4f}")
    print(f"wrote {args.out}/result.json, {log_path}, {args.out}/supernet_shifted.pt")


def _parse_genes(text, what):
    """``0,1,2,3`` or ``(0, 1, 2, 3)`` -> list of ints."""
    try:
        return [int(t) for t in text.replace(" ", "").strip("()[]").split(",") if t != ""]
    except ValueError:
        raise CliError(f"{what} must be comma-separated ints, got {text!r}") from None


def _parse_arch(text, space):
    return space.validate(_parse_genes(text, "--arch"))


def _write_json(path, obj):
    """Write ``obj`` as JSON, atomically (a temporary file, then rename)."""
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(path + ".tmp", path)


def cmd_export(args):
    path = args.checkpoint
    if os.path.isdir(path):
        path = os.path.join(path, CHECKPOINT_NAME)
    space = _space_from_checkpoint(path)
    if space is None:
        if not args.space:
            raise CliError(f"{path} does not record its space: pass --space")
        space = spaces.get(args.space)
    obj = _read(path)
    if args.arch:
        arch = _parse_arch(args.arch, space)
    elif isinstance(obj, dict) and "searcher" in obj and obj["searcher"]["top"]:
        arch = space.validate(obj["searcher"]["top"][0])
    else:
        raise CliError("pass --arch (this checkpoint holds no search result)")
    state = load_state_dict(path)
    net = Supernet(space, num_classes=int(state["classifier.0.weight"].shape[0]))
    net.load_state_dict(state)
    sub = net.subnet(arch)
    meta = {"arch": list(arch), "choices": space.describe(arch),
            "flops": space.flops(arch, net.num_classes),
            "params": space.params(arch, net.num_classes), "space": space.config()}
    atomic_save({"state_dict": sub.state_dict(), **meta}, args.out)
    print(json.dumps({k: meta[k] for k in ("arch", "choices", "flops", "params")}))
    print(f"wrote {args.out}")


def _plot(path, scores, accs, result, top):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    accs, scores = np.asarray(accs), np.asarray(scores)
    local = np.zeros(len(accs), dtype=bool)
    local[np.argsort(-accs, kind="mergesort")[:result.n_local]] = True
    fig, ax = plt.subplots(figsize=(5, 4), dpi=120)
    ax.scatter(accs[~local], scores[~local], s=12, c="0.6", label="all architectures")
    ax.scatter(accs[local], scores[local], s=16, c="tab:red",
               label=f"local: best {top:.0%} by ground truth")
    ax.set_xlabel("ground-truth accuracy")
    ax.set_ylabel("supernet accuracy")
    ax.set_title(f"global tau {result.global_tau:.3f}, local tau {result.local_tau:.3f} "
                 f"(n = {result.n})", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _plot_generations(path, gens, results):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4), dpi=120)
    ax.plot(gens, [r["global_tau"] for r in results], "o-", c="0.4", label="global tau")
    ax.plot(gens, [r["local_tau"] for r in results], "o-", c="tab:red",
            label=f"local tau (best {results[0]['top']:.0%})")
    ax.set_xlabel("generation")
    ax.set_ylabel("Kendall tau vs ground truth")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _checkpoint_generation(path, position):
    obj = _read(path)
    if isinstance(obj, dict) and isinstance(obj.get("generation"), int):
        return obj["generation"]
    return position


def cmd_evaluate(args):
    """Rank the ground-truth file's architectures with each supernet (SPOS: BN recalibration,
    frozen weights) and report the order preservation; JSON + PNG in --out."""
    from .analysis import load_ground_truth, order_preserving
    from .shifting import score_architectures

    _default_space(args)
    device = _device(args)
    space = _space_from_checkpoint(args.supernet[0]) if not args.space_config else None
    if space is None:
        space = _space(args)
    truth = load_ground_truth(args.ground_truth, space)
    archs, accs = truth.archs, truth.accuracy.tolist()
    train, val, _, num_classes = _data(args)
    plot_top = 0.2 if 0.2 in args.tops else args.tops[0]
    runs = []
    for position, path in enumerate(args.supernet):
        net = _load_supernet(path, space, num_classes).to(device)
        scores = score_architectures(
            net, archs, train, val, recalib_steps=args.recalib_steps,
            recalib_batch_size=args.recalib_batch_size, val_batches=args.val_batches,
            val_batch_size=args.val_batch_size, seed=args.seed,
            batch_subnets=args.batch_subnets, device=device, progress=not args.no_progress)
        results = {f"top{top:g}": order_preserving(scores, accs, top=top).to_dict()
                   for top in args.tops}
        runs.append({"supernet": path, "generation": _checkpoint_generation(path, position),
                     "results": results, "scores": scores})
        for name, r in results.items():
            print(f"{path} {name}: n={r['n']} global tau {r['global_tau']:.3f} rho "
                  f"{r['global_rho']:.3f} | local ({r['n_local']}) tau {r['local_tau']:.3f} rho "
                  f"{r['local_rho']:.3f} | top-{r['k']} precision {r['topk_precision']:.2f}")
    last = runs[-1]
    os.makedirs(args.out, exist_ok=True)
    out = {"supernet": last["supernet"], "ground_truth": args.ground_truth,
           "recalibration": {"steps": args.recalib_steps, "batch_size": args.recalib_batch_size},
           "validation": {"batches": args.val_batches, "batch_size": args.val_batch_size},
           "results": last["results"],
           "architectures": [{"arch": list(a), "accuracy": acc, "supernet_accuracy": sc}
                             for a, acc, sc in zip(archs, accs, last["scores"])]}
    if len(runs) > 1:
        out["per_checkpoint"] = [{k: r[k] for k in ("supernet", "generation", "results")}
                                 for r in runs]
    json_path = os.path.join(args.out, "evaluate.json")
    _write_json(json_path, out)
    png_path = os.path.join(args.out, "evaluate.png")
    _plot(png_path, last["scores"], accs, order_preserving(last["scores"], accs, top=plot_top),
          plot_top)
    written = [json_path, png_path]
    if len(runs) > 1:
        gen_path = os.path.join(args.out, "evaluate_generations.png")
        _plot_generations(gen_path, [r["generation"] for r in runs],
                          [r["results"][f"top{plot_top:g}"] for r in runs])
        written.append(gen_path)
    print("wrote " + ", ".join(written))


def cmd_info(args):
    from .info import report

    print(report(args.json))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastshift", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train-supernet", help="SPOS supernet pre-training")
    _add_data_args(p)
    p.add_argument("--out", default="runs/supernet", help="output folder")
    p.add_argument("--num-classes", type=int, default=None)
    p.add_argument("--iterations", type=int, default=150_000)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--lr", type=float, default=0.5)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=4e-5)
    p.add_argument("--flops-bins", type=float, nargs=3, metavar=("LOW", "HIGH", "STEP"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-every", type=int, default=1000)
    p.add_argument("--resume", action="store_true", help="continue from --out's checkpoint")
    p.set_defaults(func=cmd_train_supernet)

    p = sub.add_parser("search", help="evolutionary search with Supernet Shifting")
    _add_data_args(p)
    p.add_argument("--demo", action="store_true",
                   help="train a small supernet on digits and search it (about a minute)")
    p.add_argument("--supernet", help="supernet checkpoint (ours or the released format)")
    p.add_argument("--out", default="runs/search", help="output folder (checkpoints, logs)")
    p.add_argument("--log", help="JSONL log path (default OUT/search_log.jsonl)")
    p.add_argument("--resume", help="checkpoint folder to continue from")
    p.add_argument("--auto-resume", action="store_true",
                   help="resume from OUT when it holds a checkpoint")
    p.add_argument("--config", help="JSON file of search() keyword arguments")
    p.add_argument("--keep-supernets", action="store_true",
                   help="keep the supernet of every generation (OUT/supernet_genNNN.pt) for "
                   "`fastshift evaluate`")
    p.add_argument("--no-shifting", action="store_true", help="SPOS search (frozen weights)")
    p.add_argument("--update", choices=["step", "candidate", "generation"])
    p.add_argument("--num-classes", type=int, help="transfer: fresh head with this many classes")
    p.add_argument("--flops-limit", type=float)
    p.add_argument("--params-limit", type=float)
    for name, typ in (("population", int), ("top-k", int), ("mutations", int),
                      ("mutation-prob", float), ("crossovers", int), ("generations", int),
                      ("train-steps", int), ("train-batch-size", int), ("val-batches", int),
                      ("val-batch-size", int), ("lr", float), ("momentum", float),
                      ("weight-decay", float), ("label-smoothing", float), ("seed", int),
                      ("batch-subnets", int), ("max-rows", int)):
        p.add_argument(f"--{name}", type=typ)
    p.add_argument("--zero-grad", choices=["none", "zeros"])
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("export", help="export one architecture as a standalone subnet")
    p.add_argument("checkpoint", help="search checkpoint (file or folder) or supernet file")
    p.add_argument("--arch", help="comma-separated genes (default: the search's best)")
    p.add_argument("--space", help="space name when the checkpoint does not record it")
    p.add_argument("--out", default="subnet.pt")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("evaluate", help="order preservation of a supernet against a "
                       "ground-truth file (Kendall tau / Spearman, global and local)")
    _add_data_args(p)
    p.add_argument("--supernet", required=True, nargs="+",
                   help="supernet checkpoint(s); several (e.g. the supernet_gen*.pt of "
                   "`fastshift search --keep-supernets`) also give a tau-per-generation plot")
    p.add_argument("--ground-truth", required=True,
                   help="CSV (columns arch, accuracy), JSON list of {arch, accuracy}, or a "
                   "built-in table: digits, digits5-9")
    p.add_argument("--tops", type=float, nargs="+", default=[0.1, 0.2, 0.5],
                   help="local regions: best fractions by ground truth")
    p.add_argument("--recalib-steps", type=int, default=200,
                   help="BN recalibration batches per architecture (SPOS)")
    p.add_argument("--recalib-batch-size", type=int, default=128)
    p.add_argument("--val-batches", type=int, default=4)
    p.add_argument("--val-batch-size", type=int, default=250)
    p.add_argument("--batch-subnets", type=int, default=16,
                   help="architectures scored together (batched engine); 1 = one at a time")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/evaluate", help="output folder (JSON and PNG)")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("info", help="what was built and what is usable")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_info)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    joined = False
    try:
        if args.command in ("train-supernet", "search"):  # torchrun: join the process group
            joined = distributed.init_from_env()
        args.func(args)
    except (CliError, ValueError, FileNotFoundError, FloatingPointError) as exc:
        print(f"fastshift {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except distributed.DistributedError as exc:
        print(f"fastshift {args.command}: error: {exc}", file=sys.stderr)
        return 3
    finally:
        if joined and distributed.active():
            import torch.distributed as tdist

            tdist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
