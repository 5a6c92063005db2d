"""The `fastshift` command, run as a user runs it (a separate process)."""

import json
import os
import subprocess
import sys

import pytest
import torch

import fastshift

TINY = ["--population", "6", "--top-k", "2", "--mutations", "3", "--crossovers", "2",
        "--generations", "1", "--train-steps", "2", "--train-batch-size", "32",
        "--val-batches", "1", "--val-batch-size", "100", "--no-progress"]


def fastshift_cli(*args, cwd=None, timeout=600):
    return subprocess.run([sys.executable, "-m", "fastshift", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_demo(tmp_path):
    proc = fastshift_cli("search", "--demo", "--out", tmp_path / "demo")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "demo" / "result.json").read_text())
    log = (tmp_path / "demo" / "search_log.jsonl").read_text().splitlines()
    assert result["evaluations"] == len(log) == 9 * 20
    assert result["best_error"] < 0.3  # a trained digits supernet ranks well above chance
    assert "best architecture" in proc.stdout
    state = fastshift.load_state_dict(tmp_path / "demo" / "supernet_shifted.pt")
    net = fastshift.Supernet(fastshift.spaces.digits())
    net.load_state_dict(state)
    assert "search" in proc.stderr  # the progress bar


def test_train_search_export(tmp_path):
    p = fastshift_cli("train-supernet", "--data", "digits", "--iterations", "30",
                      "--batch-size", "64", "--lr", "0.1", "--out", tmp_path / "sn",
                      "--no-progress")
    assert p.returncode == 0, p.stderr[-3000:]
    assert (tmp_path / "sn" / "supernet.pt").exists()
    p = fastshift_cli("search", "--supernet", tmp_path / "sn" / "supernet.pt", "--out",
                      tmp_path / "search", *TINY)
    assert p.returncode == 0, p.stderr[-3000:]
    result = json.loads((tmp_path / "search" / "result.json").read_text())
    assert result["evaluations"] == 12
    p = fastshift_cli("export", tmp_path / "search", "--out", tmp_path / "best.pt")
    assert p.returncode == 0, p.stderr[-3000:]
    exported = torch.load(tmp_path / "best.pt", weights_only=True)
    assert exported["arch"] == result["best_arch"]
    space = fastshift.SearchSpace.from_config(exported["space"])
    assert exported["flops"] == space.flops(exported["arch"])
    p = fastshift_cli("export", tmp_path / "search", "--arch", "3,3,3,3", "--out",
                      tmp_path / "x.pt")
    assert p.returncode == 0 and torch.load(tmp_path / "x.pt", weights_only=True)["arch"] == [3] * 4
    # resume a finished search from its folder: nothing left to do, same result
    p = fastshift_cli("search", "--supernet", tmp_path / "sn" / "supernet.pt", "--out",
                      tmp_path / "search", "--auto-resume", *TINY)
    assert p.returncode == 0, p.stderr[-3000:]
    again = json.loads((tmp_path / "search" / "result.json").read_text())
    assert again["best_arch"] == result["best_arch"] and again["evaluations"] == 12


@pytest.mark.parametrize("args,message", [
    (["export", "{ckpt}", "--arch", "0,1,2", "--out", "{tmp}/x.pt"], "has 3 genes"),
    (["export", "{ckpt}", "--arch", "0,1,2,9", "--out", "{tmp}/x.pt"], "gene 3 is 9"),
    (["search", "--supernet", "{tmp}/missing.pt", "--out", "{tmp}/s"], "checkpoint not found"),
    (["search", "--supernet", "{ckpt}", "--flops-limit", "10", "--out", "{tmp}/s"],
     "below the smallest architecture"),
    (["search", "--out", "{tmp}/s"], "needs --supernet"),
])
def test_cli_errors(tmp_path, args, message, trained_state):
    ckpt = tmp_path / "sn.pt"
    torch.save({"state_dict": trained_state,
                "space": fastshift.spaces.digits().config()}, ckpt)
    args = [a.format(ckpt=ckpt, tmp=tmp_path) for a in args]
    p = fastshift_cli(*args, *([] if args[0] == "export" else TINY))
    assert p.returncode == 2, (p.stdout, p.stderr)
    assert message in p.stderr
    assert "Traceback" not in p.stderr


def test_wrong_checkpoint_for_space(tmp_path, trained_state):
    ckpt = tmp_path / "sn.pt"
    torch.save(trained_state, ckpt)  # no space recorded: --space decides
    p = fastshift_cli("search", "--supernet", ckpt, "--space", "small32", "--out",
                      tmp_path / "s", *TINY)
    assert p.returncode == 2
    assert "first_conv.0.weight" in p.stderr and "shape" in p.stderr


