"""The batched multi-subnet engine against the one-path reference: values, gradients, BN
statistics, trie sharing, chunking, and batched fitness against sequential fitness."""

import collections
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import fastshift
from fastshift.data import BatchStream, EvalSet
from fastshift.engine import ExecutionPlan, PathStats, prefix_groups
from fastshift.shifting import FitnessConfig, Shifter

SPACE = fastshift.SearchSpace(input_size=11, stage_repeats=(2, 2), stage_channels=(16, 24),
                              last_channels=32, stem_channels=8, dropout=0.0, num_classes=5)
ARCHS = [(0, 1, 2, 3), (0, 1, 2, 0), (0, 1, 2, 3), (3, 3, 3, 3), (1, 0, 2, 3), (0, 1, 0, 0),
         (2, 2, 1, 0)]


def make_net(seed=0, dtype=torch.float64):
    net = fastshift.Supernet(SPACE, generator=torch.Generator().manual_seed(seed)).to(dtype)
    g = torch.Generator().manual_seed(seed + 1)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return net


BACKENDS = ["reference"] + (["cpu"] if fastshift.ops.HAVE_C else [])


# with a duplicate; distinct and unsorted (the tail then runs in architecture order); sorted
ARCH_LISTS = {"dup": ARCHS, "distinct": list(dict.fromkeys(ARCHS))[::-1],
              "sorted": sorted(set(ARCHS))}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("grad", [True, False], ids=["breadth_first", "depth_first_no_grad"])
@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("archs", ARCH_LISTS)
def test_forward_many_equals_per_path(train, grad, backend, archs):
    archs = ARCH_LISTS[archs]
    net = make_net().train(train)
    copies = [copy.deepcopy(net) for _ in archs]
    for m in net.modules():
        if hasattr(m, "backend"):
            m.backend = backend
    x = torch.randn(6, 3, 11, 11, dtype=torch.float64)
    stats = PathStats(net)
    with torch.set_grad_enabled(grad):
        out = net.forward_many(x, archs, stats=stats)
    ref = torch.stack([c(x, a) for c, a in zip(copies, archs)])
    assert out.shape == (len(archs), 6, 5)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    if train:  # each subnet's running statistics are its own
        for c, a in zip(copies, archs):
            for layer, gene in enumerate(a):
                block = c.features[layer][gene]
                for name, m in block.named_modules():
                    if isinstance(m, torch.nn.BatchNorm2d):
                        key = f"features.{layer}.{gene}.{name}"
                        mean, var = stats.gather(key, [a[: layer + 1]])
                        torch.testing.assert_close(mean[0], m.running_mean)
                        torch.testing.assert_close(var[0], m.running_var)
            mean, _ = stats.gather("conv_last.1", [a])
            torch.testing.assert_close(mean[0], c.conv_last[1].running_mean)


class _CountOps(TorchDispatchMode):
    """Counts the calls of each op under it (below autograd)."""

    def __init__(self):
        super().__init__()
        self.calls = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("distinct", [False, True])
def test_gradient_of_summed_loss_equals_sum_of_per_candidate_gradients(backend, distinct):
    rng = np.random.default_rng(0)
    archs = ARCHS + [SPACE.sample(rng) for _ in range(5)]
    if distinct:  # unsorted and distinct: the tail runs in architecture order
        archs = list(dict.fromkeys(archs))[::-1]
    net = make_net().train()
    for m in net.modules():
        if hasattr(m, "backend"):
            m.backend = backend
    x = torch.randn(5, 3, 11, 11, dtype=torch.float64)
    y = torch.randint(0, 5, (5,))
    with _CountOps() as count:
        logits = net.forward_many(x, archs, stats=PathStats(net))
        loss = sum(F.cross_entropy(logits[k], y, label_smoothing=0.1) for k in range(len(archs)))
        loss.backward()
    # on the cpu backend the layers hand over through shuffle_regroup (forward and backward)
    regroups = [count.calls[f"fastshift.shuffle_regroup{s}"] for s in ("", "_backward")]
    assert (min(regroups) > 0) == (backend == "cpu"), (backend, regroups)
    expected = {n: torch.zeros_like(p) for n, p in net.named_parameters()}
    for a in archs:
        c = make_net().train()
        F.cross_entropy(c(x, a), y, label_smoothing=0.1).backward()
        for n, p in c.named_parameters():
            if p.grad is not None:
                expected[n] += p.grad
    for n, p in net.named_parameters():
        got = p.grad if p.grad is not None else torch.zeros_like(p)
        torch.testing.assert_close(got, expected[n], rtol=1e-9, atol=1e-12, msg=n)


