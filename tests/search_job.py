"""A small search run as its own process by the kill-and-resume test.

usage: python search_job.py CHECKPOINT_DIR OUT_JSON [--resume]
"""

import hashlib
import json
import sys

import torch

import fastshift

TIMING_KEYS = ("train_s", "eval_s")


def main():
    ckpt, out = sys.argv[1], sys.argv[2]
    resume = ckpt if "--resume" in sys.argv else None
    split = fastshift.data.digits(seed=0)
    net = fastshift.Supernet(fastshift.spaces.digits(), generator=torch.Generator().manual_seed(0))
    result = fastshift.search(
        net, split["train"], split["val"], population=8, top_k=3, mutations=4, crossovers=3,
        generations=6, train_steps=3, train_batch_size=32, val_batches=2, val_batch_size=100,
        lr=0.01, seed=11, checkpoint_dir=ckpt, resume=resume, progress=False,
    )
    digest = hashlib.sha256()
    for key, value in result.supernet.state_dict().items():
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    history = [{k: v for k, v in rec.items() if k not in TIMING_KEYS} for rec in result.history]
    with open(out, "w") as f:
        json.dump({"history": history, "best_arch": list(result.best_arch),
                   "best_error": result.best_error, "weights_sha256": digest.hexdigest()}, f)


if __name__ == "__main__":
    main()
