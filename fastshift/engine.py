"""Multi-subnet execution: K architectures of one supernet on one batch.

The stem runs once; then layer by layer the distinct prefixes of the K architectures (a trie)
are computed, grouped by choice so that each choice module runs once per layer on the stacked
rows of every prefix that picks it. Candidates that share choices 1..l share activations up to
layer l, which is exact because they see the same batch and the same weights.

BatchNorm keeps each subnet's statistics apart: in train mode every prefix is normalised by its
own batch statistics (over its own B rows) and updates its own running statistics; in eval mode
every prefix uses its own running statistics. Those live in a :class:`PathStats` store, keyed by
(BN module, prefix), initialised from the supernet's buffers. Prefix-sharing subnets have equal
statistics by construction, so a prefix stands for all the subnets that share it.

With autograd (training steps) each layer runs breadth first: one op per choice on the stacked
rows of all its prefixes (large matmuls, one backward). Without autograd (validation, SPOS
recalibration) the trie is walked depth first, node by node on B rows: the same ops and the same
sharing, but only one path's activations are alive, so each op's working set stays in cache.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import run_fused, run_head, run_sequential, run_stem, uses_fused
from .ops import resolve_backend, shuffle_regroup
from .ops.reference import grouped_batch_norm

__all__ = ["ExecutionPlan", "PathStats", "forward_many", "plan_chunks", "prefix_groups"]


class ExecutionPlan:
    """The trie of K architectures.

    ``levels[l]`` lists, for layer ``l``, one ``(choice, parent_rows, prefixes)`` group per
    choice used there: the prefixes (of length l+1) that take ``choice`` and the indices of their
    parents among the nodes of layer ``l-1`` (the stem for l = 0). Nodes of a layer are ordered
    by (choice, parent), so concatenating the groups' outputs gives the layer's node order.
    ``leaf[k]`` is the node of architecture k at the last layer.
    """

    def __init__(self, archs):
        self.archs = [tuple(a) for a in archs]
        if not self.archs:
            raise ValueError("an execution plan needs at least one architecture")
        num_layers = len(self.archs[0])
        prev = {(): 0}
        self.levels = []
        for layer in range(num_layers):
            distinct = sorted({a[: layer + 1] for a in self.archs},
                              key=lambda p: (p[-1], prev[p[:-1]]))
            groups = []
            for choice, items in itertools.groupby(distinct, key=lambda p: p[-1]):
                items = list(items)
                groups.append((choice, [prev[p[:-1]] for p in items], items))
            self.levels.append(groups)
            prev = {p: i for i, p in enumerate(distinct)}
        self.leaves = list(prev)
        self.leaf = [prev[a] for a in self.archs]
        # children[l][i]: (choice, node, prefix) of layer l whose parent is node i of layer l-1
        self.children = []
        for layer, groups in enumerate(self.levels):
            kids: list[list] = [[] for _ in range(self.nodes(layer - 1) if layer else 1)]
            node = 0
            for choice, rows, prefixes in groups:
                for parent, prefix in zip(rows, prefixes):
                    kids[parent].append((choice, node, prefix))
                    node += 1
            self.children.append(kids)
        self.computed: list[tuple[int, tuple]] = []  # (layer, prefix) per node computed

    def nodes(self, layer: int) -> int:
        return sum(len(g[2]) for g in self.levels[layer])

    @property
    def max_nodes(self) -> int:
        return max(self.nodes(layer) for layer in range(len(self.levels)))

    @property
    def total_nodes(self) -> int:
        """Block evaluations (one per distinct (prefix, layer)) instead of K * num_layers."""
        return sum(self.nodes(layer) for layer in range(len(self.levels)))


def _bn_modules(net: nn.Module):
    return [(name, m) for name, m in net.named_modules() if isinstance(m, nn.BatchNorm2d)]


class PathStats:
    """Per-subnet BN running statistics for batched evaluation.

    ``gather(module, prefixes)`` returns ``[G, C]`` running mean / var, rows of unseen prefixes
    starting from the supernet's buffers as they were when the store was made. ``write_back()``
    sets every BN module's buffers to the average over the prefixes that used it.
    """

    def __init__(self, net: nn.Module, *, reset: bool = False):
        self.net = net
        self.names = {id(m): name for name, m in _bn_modules(net)}
        self.modules = {name: m for name, m in _bn_modules(net)}
        if reset:  # SPOS recalibration: every subnet starts from mean 0, var 1
            self.initial = {name: (torch.zeros_like(m.running_mean),
                                   torch.ones_like(m.running_var))
                            for name, m in self.modules.items()}
        else:
            self.initial = {name: (m.running_mean.detach().clone(),
                                   m.running_var.detach().clone())
                            for name, m in self.modules.items()}
        self.rows: dict[tuple[str, tuple], tuple[torch.Tensor, torch.Tensor]] = {}
        self._updated: set | None = None

    def _row(self, name: str, prefix) -> tuple[torch.Tensor, torch.Tensor]:
        """The stored ``[C]`` statistics of (module, prefix), else the initial ones (not
        copies)."""
        return self.rows.get((name, prefix), self.initial[name])

    def gather(self, name: str, prefixes) -> tuple[torch.Tensor, torch.Tensor]:
        rows = [self._row(name, p) for p in prefixes]
        return torch.stack([m for m, _ in rows]), torch.stack([v for _, v in rows])

    def begin_step(self):
        """Start a training step: from now on each (module, prefix) takes one running-statistics
        update until the next call. When the K subnets are split into chunks (``max_rows``), a
        prefix shared by two chunks is computed by both on the same batch; without this its
        statistics would be updated twice in one step."""
        self._updated = set()

    def scatter(self, name: str, prefixes, mean: torch.Tensor, var: torch.Tensor):
        updated = self._updated
        for p, m, v in zip(prefixes, mean.unbind(0), var.unbind(0)):
            if updated is not None:
                if (name, p) in updated:
                    continue
                updated.add((name, p))
            self.rows[(name, p)] = (m, v)

    def batch_norm(self, prefixes, training: bool):
        """A ``batch_norm(module, x)`` callback for ``forward_grouped`` on these prefixes."""
        stats_of = self.norm_stats(prefixes, training)

        def apply(module: nn.BatchNorm2d, x: torch.Tensor) -> torch.Tensor:
            mean, var, groups, done = stats_of(module)
            momentum = module.momentum if module.momentum is not None else 0.1
            if groups == 1:
                y = F.batch_norm(x, mean[0], var[0], training=training, momentum=momentum,
                                 eps=module.eps)
            else:
                y = grouped_batch_norm(x, groups, mean, var, training, momentum, module.eps)
            done()
            return y

        return apply

    def norm_stats(self, prefixes, training: bool):
        """A ``norm_stats(module)`` callback for ``run_fused`` / ``forward_fused`` on these
        prefixes: their gathered ``[G, C]`` statistics, scattered back after a training op."""
        def get(module: nn.BatchNorm2d):
            name = self.names[id(module)]
            if not training and len(prefixes) == 1:
                # read only: the stored row itself as [1, C] (a view; the depth-first
                # evaluation asks once per node and BN)
                mean, var = self._row(name, prefixes[0])
                return mean.unsqueeze(0), var.unsqueeze(0), 1, lambda: None
            mean, var = self.gather(name, prefixes)

            def done():
                if training:
                    self.scatter(name, prefixes, mean, var)

            return mean, var, len(prefixes), done

        return get

    def export(self) -> list:
        """``[(name, prefix, mean, var)]`` on the CPU, in insertion order (to gather the
        statistics of several ranks)."""
        return [(name, prefix, m.detach().cpu(), v.detach().cpu())
                for (name, prefix), (m, v) in self.rows.items()]

    def merge(self, parts: list) -> None:
        """Add the rows of other ranks' ``export()`` (the first row of a (module, prefix) pair
        wins: ranks that computed the same prefix on the same batch hold the same values)."""
        for part in parts:
            for name, prefix, m, v in part:
                key = (name, tuple(prefix))
                if key not in self.rows:
                    buf = self.modules[name].running_mean
                    self.rows[key] = (m.to(buf.device, buf.dtype), v.to(buf.device, buf.dtype))

    @torch.no_grad()
    def write_back(self):
        """Module buffers := mean over the prefixes that used each BN module (untouched
        modules keep theirs)."""
        by_name: dict[str, list] = {}
        for (name, _), stats in self.rows.items():
            by_name.setdefault(name, []).append(stats)
        for name, stats in by_name.items():
            module = self.modules[name]
            module.running_mean.copy_(torch.stack([m for m, _ in stats]).mean(0))
            module.running_var.copy_(torch.stack([v for _, v in stats]).mean(0))
            if module.num_batches_tracked is not None:
                module.num_batches_tracked += 1


def _sorted_order(archs) -> list[int]:
    """Indices of ``archs`` in sorted-architecture order (shared prefixes adjacent)."""
    return sorted(range(len(archs)), key=lambda i: tuple(archs[i]))


def plan_chunks(archs, batch_size: int, max_rows: int | None):
    """Split architecture indices into consecutive chunks (in sorted-arch order, which keeps
    shared prefixes together) whose widest layer holds at most ``max_rows`` rows."""
    order = _sorted_order(archs)
    if max_rows is None:
        return [order]
    max_nodes = max(1, max_rows // max(batch_size, 1))
    chunks, current = [], []
    for k in order:
        trial = current + [k]
        if current and ExecutionPlan([archs[i] for i in trial]).max_nodes > max_nodes:
            chunks.append(current)
            current = [k]
        else:
            current = trial
    chunks.append(current)
    return chunks


def prefix_groups(archs, k: int) -> list[list[int]]:
    """The candidates ``archs`` as groups of at most ``k`` for ``forward_many`` /
    ``Shifter.evaluate_many``: indices in sorted-architecture order cut into consecutive groups,
    so that candidates sharing a long prefix (the mutations of one parent, the children of a
    crossover) land in one group and its trie computes their shared layers once. On the
    benchmark's evolved generation of 50, groups of 25 in this order have 796 distinct
    (prefix, layer) nodes against 831 in proposal order (10: 804 against 901). ``k == 1``:
    the given order (one candidate per group, nothing to share)."""
    if k < 1:
        raise ValueError(f"group size must be positive, got {k}")
    order = list(range(len(archs))) if k == 1 else _sorted_order(archs)
    return [order[s:s + k] for s in range(0, len(order), k)]


def _runs(parent_rows: list, owner: list) -> list:
    """``parent_rows`` (nodes of the previous layer, in a group's row order) as maximal runs
    ``(out index, first row block, end row block)`` of consecutive row blocks of one output."""
    runs = []
    for node in parent_rows:
        i, j = owner[node]
        if runs and runs[-1][0] == i and runs[-1][2] == j:
            runs[-1][2] = j + 1
        else:
            runs.append([i, j, j + 1])
    return [tuple(r) for r in runs]


class _Regroup(torch.autograd.Function):
    """A layer's per-choice outputs ``outs`` (node row blocks of ``batch`` rows each) regrouped
    into the next layer's group inputs: group g stacks the row blocks of ``routes[g]`` (runs
    from :func:`_runs`), a view where that is one run, else one concatenation.

    The backward writes each output's gradient once: the group gradients' row blocks are
    copied into a fresh tensor of the output's layout (added where a node feeds several
    groups; zero only where it feeds none). Autograd's own backward of the same slices,
    splits and concatenations zero-fills whole outputs for the slices, concatenates the split
    pieces' gradients (zeros again where a piece was not taken, which also turns the result's
    layout to contiguous NCHW, copied back to channels-last by the next op) and adds the two:
    several passes over every gradient where one suffices."""

    @staticmethod
    def forward(ctx, batch: int, routes: list, *outs: torch.Tensor):
        ctx.batch, ctx.routes = batch, routes
        ctx.meta = [(o.shape, o.dtype, o.device, _layout(o)) for o in outs]
        inputs = []
        for runs in routes:
            parts = [outs[i].narrow(0, b0 * batch, (b1 - b0) * batch) for i, b0, b1 in runs]
            inputs.append(parts[0] if len(parts) == 1 else
                          torch.cat(parts, 0).contiguous(memory_format=_layout(parts[0])))
        return tuple(inputs)

    @staticmethod
    def backward(ctx, *grads):
        batch = ctx.batch
        grad_outs = [None] * len(ctx.meta)
        written = [[False] * (shape[0] // batch) for shape, *_ in ctx.meta]  # per row block
        for grad, runs in zip(grads, ctx.routes):
            if grad is None:
                continue
            row = 0
            for i, b0, b1 in runs:
                src = grad.narrow(0, row * batch, (b1 - b0) * batch)
                row += b1 - b0
                if grad_outs[i] is None:
                    shape, dtype, device, fmt = ctx.meta[i]
                    grad_outs[i] = torch.empty(shape, dtype=dtype, device=device,
                                               memory_format=fmt)
                dst, done = grad_outs[i], written[i]
                if not any(done[b0:b1]):
                    dst.narrow(0, b0 * batch, (b1 - b0) * batch).copy_(src)
                else:
                    for b in range(b0, b1):
                        block = dst.narrow(0, b * batch, batch)
                        part = src.narrow(0, (b - b0) * batch, batch)
                        block.add_(part) if done[b] else block.copy_(part)
                done[b0:b1] = [True] * (b1 - b0)
        for g, done in zip(grad_outs, written):
            if g is not None:
                for b, d in enumerate(done):
                    if not d:
                        g.narrow(0, b * batch, batch).zero_()
        return (None, None, *grad_outs)


def _layout(t: torch.Tensor) -> torch.memory_format:
    return (torch.channels_last if t.dim() == 4 and t.is_contiguous(
        memory_format=torch.channels_last) else torch.contiguous_format)


def conv_channels_last(m: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``m(x)`` for channels-last activations, with two exact reformulations:
    a 1x1 conv is a matmul over the ``[pixels, C]`` rows; a stride-1 depthwise conv on a map
    smaller than its kernel drops the taps that only ever meet padding (kernel k on an H x W map
    acts as its central min(k, 2H-1) x min(k, 2W-1) taps)."""
    k = m.kernel_size
    if k == (1, 1) and m.groups == 1 and m.stride == (1, 1) and m.bias is None:
        y = F.linear(x.permute(0, 2, 3, 1), m.weight.view(m.out_channels, m.in_channels))
        return y.permute(0, 3, 1, 2)
    if m.groups == m.in_channels and m.stride == (1, 1) and m.bias is None:
        kh, kw = min(k[0], 2 * x.shape[2] - 1), min(k[1], 2 * x.shape[3] - 1)
        if (kh, kw) != k:
            oh, ow = (k[0] - kh) // 2, (k[1] - kw) // 2
            weight = m.weight[:, :, oh:oh + kh, ow:ow + kw]
            return F.conv2d(x, weight, None, 1, (kh // 2, kw // 2), 1, m.groups)
    return m(x)


def _block(net, layer: int, choice: int, x, prefixes, stats: PathStats, training: bool,
           fused: bool, parts: bool = False):
    """Choice ``choice`` of ``layer`` on the stacked rows of ``prefixes`` (one row group each);
    ``parts``: a unit followed by a stride-1 unit returns its unshuffled ``(a, main branch)``
    and the input may be a pair of halves (``blocks._Unit.forward_fused``)."""
    block = net.features[layer][choice]
    if fused:
        shuffled_in, shuffle_out = net.unit_layouts[layer]
        return block.forward_fused(x, stats.norm_stats(prefixes, training), training,
                                   shuffled_in=shuffled_in, shuffle_out=shuffle_out, parts=parts)
    return block.forward_grouped(x, stats.batch_norm(prefixes, training), conv_channels_last)


def _tail(net, h: torch.Tensor, prefixes, stats: PathStats, training: bool,
          fused: bool) -> torch.Tensor:
    """conv_last (per-prefix BN), global pool, dropout, classifier: ``[rows, classes]``."""
    if fused:
        h = run_fused(net.conv_last, h, stats.norm_stats(prefixes, training), training,
                      net.backend)
    else:
        h = run_sequential(net.conv_last, h, stats.batch_norm(prefixes, training),
                           conv_channels_last)
    return run_head(net.classifier, net.dropout(h.mean((2, 3))), net.backend, fused)


def _stem(net, x: torch.Tensor, stats: PathStats, training: bool) -> torch.Tensor:
    """The stem, once for every path: ``ops.stem_conv_bn_relu`` on the ``cpu`` backend
    (``run_stem``), else the modules with the root's statistics."""
    x = x.contiguous(memory_format=torch.channels_last)
    y = run_stem(net.first_conv, x, stats.norm_stats([()], training), training, net.backend)
    if y is not None:
        return y
    return run_sequential(net.first_conv, x, stats.batch_norm([()], training),
                          conv_channels_last)


def _run_depth_first(net, x: torch.Tensor, plan: ExecutionPlan, stats: PathStats,
                     fused: bool) -> torch.Tensor:
    """``_run_plan`` without autograd: the trie is walked depth first, each node on its own
    B rows (one BN group), so that only one activation per layer is alive and the working set
    of an op is that of a single path (it stays in cache), while every distinct (prefix, layer)
    is still computed exactly once."""
    training = net.training
    logits: list = [None] * len(plan.leaves)
    last = len(plan.levels) - 1

    def visit(layer: int, act: torch.Tensor, parent: int):
        for choice, node, prefix in plan.children[layer][parent]:
            out = _block(net, layer, choice, act, [prefix], stats, training, fused)
            plan.computed.append((layer, prefix))
            if layer == last:
                logits[node] = _tail(net, out, [prefix], stats, training, fused)
            else:
                visit(layer + 1, out, node)

    visit(0, _stem(net, x, stats, training), 0)
    return torch.stack(logits)[torch.tensor(plan.leaf, device=x.device)]


def _owners(outs, batch: int) -> list[tuple[int, int]]:
    """Node -> (index of its output in ``outs``, row block within it), for a layer's outputs
    in node order (tensors, or the (a, main branch) parts of units)."""
    return [(i, j) for i, out in enumerate(outs)
            for j in range((out[0] if isinstance(out, tuple) else out).shape[0] // batch)]


def _run_plan(net, x: torch.Tensor, plan: ExecutionPlan, stats: PathStats) -> torch.Tensor:
    training = net.training
    fused = uses_fused(net.backend, x, network=True)
    if not torch.is_grad_enabled():
        return _run_depth_first(net, x, plan, stats, fused)
    batch = x.shape[0]
    # On the CPU a unit followed by a stride-1 unit returns its two parts (a, main branch)
    # unshuffled, and one ops.shuffle_regroup per layer writes them shuffled straight into the
    # next layer's group inputs as their two halves (x_proj, x_main): one copy each way, the
    # halves' gradients never concatenated.
    pair = fused and resolve_backend(net.backend, x.device) == "cpu"
    # Otherwise the previous layer's output stays as its per-choice outputs (`outs`, in node
    # order); a group's input is a row slice of one of them when its parents are consecutive
    # rows there, else a concatenation of just its parents' rows (_Regroup, whose backward
    # writes each output's gradient once); the whole layer is concatenated only for the tail.
    outs = [_stem(net, x, stats, training)]
    for layer, groups in enumerate(plan.levels):
        owner = _owners(outs, batch)
        routes = [_runs(parent_rows, owner) for _, parent_rows, _ in groups]
        if isinstance(outs[0], tuple):  # units' (a, main branch): shuffled and regrouped
            flat = [v for runs in routes for v in (len(runs), *(n for r in runs for n in r))]
            halves = shuffle_regroup([o[0] for o in outs], [o[1] for o in outs], flat, batch,
                                     backend=net.backend)
            inputs = list(zip(halves[0::2], halves[1::2]))
        else:
            inputs = _Regroup.apply(batch, routes, *outs)
        layer_outs = []
        for (choice, _, prefixes), inp in zip(groups, inputs):
            layer_outs.append(_block(net, layer, choice, inp, prefixes, stats, training, fused,
                                     parts=pair))
            plan.computed.extend((layer, p) for p in prefixes)
        outs = layer_outs
    if len(set(plan.leaf)) == len(plan.leaf):
        # distinct architectures: the tail takes the last layer's rows in architecture order
        # (one regrouping in place of the layer's concatenation), so that its logits are
        # already [K, B, classes] (no gather, whose backward is an index_put)
        act, = _Regroup.apply(batch, [_runs(plan.leaf, _owners(outs, batch))], *outs)
        logits = _tail(net, act, [plan.leaves[n] for n in plan.leaf], stats, training, fused)
        return logits.view(len(plan.leaf), batch, -1)
    act = outs[0] if len(outs) == 1 else torch.cat(outs, 0)
    logits = _tail(net, act, plan.leaves, stats, training, fused)
    return logits.view(len(plan.leaves), batch, -1)[torch.tensor(plan.leaf,
                                                                  device=logits.device)]


def forward_many(net, x: torch.Tensor, archs, *, stats: PathStats | None = None,
                 max_rows: int | None = None, plans: list | None = None) -> torch.Tensor:
    """Logits ``[K, B, num_classes]`` of K architectures on one batch ``x [B, C, H, W]``.

    Equals ``torch.stack([net(x, a) for a in archs])`` when each subnet's BN statistics are its
    own: in train mode each subnet is normalised by its own batch statistics and updates its own
    running statistics in ``stats`` (a fresh :class:`PathStats` written back at the end when
    None: each BN module then holds the mean of the updated statistics of the subnets that used
    it); in eval mode each subnet uses its own running statistics from ``stats``.

    ``max_rows`` bounds the rows (prefixes x B) of the widest layer: K is split into chunks.
    Without autograd (``torch.no_grad()``: evaluation, SPOS recalibration) the trie is walked
    depth first instead, each (prefix, layer) once on its own B rows, so that only one
    activation per layer is alive and each op's working set is that of one path (it stays in
    cache); ``max_rows`` is then ignored.
    ``plans``: a list that receives the ExecutionPlan of every chunk (for inspection).
    Gradients flow to the shared weights as the sum over the K subnets.
    """
    archs = [net.space.validate(a) for a in archs]
    if not archs:
        raise ValueError("forward_many needs at least one architecture")
    net._check_input(x)
    if stats is None and len(set(archs)) == 1 and plans is None:
        # one distinct path: exactly net(x, arch), with its own buffer updates
        out = net(x, archs[0])
        return out.unsqueeze(0).expand(len(archs), *out.shape)
    own_stats = stats is None
    if own_stats:
        stats = PathStats(net)
    # without autograd the trie is walked depth first (one path's activations alive at a
    # time), so max_rows is not needed there
    chunks = plan_chunks(archs, x.shape[0], max_rows if torch.is_grad_enabled() else None)
    out = [None] * len(archs)
    for chunk in chunks:
        plan = ExecutionPlan([archs[k] for k in chunk])
        if plans is not None:
            plans.append(plan)
        logits = _run_plan(net, x, plan, stats)
        if chunk == list(range(len(archs))):  # one chunk, in the given order: no restacking
            out = logits
            break
        for k, row in zip(chunk, logits.unbind(0)):
            out[k] = row
    if own_stats and net.training:
        stats.write_back()
    return out if isinstance(out, torch.Tensor) else torch.stack(out)