def test_console_script_is_installed():
    exe = os.path.join(os.path.dirname(sys.executable), "fastshift")
    if not os.path.exists(exe):
        pytest.skip("console script not installed in this environment")
    p = subprocess.run([exe, "info"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and "fastshift" in p.stdout


def test_evaluate_order_preservation(tmp_path, trained_state, digits_space):
    """`fastshift evaluate`: supernet scores of the ground-truth file's architectures, the
    order-preservation numbers (equal to fastshift.analysis on the written scores) and a plot."""
    from fastshift.checkpoint import atomic_save

    ckpt = tmp_path / "sn.pt"
    atomic_save({"state_dict": trained_state, "space": digits_space.config()}, str(ckpt))
    archs = [tuple([c] * 4) for c in range(4)] + [(0, 1, 2, 3), (3, 2, 1, 0), (1, 1, 0, 0)]
    gt = [{"arch": list(a), "accuracy": 0.5 + 0.05 * i} for i, a in enumerate(archs)]
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    csv_rows = ["arch,accuracy"] + [f"{'-'.join(map(str, a))},{0.5 + 0.05 * i}"
                                    for i, a in enumerate(archs)]
    (tmp_path / "gt.csv").write_text("\n".join(csv_rows) + "\n")
    common = ["--supernet", ckpt, "--recalib-steps", "2", "--recalib-batch-size", "32",
              "--val-batches", "1", "--val-batch-size", "100", "--no-progress",
              "--tops", "0.3", "0.5"]
    outs = []
    for name in ("gt.json", "gt.csv"):
        out = tmp_path / f"eval_{name}"
        p = fastshift_cli("evaluate", "--ground-truth", tmp_path / name, "--out", out, *common)
        assert p.returncode == 0, p.stderr[-3000:]
        result = json.loads((out / "evaluate.json").read_text())
        assert (out / "evaluate.png").stat().st_size > 1000
        rows = result["architectures"]
        assert [tuple(r["arch"]) for r in rows] == archs
        want = fastshift.order_preserving([r["supernet_accuracy"] for r in rows],
                                          [r["accuracy"] for r in rows], top=0.3)
        assert result["results"]["top0.3"] == pytest.approx(want.to_dict(), nan_ok=True)
        assert result["results"]["top0.3"]["n"] == 7 and want.n_local == 3
        outs.append(rows)
    assert outs[0] == outs[1]  # CSV and JSON read the same file content
    (tmp_path / "bad.csv").write_text("arch,acc\n0-1-2-3,0.5\n")
    p = fastshift_cli("evaluate", "--ground-truth", tmp_path / "bad.csv", *common)
    assert p.returncode == 2 and "needs the fields 'arch' and 'accuracy'" in p.stderr
    (tmp_path / "bad2.csv").write_text("arch,accuracy\n0-1-2-7,0.5\n0-0-0-0,0.4\n")
    p = fastshift_cli("evaluate", "--ground-truth", tmp_path / "bad2.csv", *common)
    assert p.returncode == 2 and "row 0" in p.stderr and "gene 3 is 7" in p.stderr


def test_evaluate_per_generation(tmp_path, trained_state, digits_space, digits_split):
    """`fastshift search --keep-supernets` keeps every generation's supernet; `fastshift
    evaluate` on them gives one result per generation (each equal to a single-checkpoint run)
    and the tau-per-generation plot."""
    from fastshift.checkpoint import atomic_save

    ckpt = tmp_path / "sn.pt"
    atomic_save({"state_dict": trained_state, "space": digits_space.config()}, str(ckpt))
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps(dict(population=6, top_k=3, mutations=2, crossovers=2,
                                   generations=2, train_steps=2, train_batch_size=32,
                                   val_batches=1, val_batch_size=100, lr=0.01)))
    run = tmp_path / "run"
    p = fastshift_cli("search", "--supernet", ckpt, "--config", cfg, "--keep-supernets",
                      "--out", run, "--no-progress")
    assert p.returncode == 0, p.stderr[-3000:]
    kept = sorted(run.glob("supernet_gen*.pt"))
    assert [k.name for k in kept] == [f"supernet_gen{g:03d}.pt" for g in range(3)]
    archs = [(0, 0, 0, 0), (1, 1, 1, 1), (2, 2, 2, 2), (3, 3, 3, 3), (0, 1, 2, 3), (3, 2, 1, 0)]
    gt = tmp_path / "gt.csv"
    gt.write_text("arch,accuracy\n" + "".join(f"{'-'.join(map(str, a))},{0.9 - 0.01 * i}\n"
                                              for i, a in enumerate(archs)))
    common = ["--ground-truth", gt, "--recalib-steps", "3", "--recalib-batch-size", "32",
              "--val-batches", "1", "--val-batch-size", "100", "--no-progress", "--tops", "0.5"]
    out = tmp_path / "eval"
    p = fastshift_cli("evaluate", "--supernet", *kept, "--out", out, *common)
    assert p.returncode == 0, p.stderr[-3000:]
    result = json.loads((out / "evaluate.json").read_text())
    assert [r["generation"] for r in result["per_checkpoint"]] == [0, 1, 2]
    assert (out / "evaluate_generations.png").stat().st_size > 1000
    single = tmp_path / "eval_last"
    p = fastshift_cli("evaluate", "--supernet", kept[-1], "--out", single, *common)
    assert p.returncode == 0, p.stderr[-3000:]
    last = json.loads((single / "evaluate.json").read_text())
    assert "per_checkpoint" not in last
    assert last["results"] == result["per_checkpoint"][-1]["results"] == result["results"]
    one = tmp_path / "eval_one_at_a_time"  # the module path instead of the batched engine
    p = fastshift_cli("evaluate", "--supernet", kept[-1], "--out", one, "--batch-subnets", "1",
                      *common)
    assert p.returncode == 0, p.stderr[-3000:]
    a = [r["supernet_accuracy"] for r in json.loads((one / "evaluate.json").read_text())
         ["architectures"]]
    b = [r["supernet_accuracy"] for r in last["architectures"]]
    assert a == pytest.approx(b, abs=0.0101)  # float32 paths: at most one image apart
