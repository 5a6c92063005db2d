"""Multi-process runs on real torch.distributed (gloo, 2 CPU ranks) against the one-process
result: paper mode, batched mode, supernet pre-training, a dying rank, and the CLI under
torchrun."""

import datetime
import json
import os
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as tdist
import torch.multiprocessing as mp

import fastshift
from fastshift import distributed as fsdist

SEARCH = dict(population=6, top_k=3, mutations=2, crossovers=2, generations=2, train_steps=3,
              train_batch_size=30, val_batches=2, val_batch_size=75, seed=3, progress=False)


def _space(dropout):
    return fastshift.SearchSpace.from_config({**fastshift.spaces.digits().config(),
                                              "dropout": dropout})


class _Stop(Exception):
    pass


def _stop_after_first_generation(gen, net, history):
    if gen == 0:
        raise _Stop


def _job(kind, dropout, state, tmp, batch_subnets=1, resume=None, interrupt=False):
    """The work of one process; returns a picklable summary."""
    torch.set_num_threads(1)
    split = fastshift.data.digits(seed=0)
    net = fastshift.Supernet(_space(dropout), backend="reference").double()
    net.load_state_dict(state)
    if kind == "search":
        hook = _stop_after_first_generation if interrupt else None
        try:
            res = fastshift.search(net, split["train"], split["val"],
                                   batch_subnets=batch_subnets, resume=resume,
                                   checkpoint_dir=os.path.join(tmp, "ckpt"), on_generation=hook,
                                   **SEARCH)
        except _Stop:
            return {"stopped": True}
        return {"history": res.history, "best": res.best_arch, "state": net.state_dict()}
    stats = fastshift.train_supernet(net, split["train"], iterations=6, batch_size=30, lr=0.05,
                                     seed=1, checkpoint_dir=os.path.join(tmp, "train"),
                                     checkpoint_every=4, progress=False)
    return {"loss": stats["final_loss"], "state": net.state_dict()}


def _worker(r, world, tmp, args):
    os.environ["FASTSHIFT_DIST_TIMEOUT"] = "60"
    tdist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=r,
                             world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        if args.get("die") and r == 1:
            os._exit(1)  # a rank that dies before its first collective
        try:
            out = _job(**{k: v for k, v in args.items() if k != "die"}, tmp=tmp)
        except fsdist.DistributedError as exc:
            out = {"error": str(exc)}
        torch.save(out, os.path.join(tmp, f"rank{r}.pt"))
    finally:
        if not args.get("die"):
            tdist.destroy_process_group()


def _run(tmp_path, world=2, **args):
    tmp = str(tmp_path)
    os.makedirs(tmp, exist_ok=True)
    mp.start_processes(_worker, args=(world, tmp, args), nprocs=world, start_method="spawn",
                       join=True)
    return [torch.load(os.path.join(tmp, f"rank{r}.pt"), weights_only=False)
            for r in range(world)]


@pytest.fixture(scope="module")
def state(trained_state):
    return {k: v.double() if v.is_floating_point() else v for k, v in trained_state.items()}


def _same_history(a, b, rtol=1e-6):
    assert len(a) == len(b)
    for ra, rb in zip(a, b):
        assert ra["arch"] == rb["arch"] and ra["generation"] == rb["generation"]
        assert ra["top1_err"] == rb["top1_err"] and ra["top5_err"] == rb["top5_err"]
        assert ra["train_loss"] == pytest.approx(rb["train_loss"], rel=rtol)


def _same_state(a, b, atol=1e-9):
    for k, v in a.items():
        torch.testing.assert_close(v, b[k], rtol=1e-7, atol=atol, msg=k)