@pytest.mark.parametrize("channels_last", [True, False])
def test_regroup_equals_slicing_and_concatenation(channels_last):
    """The breadth-first engine's regrouping of a layer's outputs into the next layer's group
    inputs: values, and gradients written once per output (copied; added where a row block
    feeds several groups; zero where it feeds none), against autograd's own slicing and
    concatenation; the gradients keep the outputs' layout."""
    from fastshift.engine import _Regroup, _runs
    batch, g = 2, torch.Generator().manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    sizes = [3, 1, 4]  # row blocks of each output
    outs = [torch.randn(n * batch, 5, 3, 2, dtype=torch.float64, generator=g)
            .contiguous(memory_format=fmt).requires_grad_(True) for n in sizes]
    owner = [(i, j) for i, n in enumerate(sizes) for j in range(n)]
    # node 1 feeds three groups, nodes 4..7 a run, node 2 none; one group spans two outputs
    groups = [[0, 1, 3], [1], [4, 5, 6, 7], [1, 5, 6], [7, 0]]
    routes = [_runs(parents, owner) for parents in groups]
    assert routes[2] == [(2, 0, 4)] and routes[0] == [(0, 0, 2), (1, 0, 1)]
    inputs = _Regroup.apply(batch, routes, *outs)
    pieces = [p for o in outs for p in o.split(batch, 0)]
    expected = [torch.cat([pieces[n] for n in parents], 0) for parents in groups]
    for got, want in zip(inputs, expected):
        assert torch.equal(got, want)
    weights = [torch.randn(e.shape, dtype=torch.float64, generator=g) for e in expected]
    got = torch.autograd.grad(sum((i * w).sum() for i, w in zip(inputs, weights)), outs)
    want = torch.autograd.grad(sum((e * w).sum() for e, w in zip(expected, weights)), outs)
    for a, b, o in zip(got, want, outs):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)  # sums in another order
        assert a.is_contiguous(memory_format=fmt) and a.shape == o.shape
    assert torch.count_nonzero(got[0][2 * batch:3 * batch]) == 0  # node 2 feeds no group


@pytest.mark.parametrize("grad", [True, False], ids=["breadth_first", "depth_first_no_grad"])
def test_trie_computes_each_prefix_once(grad):
    rng = np.random.default_rng(1)
    archs = ARCHS + [SPACE.sample(rng) for _ in range(20)]
    net = make_net().train()
    plans = []
    with torch.set_grad_enabled(grad):
        net.forward_many(torch.randn(3, 3, 11, 11, dtype=torch.float64), archs, plans=plans)
    (plan,) = plans
    assert len(plan.computed) == len(set(plan.computed))
    expected = {(layer, a[: layer + 1]) for a in archs for layer in range(SPACE.num_layers)}
    assert set(plan.computed) == expected
    assert plan.total_nodes == len(expected) < len(archs) * SPACE.num_layers


def test_one_path_costs_exactly_net_forward():
    a, b = make_net(), make_net()
    a.train(), b.train()
    x = torch.randn(4, 3, 11, 11, dtype=torch.float64)
    out = a.forward_many(x, [ARCHS[0]])
    torch.testing.assert_close(out[0], b(x, ARCHS[0]), rtol=0, atol=0)
    for (k, u), v in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(u, v, rtol=0, atol=0, msg=k)


def test_chunking_by_max_rows_gives_the_same_result():
    net = make_net().eval()
    x = torch.randn(4, 3, 11, 11, dtype=torch.float64)
    plans = []
    chunked = net.forward_many(x, ARCHS, max_rows=8, plans=plans)
    assert len(plans) > 1 and all(p.max_nodes * 4 <= 8 for p in plans)
    torch.testing.assert_close(chunked, net.forward_many(x, ARCHS), rtol=0, atol=1e-12)


def test_write_back_averages_the_users_of_each_module():
    net = make_net().train()
    x = torch.randn(4, 3, 11, 11, dtype=torch.float64)
    archs = [(0, 1, 2, 3), (0, 1, 2, 0)]
    copies = [copy.deepcopy(net) for _ in archs]
    for c, a in zip(copies, archs):
        c(x, a)
    net.forward_many(x, archs)
    bn = "conv_last.1"
    want = (copies[0].get_submodule(bn).running_mean + copies[1].get_submodule(bn).running_mean) / 2
    torch.testing.assert_close(net.get_submodule(bn).running_mean, want)
    untouched = net.features[0][3].branch_main[1].running_mean
    torch.testing.assert_close(untouched, make_net().features[0][3].branch_main[1].running_mean)


def _digits_small():
    split = fastshift.data.digits(seed=0)
    space = fastshift.spaces.digits()
    return split, space


