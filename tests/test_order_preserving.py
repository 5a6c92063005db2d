"""Ground-truth tables, SPOS scoring of many architectures, and the per-generation hooks of the
search that the order-preserving analysis uses."""

import json
import os

import numpy as np
import pytest
import torch

import fastshift
from fastshift.analysis import BUILTIN_GROUND_TRUTH, load_ground_truth
from fastshift.shifting import score_architectures


def test_load_ground_truth_formats_and_errors(tmp_path, digits_space):
    archs = [(0, 1, 2, 3), (3, 3, 3, 3), (1, 0, 1, 0)]
    (tmp_path / "a.csv").write_text(
        "arch,accuracy,flops,note\n0-1-2-3,0.9,100,x\n\"(3, 3, 3, 3)\",0.95,120,y\n"
        "1 0 1 0,0.8,90,z\n")
    (tmp_path / "a.json").write_text(json.dumps(
        [{"arch": list(a), "accuracy": acc} for a, acc in zip(archs, (0.9, 0.95, 0.8))]))
    for name in ("a.csv", "a.json"):
        gt = load_ground_truth(tmp_path / name, digits_space)
        assert gt.archs == archs and gt.accuracy.tolist() == [0.9, 0.95, 0.8]
        assert gt.rank((3, 3, 3, 3)) == 1 and gt.rank([1, 0, 1, 0]) == 3
        assert gt.lookup([(1, 0, 1, 0), (0, 1, 2, 3)]).tolist() == [0.8, 0.9]
    gt = load_ground_truth(tmp_path / "a.csv")
    assert gt.columns["flops"].tolist() == [100, 120, 90] and "note" not in gt.columns
    with pytest.raises(KeyError, match=r"\(2, 2, 2, 2\) is not in the ground truth"):
        gt.rank((2, 2, 2, 2))

    bad = {
        "missing.csv": ("arch,acc\n0-1-2-3,0.5\n0-0-0-0,0.4\n",
                        "row 0 needs the fields 'arch' and 'accuracy'"),
        "gene.csv": ("arch,accuracy\n0-0-0-0,0.5\n0-1-2-7,0.4\n", "row 1: .*gene 3 is 7"),
        "nan.csv": ("arch,accuracy\n0-0-0-0,0.5\n0-1-2-3,nan\n", "row 1: accuracy must be"),
        "dup.csv": ("arch,accuracy\n0-0-0-0,0.5\n0,0,0,0,0.4\n", None),
        "dup2.csv": ("arch,accuracy\n0-0-0-0,0.5\n\"0,0,0,0\",0.4\n", "row 1: arch .* repeats"),
        "one.csv": ("arch,accuracy\n0-0-0-0,0.5\n", "at least 2 architectures"),
        "text.csv": ("arch,accuracy\na-b,0.5\n0-0-0-0,0.4\n", "row 0: arch must be ints"),
    }
    for name, (text, message) in bad.items():
        (tmp_path / name).write_text(text)
        if message is None:
            continue
        with pytest.raises(ValueError, match=message):
            load_ground_truth(tmp_path / name, digits_space)
    with pytest.raises(FileNotFoundError, match="built-in tables"):
        load_ground_truth(tmp_path / "nope.csv")


@pytest.mark.parametrize("name,classes", [("digits", 10), ("digits5-9", 5)])
def test_builtin_ground_truth_tables(name, classes):
    """The shipped tables cover the whole digits space, with their protocol record."""
    space = fastshift.spaces.digits(classes)
    gt = load_ground_truth(name, space)
    assert os.path.dirname(gt.source) == os.path.dirname(BUILTIN_GROUND_TRUTH["digits"])
    assert sorted(gt.archs) == sorted(space.all_archs()) and len(gt) == 256
    assert ((gt.accuracy > 0.5) & (gt.accuracy <= 1)).all()
    assert gt.meta["architectures"] == 256 and len(gt.meta["seeds"]) >= 3
    assert gt.meta["classes"] == (list(range(10)) if classes == 10 else [5, 6, 7, 8, 9])
    for i, arch in enumerate(gt.archs[:20]):
        assert gt.columns["flops"][i] == space.flops(arch)
        assert gt.columns["params"][i] == space.params(arch)
    assert (gt.columns["accuracy_std"] >= 0).all()


@pytest.fixture(scope="module")
def better_state(digits_space, digits_split):
    """A digits supernet trained well above chance (scores must not hinge on near-ties)."""
    net = fastshift.Supernet(digits_space, generator=torch.Generator().manual_seed(1))
    fastshift.train_supernet(net, digits_split["train"], iterations=300, batch_size=64, lr=0.2,
                             progress=False)
    return net.state_dict()