@pytest.mark.slow
@pytest.mark.parametrize("mode,dropout,k", [("paper", 0.1, 1), ("batched", 0.0, 4)])
def test_two_ranks_equal_one_process(tmp_path, state, mode, dropout, k):
    """Same history (errors equal, losses within float tolerance, identical decisions) and the
    same final weights as one process; rank 0 alone writes the checkpoint."""
    one = _job("search", dropout, state, str(tmp_path / "one"), batch_subnets=k)
    ranks = _run(tmp_path / "two", kind="search", dropout=dropout, state=state,
                 batch_subnets=k)
    for out in ranks:
        assert "error" not in out, out
        _same_history(out["history"], one["history"])
        assert out["best"] == one["best"]
        _same_state(out["state"], one["state"])
    _same_state(ranks[0]["state"], ranks[1]["state"], atol=0)
    assert len(one["history"]) == 18
    ckpt = torch.load(tmp_path / "two" / "ckpt" / "search_checkpoint.pt", weights_only=True)
    assert ckpt["history"] == ranks[0]["history"]
    # the 2-rank checkpoint is the 1-process one (so any world size resumes it)
    ref = torch.load(tmp_path / "one" / "ckpt" / "search_checkpoint.pt", weights_only=True)
    assert ckpt["config"] == ref["config"]
    a, b = ckpt["searcher"], ref["searcher"]
    assert a["rng"] == b["rng"] and a["generation"] == b["generation"] and a["top"] == b["top"]
    assert [(x, r["top1_err"]) for x, r in a["latest"]] == [(x, r["top1_err"])
                                                            for x, r in b["latest"]]
    _same_history(ckpt["history"], ref["history"])
    _same_state(ckpt["supernet"], ref["supernet"])


@pytest.mark.slow
def test_two_ranks_resume_a_one_process_checkpoint(tmp_path, state):
    """A checkpoint holds nothing world-size specific: a 1-process search stopped after its
    first generation, resumed by 2 ranks, ends as the uninterrupted 1-process search."""
    full = _job("search", 0.1, state, str(tmp_path / "full"))
    assert _job("search", 0.1, state, str(tmp_path / "part"), interrupt=True) == {"stopped": True}
    ckpt = tmp_path / "part" / "ckpt"
    assert torch.load(ckpt / "search_checkpoint.pt", weights_only=True)["generation_done"] == 0
    ranks = _run(tmp_path / "two", kind="search", dropout=0.1, state=state, resume=str(ckpt))
    for out in ranks:
        _same_history(out["history"], full["history"])
        assert out["best"] == full["best"]
        _same_state(out["state"], full["state"])


@pytest.mark.slow
def test_two_ranks_pretraining_equals_one_process(tmp_path, state):
    one = _job("train", 0.1, state, str(tmp_path / "one"))
    ranks = _run(tmp_path / "two", kind="train", dropout=0.1, state=state)
    for out in ranks:
        assert out["loss"] == pytest.approx(one["loss"], rel=1e-9)
        _same_state(out["state"], one["state"])
    assert os.path.isfile(tmp_path / "two" / "train" / "supernet_checkpoint.pt")


@pytest.mark.slow
def test_dead_rank_gives_a_clear_error(tmp_path, state):
    """Rank 1 dies before its first collective: rank 0 fails with a DistributedError naming
    the collective, within the timeout, instead of hanging."""
    tmp = str(tmp_path)
    ctx = mp.get_context("spawn")
    args = dict(kind="search", dropout=0.0, state=state, die=True)
    procs = [ctx.Process(target=_worker, args=(r, 2, tmp, args)) for r in range(2)]
    t0 = time.perf_counter()
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=180)
    elapsed = time.perf_counter() - t0
    assert [p.exitcode for p in procs] == [0, 1]
    out = torch.load(os.path.join(tmp, "rank0.pt"), weights_only=False)
    assert "collective" in out["error"] and "another rank probably died" in out["error"]
    assert elapsed < 180