@pytest.mark.parametrize("shifting", [True, False])
def test_batched_fitness_equals_sequential_with_lr_zero(shifting, trained_state):
    """With lr = 0 the weights do not move, so each candidate's batched fitness must equal its
    sequential fitness from the same weights, BN statistics and batches."""
    split, space = _digits_small()
    archs = [(0, 1, 2, 3), (0, 1, 3, 3), (2, 2, 2, 2), (0, 1, 2, 3), (3, 1, 0, 2)]
    cfg = FitnessConfig(shifting=shifting, train_steps=3, train_batch_size=40, val_batches=2,
                        val_batch_size=150, lr=0.0)
    val = EvalSet.balanced(split["val"], 2, 150)

    def net():
        n = fastshift.Supernet(space, num_classes=10)
        n.load_state_dict(trained_state)
        n.dropout.p = 0.0  # dropout masks differ between the two orders
        return n

    batched = Shifter(net(), BatchStream(split["train"], 40, seed=1), val, cfg)
    got = batched.evaluate_many(archs, seed=0)
    for a, fit in zip(archs, got):
        seq = Shifter(net(), BatchStream(split["train"], 40, seed=1), val, cfg)
        want = seq.evaluate(a, seed=0)
        assert fit["top1_err"] == want["top1_err"], a
        assert fit["top5_err"] == want["top5_err"], a
        if shifting:
            assert fit["train_loss"] == pytest.approx(want["train_loss"], rel=1e-5)


@pytest.mark.parametrize("shifting", [True, False])
def test_chunked_training_updates_shared_prefix_statistics_once(shifting):
    """With ``max_rows`` the K candidates run in chunks; a prefix shared by two chunks is
    computed twice on the same batch but its running statistics are updated once per step, so
    fitnesses and the written-back statistics equal the unchunked run (float64, lr = 0)."""
    split, space = _digits_small()
    archs = [(0, 1, 2, 3), (0, 1, 2, 0), (0, 1, 1, 1), (0, 2, 3, 1), (3, 3, 3, 3)]
    train = (split["train"][0].double(), split["train"][1])
    val = EvalSet.balanced(split["val"], 2, 100, dtype=torch.float64)
    cfg = FitnessConfig(shifting=shifting, train_steps=4, train_batch_size=32, val_batches=2,
                        val_batch_size=100, lr=0.0)
    base = fastshift.Supernet(space, backend="reference",
                              generator=torch.Generator().manual_seed(5)).double()
    base.dropout.p = 0.0
    runs = []
    for max_rows in (None, 32):
        net = copy.deepcopy(base)
        shifter = Shifter(net, BatchStream(train, 32, seed=2, dtype=torch.float64), val, cfg)
        runs.append((shifter.evaluate_many(archs, seed=0, max_rows=max_rows), net))
    (whole, net_a), (chunked, net_b) = runs
    for a, fa, fb in zip(archs, whole, chunked):
        assert fa["top1_err"] == fb["top1_err"] and fa["top5_err"] == fb["top5_err"], a
    for k, v in net_a.state_dict().items():
        torch.testing.assert_close(net_b.state_dict()[k], v, rtol=1e-12, atol=1e-12, msg=k)


def test_batched_search_runs_and_shifts(trained_state):
    split, space = _digits_small()
    net = fastshift.Supernet(space)
    net.load_state_dict(trained_state)
    result = fastshift.search(net, split["train"], split["val"], population=8, top_k=3,
                              mutations=4, crossovers=3, generations=2, train_steps=2,
                              train_batch_size=32, val_batches=1, val_batch_size=100,
                              batch_subnets=3, progress=False)
    h = result.history
    assert len(h) == 24
    # per generation of 8: batches of 3, 3, 2 candidates, 2 optimizer steps each
    versions = [r["supernet_version"] for r in h[:8]]
    assert versions == [2, 2, 2, 4, 4, 4, 6, 6]
    # each generation's candidates are grouped in sorted-architecture order (prefix_groups)
    for g in range(3):
        archs = [tuple(r["arch"]) for r in h[8 * g:8 * g + 8]]
        assert archs == sorted(archs)
    moved = any(not torch.equal(v, trained_state[k]) for k, v in net.state_dict().items())
    assert moved


def test_prefix_groups_partition_in_sorted_order_and_share_more():
    space = fastshift.spaces.spos_shufflenetv2()
    searcher = fastshift.EvolutionSearcher(space, population=50, top_k=10, mutations=25,
                                           crossovers=25, seed=3)
    gen0 = searcher.propose()
    for a in gen0:
        searcher.record(a, {"top1_err": float(sum(a) % 7)})
    searcher.rank(gen0)
    archs = searcher.propose()  # mutations and crossovers of 10 parents
    for k in (1, 3, 10, 25, 50, 64):
        groups = prefix_groups(archs, k)
        assert sorted(i for g in groups for i in g) == list(range(len(archs)))
        assert all(1 <= len(g) <= k for g in groups)
        flat = [i for g in groups for i in g]
        if k == 1:
            assert flat == list(range(len(archs)))
        else:
            assert [archs[i] for i in flat] == sorted(archs, key=tuple)

    def nodes(groups):
        return sum(ExecutionPlan([archs[i] for i in g]).total_nodes for g in groups)

    in_order = [list(range(s, min(s + 10, len(archs)))) for s in range(0, len(archs), 10)]
    assert nodes(prefix_groups(archs, 10)) < nodes(in_order)
    with pytest.raises(ValueError, match="group size"):
        prefix_groups(archs, 0)


