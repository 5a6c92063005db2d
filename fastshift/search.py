"""``fastshift.search``: evolutionary architecture search on a supernet, with Supernet Shifting.

Wires the data streams, the :class:`~fastshift.shifting.Shifter`, the
:class:`~fastshift.evolution.EvolutionSearcher`, logs and checkpoints together. See the README's
"Semantics" section for the exact per-candidate work and how it relates to the released code.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field

import torch

from . import distributed as dist
from .checkpoint import FORMAT_VERSION, atomic_save, check_state_dict
from .data import BatchStream, EvalSet
from .engine import prefix_groups
from .evolution import EvolutionSearcher
from .ops import tune_cpu_allocator
from .shifting import FitnessConfig, Shifter
from .supernet import Supernet

__all__ = ["search", "SearchResult", "CHECKPOINT_NAME"]

CHECKPOINT_NAME = "search_checkpoint.pt"


@dataclass
class SearchResult:
    """What a search returns.

    ``best_arch`` / ``best_error``: first of the final top-k (latest top-1 error).
    ``top_k``: ``[(arch, top1_err), ...]`` best first. ``history``: one dict per evaluation
    (arch, flops, params, top1_err, top5_err, train_loss, generation, index, supernet_version,
    train_s, eval_s). ``supernet``: the (shifted) supernet, also saved in every checkpoint.
    """

    best_arch: tuple
    best_error: float
    top_k: list
    history: list
    supernet: Supernet
    config: dict = field(default_factory=dict)
    seconds: float = 0.0

    def to_json(self) -> dict:
        return {
            "best_arch": list(self.best_arch),
            "best_error": self.best_error,
            "best_choices": self.supernet.space.describe(self.best_arch),
            "top_k": [{"arch": list(a), "top1_err": e} for a, e in self.top_k],
            "evaluations": len(self.history),
            "seconds": self.seconds,
            "config": self.config,
        }


def _derive_seed(seed: int, index: int) -> int:
    return (seed * 1_000_003 + index * 7_919 + 17) % (2**63 - 1)


def _resolve_device(net, device):
    if device is None:
        return next(net.parameters()).device
    return torch.device(device)


def search(
    net: Supernet,
    train_data,
    val_data,
    *,
    flops_limit: float | None = None,
    params_limit: float | None = None,
    shifting: bool = True,
    update: str = "step",
    num_classes: int | None = None,
    population: int = 50,
    top_k: int = 10,
    mutations: int = 25,
    mutation_prob: float = 0.1,
    crossovers: int = 25,
    generations: int = 20,
    train_steps: int | None = None,
    train_batch_size: int | None = None,
    val_batches: int = 25,
    val_batch_size: int = 500,
    lr: float = 1e-4,
    momentum: float = 0.9,
    weight_decay: float = 4e-5,
    label_smoothing: float = 0.1,
    zero_grad: str = "none",
    seed: int = 0,
    batch_subnets: int = 1,
    max_rows: int | None = None,
    device=None,
    checkpoint_dir: str | os.PathLike | None = None,
    resume: str | os.PathLike | None = None,
    log_path: str | os.PathLike | None = None,
    keep_supernets: bool = False,
    on_generation=None,
    progress: bool = True,
) -> SearchResult:
    """Evolutionary search ranked by the supernet; with ``shifting=True`` every candidate's
    training loss also updates the supernet (Supernet Shifting).

    Args:
        net: the supernet, trained (``train_supernet``) or loaded; it is updated in place when
            shifting and returned in the result.
        train_data, val_data: ``(images, labels)`` pairs or Datasets (see ``fastshift.data``).
            Validation uses a fixed class-balanced subset of ``val_batches * val_batch_size``
            images (all of them if fewer), decoded once and kept on the device.
        flops_limit, params_limit: hard constraints (FLOPs at the space's input size,
            released convention). A limit no architecture meets is an error before any work.
        shifting: False = SPOS search (frozen weights, BN recalibration per candidate).
        update: ``step`` (released) | ``candidate`` | ``generation``: when the optimizer steps.
        num_classes: transfer: a fresh head ``Linear(last_channels, num_classes)`` replaces the
            classifier and is trained with the body through the search.
        population, top_k, mutations, mutation_prob, crossovers, generations: the evolution
            (released defaults 50 / 10 / 25 / 0.1 / 25 / 20); generation 0 is random and
            ``generations`` evolved generations follow; the last one is ranked too.
        train_steps, train_batch_size, val_batches, val_batch_size, lr, momentum, weight_decay,
            label_smoothing, zero_grad: per-candidate work (``FitnessConfig``).
        seed: every random decision (evolution, batch order, dropout, new head) follows it.
        batch_subnets: K > 1 evaluates the candidates of a generation K at a time
            (``Shifter.evaluate_many``): each training step sums the K losses on one shared
            batch, one backward, one optimizer step; one validation pass scores all K. The
            groups are consecutive in sorted-architecture order (``engine.prefix_groups``), so
            that candidates sharing a prefix share its layers; ranking ties still follow the
            proposal order. 1 is the released one-candidate-at-a-time order.
        max_rows: memory bound of the batched engine (rows per layer; K is chunked).
        device: where to run (default: the supernet's device).
        checkpoint_dir: after every generation an atomic checkpoint (searcher, supernet,
            optimizer, data position, RNG state, history) is written to
            ``checkpoint_dir/search_checkpoint.pt``.
        resume: a checkpoint folder (or file) to continue from; the arguments must match the
            checkpointed run. Checkpoints then go on in ``checkpoint_dir`` (default: there).
        log_path: JSONL file, one line per evaluation.
        keep_supernets: also keep the supernet of every generation, after its candidates were
            evaluated, as ``checkpoint_dir/supernet_gen{G:03d}.pt`` (``{"state_dict", "space",
            "generation"}``, atomic): the input of ``fastshift evaluate`` for ranking quality
            per generation. Needs ``checkpoint_dir``.
        on_generation: ``callable(generation, net, history)`` called after each generation is
            ranked (and checkpointed), e.g. to measure ranking quality as the supernet shifts.
            It must not change ``net``'s weights or buffers (work on a copy).
        progress: a tqdm progress bar.
    """
    t_start = time.perf_counter()
    if not isinstance(net, Supernet):
        raise TypeError(f"search needs a fastshift.Supernet, got {type(net).__name__}")
    space = net.space
    device = _resolve_device(net, device)
    tune_cpu_allocator(device)
    fitness = FitnessConfig(
        shifting=bool(shifting), update=update, train_steps=train_steps,
        train_batch_size=train_batch_size, val_batches=val_batches,
        val_batch_size=val_batch_size, lr=lr, momentum=momentum, weight_decay=weight_decay,
        label_smoothing=label_smoothing, zero_grad=zero_grad,
    )
    if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 1):
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    head_classes = net.num_classes if num_classes is None else num_classes
    config = {
        "space": space.config(),
        "fitness": fitness.to_dict(),
        "flops_limit": flops_limit,
        "params_limit": params_limit,
        "num_classes": num_classes,
        "population": population,
        "top_k": top_k,
        "mutations": mutations,
        "mutation_prob": mutation_prob,
        "crossovers": crossovers,
        "generations": generations,
        "seed": seed,
        "batch_subnets": batch_subnets,
    }
    if not isinstance(batch_subnets, int) or batch_subnets < 1:
        raise ValueError(f"batch_subnets must be a positive int, got {batch_subnets!r}")
    if keep_supernets and checkpoint_dir is None and resume is None:
        raise ValueError("keep_supernets=True needs checkpoint_dir (where the files go)")
    # Constraints are checked (and impossible ones rejected) before any data is touched.
    searcher = EvolutionSearcher(
        space, population=population, top_k=top_k, mutations=mutations,
        mutation_prob=mutation_prob, crossovers=crossovers, generations=generations,
        flops_limit=flops_limit, params_limit=params_limit, num_classes=head_classes, seed=seed,
    )

    checkpoint = None
    if resume is not None:
        path = os.fspath(resume)
        if os.path.isdir(path):
            path = os.path.join(path, CHECKPOINT_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no search checkpoint to resume at {path}")
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        if checkpoint.get("format") != "fastshift-search":
            raise ValueError(f"{path} is not a fastshift search checkpoint")
        if checkpoint.get("version") != FORMAT_VERSION:
            raise ValueError(f"{path} has checkpoint version {checkpoint.get('version')}, "
                             f"this fastshift reads version {FORMAT_VERSION}")
        for key, value in config.items():
            if checkpoint["config"].get(key) != value:
                raise ValueError(
                    f"cannot resume {path}: argument {key!r} was {checkpoint['config'].get(key)!r}"
                    f" in the checkpointed run and is {value!r} now"
                )
        if checkpoint_dir is None:
            checkpoint_dir = os.path.dirname(path)

    if num_classes is not None:
        net.reset_classifier(num_classes, torch.Generator().manual_seed(_derive_seed(seed, -1)))
    net.to(device)

    dtype = next(net.parameters()).dtype  # images follow the supernet's float dtype
    train_stream = BatchStream(train_data, fitness.train_batch_size, seed=seed, device=device,
                               dtype=dtype)
    val_set = EvalSet.balanced(val_data, fitness.val_batches, fitness.val_batch_size,
                               seed=seed, device=device, dtype=dtype)
    if val_set.max_label() >= net.num_classes:
        raise ValueError(
            f"validation labels go up to {val_set.max_label()} but the classifier has "
            f"{net.num_classes} outputs: pass num_classes= for a new dataset"
        )
    shifter = Shifter(net, train_stream, val_set, fitness)
    history: list[dict] = []
    if checkpoint is not None:
        state = checkpoint["supernet"]
        check_state_dict(net.state_dict(), state, what="search checkpoint supernet")
        net.load_state_dict(state)
        shifter.load_state_dict(checkpoint["shifter"])
        searcher.load_state_dict(checkpoint["searcher"])
        history = list(checkpoint["history"])

    log_file = None
    if log_path is not None and dist.is_main():
        os.makedirs(os.path.dirname(os.path.abspath(log_path)) or ".", exist_ok=True)
        log_file = open(log_path, "w")  # rewritten from the history on resume: no torn tail
        for rec in history:
            log_file.write(json.dumps(rec) + "\n")
        log_file.flush()

    total = (generations + 1) * population
    bar = None
    if progress and dist.is_main():
        from tqdm.auto import tqdm

        bar = tqdm(total=total, initial=len(history), desc="search", unit="cand",
                   dynamic_ncols=True)
    def _record(arch, fit):
        index = len(history)
        flops, params = searcher.cost(arch)
        rec = {"index": index, "generation": searcher.generation, "arch": list(arch),
               "flops": flops, "params": params, **fit}
        searcher.record(arch, fit)
        history.append(rec)
        if log_file is not None:
            log_file.write(json.dumps(rec) + "\n")
            log_file.flush()
        if bar is not None:
            best = min(searcher.latest[a]["top1_err"] for a in searcher.top) \
                if searcher.top else fit["top1_err"]
            bar.set_postfix(gen=searcher.generation, err=f"{fit['top1_err']:.4f}",
                            best=f"{best:.4f}")
            bar.update(1)

    try:
        while not searcher.done:
            candidates = searcher.propose()
            for indices in prefix_groups(candidates, batch_subnets):
                group = [candidates[i] for i in indices]
                first = len(history)
                if batch_subnets == 1:
                    fits = [shifter.evaluate(group[0], seed=_derive_seed(seed, first))]
                else:
                    fits = shifter.evaluate_many(group, seed=_derive_seed(seed, first),
                                                 max_rows=max_rows)
                for arch, fit in zip(group, fits):
                    _record(arch, fit)
            shifter.end_generation()
            searcher.rank(candidates)
            if checkpoint_dir is not None and dist.is_main():  # rank 0 writes, atomically
                atomic_save(
                    {
                        "format": "fastshift-search",
                        "version": FORMAT_VERSION,
                        "config": config,
                        "generation_done": searcher.generation - 1,
                        "searcher": searcher.state_dict(),
                        "shifter": shifter.state_dict(),
                        "supernet": net.state_dict(),
                        "history": history,
                    },
                    os.path.join(os.fspath(checkpoint_dir), CHECKPOINT_NAME),
                )
                if keep_supernets:
                    done = searcher.generation - 1
                    atomic_save({"state_dict": net.state_dict(), "space": space.config(),
                                 "generation": done},
                                os.path.join(os.fspath(checkpoint_dir),
                                             f"supernet_gen{done:03d}.pt"))
            if on_generation is not None:
                on_generation(searcher.generation - 1, net, history)
    finally:
        if bar is not None:
            bar.close()
        if log_file is not None:
            log_file.close()

    top = searcher.top_k_list()
    return SearchResult(
        best_arch=top[0][0], best_error=top[0][1], top_k=top, history=history, supernet=net,
        config=config, seconds=time.perf_counter() - t_start,
    )