def test_single_process_helpers_are_identity():
    assert not fsdist.active() and fsdist.rank() == 0 and fsdist.world_size() == 1
    assert fsdist.shard(10) == slice(0, 10)
    assert fsdist.split([1, 2, 3]) == (0, [1, 2, 3])
    assert fsdist._bounds(10, 0, 3) == (0, 4) and fsdist._bounds(10, 2, 3) == (7, 10)
    t = torch.ones(3)
    assert fsdist.all_sum(t) is t and t.tolist() == [1, 1, 1]
    assert fsdist.all_gather_objects({"a": 1}) == [{"a": 1}]


def test_sync_batch_norm_single_process_equals_batch_norm():
    """One rank: the synchronized BN is nn.BatchNorm2d (values, gradients, running stats)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 5, 3, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    g = torch.randn(6, 5, 3, 4, generator=gen, dtype=torch.float64)
    for momentum in (0.1, None):
        a = torch.nn.BatchNorm2d(5, affine=False, momentum=momentum).double()
        b = torch.nn.BatchNorm2d(5, affine=False, momentum=momentum).double()
        for _ in range(2):
            ya = a(x)
            (ga,) = torch.autograd.grad(ya, x, g)
            yb = fsdist.sync_batch_norm(b, x)
            (gb,) = torch.autograd.grad(yb, x, g)
            torch.testing.assert_close(yb, ya)
            torch.testing.assert_close(gb, ga)
        torch.testing.assert_close(b.running_mean, a.running_mean)
        torch.testing.assert_close(b.running_var, a.running_var)
        assert int(b.num_batches_tracked) == 2
    assert torch.autograd.gradcheck(lambda t: fsdist.sync_batch_norm(
        torch.nn.BatchNorm2d(5, affine=False).double(), t), (x,))
    b.eval()
    torch.testing.assert_close(fsdist.sync_batch_norm(b, x), a.eval()(x))


def test_timeout_setting(monkeypatch):
    monkeypatch.setenv("FASTSHIFT_DIST_TIMEOUT", "abc")
    with pytest.raises(ValueError, match="FASTSHIFT_DIST_TIMEOUT"):
        fsdist.timeout_seconds()
    monkeypatch.setenv("FASTSHIFT_DIST_TIMEOUT", "12")
    assert fsdist.timeout_seconds() == 12


@pytest.mark.slow
def test_cli_under_torchrun(tmp_path, monkeypatch):
    """`fastshift train-supernet` and `fastshift search` unchanged under torchrun (2 gloo
    ranks) give the one-process result; rank 0 writes the files."""
    cfg = tmp_path / "search.json"
    cfg.write_text(json.dumps({k: v for k, v in SEARCH.items() if k != "progress"}))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def run(prefix, out):
        train = subprocess.run(
            [*prefix, "train-supernet", "--out", out, "--iterations", "8", "--batch-size", "30",
             "--lr", "0.05", "--no-progress"], capture_output=True, text=True, env=env,
            timeout=600)
        assert train.returncode == 0, train.stderr[-3000:]
        search = subprocess.run(
            [*prefix, "search", "--supernet", f"{out}/supernet.pt", "--out", out, "--config",
             cfg, "--no-progress"], capture_output=True, text=True, env=env, timeout=600)
        assert search.returncode == 0, search.stderr[-3000:]
        return train.stdout, json.loads((tmp_path / out / "result.json").read_text())

    monkeypatch.chdir(tmp_path)
    single = [sys.executable, "-m", "fastshift"]
    multi = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
             "2", "-m", "fastshift"]
    out1, r1 = run(single, "one")
    out2, r2 = run(multi, "two")
    assert r1["world_size"] == 1 and r2["world_size"] == 2
    assert '"world_size": 2' in out2 and out2.count('"world_size"') == 1  # rank 0 prints
    assert r2["best_arch"] == r1["best_arch"]
    assert r2["best_error"] == pytest.approx(r1["best_error"], abs=1e-9)
    assert r2["evaluations"] == r1["evaluations"]