def test_plan_rejects_empty():
    with pytest.raises(ValueError, match="at least one architecture"):
        ExecutionPlan([])


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape,groups", [((6, 5, 3, 2), 3), ((4, 3, 1, 1), 2), ((5, 4, 2, 3), 1)])
def test_grouped_batch_norm_equals_per_group_batch_norm(channels_last, training, shape, groups):
    from fastshift.ops.reference import grouped_batch_norm

    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, dtype=torch.float64, generator=g)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    c = shape[1]
    rm = torch.rand(groups, c, dtype=torch.float64, generator=g)
    rv = torch.rand(groups, c, dtype=torch.float64, generator=g) + 0.5
    rm2, rv2 = rm.clone(), rv.clone()
    y = grouped_batch_norm(x, groups, rm, rv, training)
    n = shape[0] // groups
    ref = torch.cat([F.batch_norm(x[i * n:(i + 1) * n], rm2[i], rv2[i], training=training)
                     for i in range(groups)])
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(rm, rm2, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rv, rv2, rtol=1e-12, atol=1e-12)
    gy = torch.randn_like(y)
    torch.testing.assert_close(torch.autograd.grad(y, x, gy)[0],
                               torch.autograd.grad(ref, x, gy)[0], rtol=1e-9, atol=1e-10)
    stats = (None, None) if training else (rm, rv)
    assert torch.autograd.gradcheck(
        lambda t: grouped_batch_norm(t, groups, *stats, training), (x,))


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("stats_dtype", [None, torch.float32, "same"])
def test_grouped_batch_norm_low_precision(device, dtype, stats_dtype):
    """float16 / bfloat16 input with no running statistics, float32 ones and ones in the
    input's dtype: the batch statistics aten saves differ in dtype across these cases and
    devices; values and gradients match F.batch_norm per group in the same dtypes."""
    from fastshift.ops.reference import grouped_batch_norm

    torch.manual_seed(0)
    groups, n, c = 2, 3, 4
    x = torch.randn(groups * n, c, 3, 2, device=device).to(dtype).requires_grad_(True)
    sd = dtype if stats_dtype == "same" else stats_dtype
    rm = None if sd is None else torch.zeros(groups, c, dtype=sd, device=device)
    rv = None if sd is None else torch.ones(groups, c, dtype=sd, device=device)
    y = grouped_batch_norm(x, groups, rm, rv, True)
    ref = torch.cat([F.batch_norm(x[i * n:(i + 1) * n], None if rm is None else rm[i].clone(),
                                  None if rv is None else rv[i].clone(), training=True)
                     for i in range(groups)])
    assert y.dtype == dtype
    torch.testing.assert_close(y, ref)
    gy = torch.randn_like(y)
    torch.testing.assert_close(torch.autograd.grad(y, x, gy)[0], torch.autograd.grad(ref, x, gy)[0])


@pytest.mark.parametrize("kernel,size", [(1, 5), (3, 2), (5, 2), (7, 2), (7, 3), (7, 4), (5, 1)])
def test_conv_channels_last_reformulations_are_exact(kernel, size):
    from fastshift.engine import conv_channels_last

    torch.manual_seed(kernel * 10 + size)
    c = 6
    groups = 1 if kernel == 1 else c
    conv = torch.nn.Conv2d(c, c, kernel, 1, kernel // 2, groups=groups, bias=False).double()
    x = torch.randn(3, c, size, size + 1, dtype=torch.float64)
    x = x.contiguous(memory_format=torch.channels_last).requires_grad_(True)
    y = conv_channels_last(conv, x)
    ref = conv(x)
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-12)
    gy = torch.randn_like(ref)
    got = torch.autograd.grad(y, (x, conv.weight), gy)
    want = torch.autograd.grad(ref, (x, conv.weight), gy)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_batched_nan_loss_names_the_candidate(digits_split, digits_space):
    x, y = digits_split["train"]
    bad = torch.full_like(x, float("nan"))
    with pytest.raises(FloatingPointError, match=r"training loss is nan at step 0 of candidate"):
        fastshift.search(fastshift.Supernet(digits_space), (bad, y), digits_split["val"],
                         population=4, top_k=2, mutations=2, crossovers=1, generations=0,
                         train_steps=1, train_batch_size=16, val_batches=1, val_batch_size=50,
                         batch_subnets=2, progress=False)