def test_score_architectures_batched_equals_sequential(better_state, digits_space,
                                                       digits_split):
    """SPOS scores: K at a time through the engine == one at a time (float64), and the
    supernet's weights and BN statistics are left untouched."""
    net = fastshift.Supernet(digits_space, backend="reference").double()
    net.load_state_dict(better_state)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    archs = [(0, 1, 2, 3), (3, 3, 3, 3), (0, 1, 2, 0), (0, 1, 1, 1), (2, 0, 3, 1)]
    train = (digits_split["train"][0].double(), digits_split["train"][1])
    val = (digits_split["val"][0].double(), digits_split["val"][1])
    kw = dict(recalib_steps=30, recalib_batch_size=64, val_batches=2, val_batch_size=100, seed=4)
    one = score_architectures(net, archs, train, val, batch_subnets=1, **kw)
    many = score_architectures(net, archs, train, val, batch_subnets=5, **kw)
    chunked = score_architectures(net, archs, train, val, batch_subnets=2, max_rows=64, **kw)
    assert len(one) == 5 and min(one) > 0.5
    assert one == many == chunked
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k
    with pytest.raises(ValueError, match="batch_subnets"):
        score_architectures(net, archs, train, val, batch_subnets=0, **kw)
    with pytest.raises(ValueError, match="gene"):
        score_architectures(net, [(0, 1, 2, 9)], train, val, **kw)


def test_search_on_generation_and_kept_supernets(tmp_path, trained_state, digits_space,
                                                 digits_split):
    """``on_generation`` sees every generation once, after it is ranked; ``keep_supernets``
    writes that generation's supernet, equal to what the callback saw."""
    net = fastshift.Supernet(digits_space)
    net.load_state_dict(trained_state)
    seen = []

    def hook(gen, supernet, history):
        seen.append((gen, len(history), {k: v.clone() for k, v in supernet.state_dict().items()}))

    result = fastshift.search(
        net, digits_split["train"], digits_split["val"], population=6, top_k=3, mutations=2,
        crossovers=2, generations=2, train_steps=2, train_batch_size=32, val_batches=1,
        val_batch_size=100, checkpoint_dir=tmp_path, keep_supernets=True, on_generation=hook,
        progress=False)
    assert [g for g, _, _ in seen] == [0, 1, 2]
    assert [n for _, n, _ in seen] == [6, 12, 18] == [6 * (g + 1) for g in range(3)]
    assert len(result.history) == 18
    for gen, _, state in seen:
        kept = torch.load(tmp_path / f"supernet_gen{gen:03d}.pt", weights_only=True)
        assert kept["generation"] == gen and kept["space"] == digits_space.config()
        for k, v in state.items():
            assert torch.equal(kept["state_dict"][k], v), (gen, k)
    assert not torch.equal(seen[0][2]["classifier.0.weight"], seen[2][2]["classifier.0.weight"])
    with pytest.raises(ValueError, match="keep_supernets=True needs checkpoint_dir"):
        fastshift.search(net, digits_split["train"], digits_split["val"], keep_supernets=True,
                         progress=False)


@pytest.mark.skipif(not fastshift.ops.HAVE_C, reason="fastshift._C not built")
def test_fused_module_path_cumulative_bn_momentum(digits_space):
    """``momentum=None`` BatchNorms (cumulative average, as used for precise BN) give the same
    running statistics on the fused module path as nn.BatchNorm2d."""
    ref = fastshift.Supernet(digits_space, backend="reference").double()
    fused = fastshift.Supernet(digits_space, backend="cpu").double()
    fused.load_state_dict(ref.state_dict())
    gen = torch.Generator().manual_seed(0)
    batches = [torch.rand(16 + 8 * i, 1, 8, 8, generator=gen, dtype=torch.float64)
               for i in range(3)]
    for net in (ref, fused):
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.momentum = None
                m.reset_running_stats()
        net.train()
        with torch.no_grad():
            for x in batches:
                net(x, (0, 1, 2, 3))
    want = ref.state_dict()
    for k, v in fused.state_dict().items():
        torch.testing.assert_close(v, want[k], rtol=1e-10, atol=1e-12, msg=k)
    bn = ref.first_conv[1]
    assert int(bn.num_batches_tracked) == 3
    # cumulative average: the plain mean of the per-batch means
    with torch.no_grad():
        per_batch = [torch.nn.functional.conv2d(x, ref.first_conv[0].weight, padding=1)
                     .mean((0, 2, 3)).numpy() for x in batches]
    np.testing.assert_allclose(bn.running_mean.numpy(), np.mean(per_batch, axis=0), rtol=1e-9,
                               atol=1e-12)
