"""Fitness evaluation and the search loop: released semantics, options, checkpoints, errors."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F

import fastshift
from fastshift.data import BatchStream, EvalSet
from fastshift.search import CHECKPOINT_NAME
from fastshift.shifting import FitnessConfig, Shifter, load_optimizer_state, make_optimizer

HERE = os.path.dirname(os.path.abspath(__file__))
SMALL = dict(population=6, top_k=2, mutations=3, crossovers=2, generations=2, train_steps=2,
             train_batch_size=32, val_batches=2, val_batch_size=100, progress=False)


def released_label_smooth(logits, target, num_classes, eps=0.1):
    log_probs = F.log_softmax(logits, dim=1)
    targets = torch.zeros_like(log_probs).scatter_(1, target.unsqueeze(1), 1)
    targets = (1 - eps) * targets + eps / num_classes
    return (-targets * log_probs).mean(0).sum()


def test_loss_is_released_label_smoothing_with_real_class_count():
    logits, y = torch.randn(7, 5), torch.randint(0, 5, (7,))
    torch.testing.assert_close(F.cross_entropy(logits, y, label_smoothing=0.1),
                               released_label_smooth(logits, y, 5))


def test_shifting_fitness_equals_released_loop(trained_state, digits_space, digits_split):
    """Shifter.evaluate == the released tester loop written out by hand, for two candidates
    sharing one optimizer."""
    ours = fastshift.Supernet(digits_space)
    ours.load_state_dict(trained_state)
    theirs = fastshift.Supernet(digits_space)
    theirs.load_state_dict(trained_state)
    cfg = FitnessConfig(train_steps=3, train_batch_size=50, val_batches=2, val_batch_size=200,
                        lr=0.01)
    stream = BatchStream(digits_split["train"], 50, seed=5)
    val = EvalSet.balanced(digits_split["val"], 2, 200, seed=5)
    shifter = Shifter(ours, stream, val, cfg)
    ref_stream = BatchStream(digits_split["train"], 50, seed=5)
    decay = [p for p in theirs.parameters() if p.dim() > 1]
    optimizer = torch.optim.SGD([{"params": decay, "weight_decay": 4e-5}], lr=0.01, momentum=0.9)
    for n, arch in enumerate([(0, 1, 2, 3), (0, 3, 3, 1)]):
        got = shifter.evaluate(arch, seed=100 + n)
        torch.manual_seed(100 + n)
        theirs.train()
        for _ in range(3):
            x, y = ref_stream.next()
            loss = released_label_smooth(theirs(x, arch), y, 10)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        theirs.eval()
        correct = total = 0
        with torch.no_grad():
            for x, y in val.batches:
                correct += int((theirs(x, arch).argmax(1) == y).sum())
                total += len(y)
        assert got["top1_err"] == pytest.approx(1 - correct / total, abs=1.5 / total)
        for (k, a), b in zip(ours.state_dict().items(), theirs.state_dict().values()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=k)
    assert shifter.version == 6


def _sgd_steps(net, optimizer, steps=6):
    """``steps`` optimizer steps on fixed pseudo-random gradients; one parameter gets its
    first gradient at the third step and another skips the fourth (no gradient), as blocks
    of a supernet do. Returns the parameters."""
    g = torch.Generator().manual_seed(3)
    params = list(net.parameters())
    for step in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, dtype=p.dtype, generator=g)
        if step < 2:
            params[0].grad = None
        if step == 3:
            params[1].grad = None
        optimizer.step()
    return [p.detach().clone() for p in params]


def _loop_sgd(net, lr, weight_decay):
    """The released optimizer as PyTorch's per-tensor loop (``foreach=False``)."""
    groups = [{"params": [p for p in net.parameters() if p.dim() > 1],
               "weight_decay": weight_decay},
              {"params": [p for p in net.parameters() if p.dim() <= 1], "weight_decay": 0.0}]
    return torch.optim.SGD([g for g in groups if g["params"]], lr=lr, momentum=0.9,
                           foreach=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_optimizer_is_fused_sgd_with_the_loop_values(digits_space, dtype):
    """make_optimizer on CPU runs PyTorch's fused SGD with the values of the per-tensor loop
    (weight decay on dim > 1 only, momentum buffers started from the first gradient, a
    parameter without a gradient skipped), up to rounding in the last bit."""
    torch.manual_seed(0)
    net = fastshift.Supernet(digits_space).to(dtype)
    twin = fastshift.Supernet(digits_space).to(dtype)
    twin.load_state_dict(net.state_dict())
    start = [p.detach().clone() for p in net.parameters()]
    opt = make_optimizer(net, lr=0.05, momentum=0.9, weight_decay=4e-3)
    assert all(group["fused"] for group in opt.param_groups)
    got = _sgd_steps(net, opt)
    want = _sgd_steps(twin, _loop_sgd(twin, 0.05, 4e-3))
    eps = torch.finfo(dtype).eps
    for a, b, s0 in zip(got, want, start):
        torch.testing.assert_close(a, b, rtol=8 * eps, atol=8 * eps)
        assert (a - s0).abs().max() > 0.05  # moved by the updates
    assert not _loop_sgd(net, 0.05, 0.0).param_groups[0]["fused"]


def test_optimizer_state_keeps_its_implementation(digits_space):
    """A state saved by the per-tensor loop (another device's choice) loads into a CPU
    optimizer that stays fused, with the momentum buffers and hyper-parameters of the state."""
    net = fastshift.Supernet(digits_space)
    other = _loop_sgd(net, 0.5, 4e-5)
    _sgd_steps(net, other, steps=2)
    opt = make_optimizer(net, lr=0.01, momentum=0.9, weight_decay=4e-5)
    load_optimizer_state(opt, other.state_dict())
    assert all(g["fused"] is True and g["lr"] == 0.5 for g in opt.param_groups)
    assert len(opt.state) == len(other.state) == len(list(net.parameters())) - 1
    for p, state in other.state.items():
        torch.testing.assert_close(opt.state[p]["momentum_buffer"], state["momentum_buffer"],
                                   rtol=0, atol=0)


def _state(net):
    return {k: v.clone() for k, v in net.state_dict().items()}


def test_shifting_moves_weights_spos_mode_does_not(trained_net, digits_split, trained_state):
    result = fastshift.search(trained_net, digits_split["train"], digits_split["val"],
                              shifting=False, **SMALL)
    for k, v in result.supernet.state_dict().items():
        torch.testing.assert_close(v, trained_state[k], rtol=0, atol=0, msg=k)
    assert all(r["supernet_version"] == 0 for r in result.history)
    net = fastshift.Supernet(trained_net.space)
    net.load_state_dict(trained_state)
    result = fastshift.search(net, digits_split["train"], digits_split["val"], **SMALL)
    moved = [k for k, v in result.supernet.state_dict().items()
             if not torch.equal(v, trained_state[k])]
    assert any(k.endswith("weight") for k in moved)
    assert any("running_mean" in k for k in moved)


def test_history_and_final_ranking(trained_net, digits_split):
    result = fastshift.search(trained_net, digits_split["train"], digits_split["val"], seed=2,
                              **SMALL)
    h = result.history
    assert len(h) == 3 * 6 and [r["generation"] for r in h] == [0] * 6 + [1] * 6 + [2] * 6
    assert [r["index"] for r in h] == list(range(18))
    assert [r["supernet_version"] for r in h] == [2 * (i + 1) for i in range(18)]
    for r in h:
        space = trained_net.space
        assert r["flops"] == space.flops(r["arch"]) and r["params"] == space.params(r["arch"])
        assert 0 <= r["top1_err"] <= 1 and r["top5_err"] <= r["top1_err"]
    latest = {}
    for r in h:
        latest[tuple(r["arch"])] = r["top1_err"]
    # the final generation is ranked: nothing it evaluated beats the reported top-k
    worst_top = max(e for _, e in result.top_k)
    for r in h[-6:]:
        if tuple(r["arch"]) not in dict(result.top_k):
            assert latest[tuple(r["arch"])] >= worst_top
    assert result.best_error == min(latest[a] for a, _ in result.top_k)
    assert result.best_error == result.top_k[0][1]


@pytest.mark.parametrize("update,versions", [("candidate", lambda i, g: i + 1),
                                             ("generation", lambda i, g: g)])
def test_update_granularity(trained_net, digits_split, update, versions):
    result = fastshift.search(trained_net, digits_split["train"], digits_split["val"],
                              update=update, **SMALL)
    got = [r["supernet_version"] for r in result.history]
    assert got == [versions(r["index"], r["generation"]) for r in result.history]


def test_zero_grad_modes(trained_net, digits_split):
    """zeros (torch 1.x): a block off the current path keeps moving by momentum; none
    (torch >= 2): it does not."""
    moved = {}
    for mode in ("none", "zeros"):
        net = fastshift.Supernet(trained_net.space)
        net.load_state_dict(trained_net.state_dict())
        cfg = FitnessConfig(train_steps=2, train_batch_size=32, val_batches=1,
                            val_batch_size=50, lr=0.05, zero_grad=mode)
        shifter = Shifter(net, BatchStream(digits_split["train"], 32), EvalSet.balanced(
            digits_split["val"], 1, 50), cfg)
        shifter.evaluate((0, 0, 0, 0), seed=0)
        before = net.features[0][0].branch_main[0].weight.detach().clone()
        shifter.evaluate((1, 1, 1, 1), seed=1)
        moved[mode] = not torch.equal(before, net.features[0][0].branch_main[0].weight)
    assert moved == {"none": False, "zeros": True}


def test_transfer_replaces_head(trained_net, trained_state):
    split = fastshift.data.digits(seed=0, classes=range(5, 10))
    assert int(split["train"][1].max()) == 4
    result = fastshift.search(trained_net, split["train"], split["val"], num_classes=5, **SMALL)
    head = result.supernet.classifier[0].weight
    assert head.shape == (5, trained_net.space.last_channels)
    assert result.config["num_classes"] == 5
    assert result.supernet(torch.zeros(1, 1, 8, 8), (0, 0, 0, 0)).shape == (1, 5)
    body = result.supernet.first_conv[0].weight
    assert not torch.equal(body, trained_state["first_conv.0.weight"])  # trained through search


def test_labels_beyond_head_are_an_error(digits_space, digits_split):
    net = fastshift.Supernet(digits_space, num_classes=5)
    with pytest.raises(ValueError, match="labels go up to 9 but the classifier has 5 outputs"):
        fastshift.search(net, digits_split["train"], digits_split["val"], **SMALL)


def test_nan_loss_is_a_clear_error(digits_space, digits_split):
    x, y = digits_split["train"]
    bad = x.clone()
    bad[:] = float("nan")
    with pytest.raises(FloatingPointError, match="training loss is nan at step 0 of candidate"):
        fastshift.search(fastshift.Supernet(digits_space), (bad, y), digits_split["val"],
                         **SMALL)


def test_impossible_constraint_fails_before_work(digits_space):
    with pytest.raises(ValueError, match="below the smallest architecture"):
        fastshift.search(fastshift.Supernet(digits_space), None, None, flops_limit=1000)


def test_bad_data_and_settings(digits_space, digits_split):
    net = fastshift.Supernet(digits_space)
    with pytest.raises(ValueError, match="training data is missing"):
        fastshift.search(net, None, digits_split["val"], **SMALL)
    with pytest.raises(ValueError, match="update must be one of"):
        fastshift.search(net, digits_split["train"], digits_split["val"], update="epoch")
    with pytest.raises(ValueError, match="labels must be"):
        fastshift.search(net, (digits_split["train"][0], digits_split["train"][1].float()),
                         digits_split["val"], **SMALL)


def test_resume_with_other_settings_is_refused(trained_net, digits_split, tmp_path):
    fastshift.search(trained_net, digits_split["train"], digits_split["val"],
                     checkpoint_dir=tmp_path, **SMALL)
    with pytest.raises(ValueError, match="argument 'seed' was 0 in the checkpointed run"):
        fastshift.search(trained_net, digits_split["train"], digits_split["val"],
                         resume=tmp_path, **{**SMALL, "seed": 1})
    with pytest.raises(FileNotFoundError, match="no search checkpoint"):
        fastshift.search(trained_net, digits_split["train"], digits_split["val"],
                         resume=tmp_path / "nothing", **SMALL)


def test_jsonl_log(trained_net, digits_split, tmp_path):
    log = tmp_path / "log.jsonl"
    result = fastshift.search(trained_net, digits_split["train"], digits_split["val"],
                              log_path=log, **SMALL)
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert rows == json.loads(json.dumps(result.history))


def _run_job(args, **kw):
    env = dict(os.environ, PYTHONHASHSEED="0")
    return subprocess.Popen([sys.executable, os.path.join(HERE, "search_job.py"), *args],
                            env=env, **kw)


def test_kill_and_resume_is_exact(tmp_path):
    """A search killed (SIGKILL) after a generation's checkpoint and resumed ends with the same
    history, best architecture and supernet weights as an uninterrupted run."""
    full = _run_job([str(tmp_path / "full"), str(tmp_path / "full.json")])
    assert full.wait(timeout=300) == 0

    ckpt = tmp_path / "killed"
    proc = _run_job([str(ckpt), str(tmp_path / "never.json")])
    path = ckpt / CHECKPOINT_NAME
    deadline = time.time() + 300
    done_at_kill = None
    while time.time() < deadline and proc.poll() is None:
        if path.exists():
            try:
                done_at_kill = torch.load(path, weights_only=True)["generation_done"]
            except Exception:  # being replaced right now: read again
                continue
            if done_at_kill >= 1:
                proc.send_signal(signal.SIGKILL)
                break
        time.sleep(0.02)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the job finished before it could be killed"
    assert not (tmp_path / "never.json").exists()
    state = torch.load(path, weights_only=True)
    assert 1 <= state["generation_done"] < 6

    resumed = _run_job([str(ckpt), str(tmp_path / "resumed.json"), "--resume"])
    assert resumed.wait(timeout=300) == 0
    a = json.loads((tmp_path / "full.json").read_text())
    b = json.loads((tmp_path / "resumed.json").read_text())
    assert len(a["history"]) == 7 * 8
    assert a["history"] == b["history"]
    assert a["best_arch"] == b["best_arch"] and a["best_error"] == b["best_error"]
    assert a["weights_sha256"] == b["weights_sha256"]
