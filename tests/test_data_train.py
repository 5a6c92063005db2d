"""Data streams, the digits split and SPOS supernet training."""

import numpy as np
import pytest
import torch

import fastshift
from fastshift.data import BatchStream, EvalSet, TensorData
from fastshift.train import TRAIN_CHECKPOINT_NAME, sample_path


def test_digits_split_is_fixed_and_disjoint():
    a, b = fastshift.data.digits(seed=0), fastshift.data.digits(seed=0)
    for part in ("train", "val", "test"):
        assert torch.equal(a[part][0], b[part][0])
    sizes = {k: len(v[1]) for k, v in a.items()}
    assert sum(sizes.values()) == 1797 and sizes["val"] > 300
    assert a["train"][0].shape[1:] == (1, 8, 8) and float(a["train"][0].max()) <= 1.0
    flat = {p: {tuple(x.flatten().tolist()) for x in a[p][0]} for p in a}
    assert len(flat["train"] & flat["test"]) < 5  # a few identical images exist in the data
    t = fastshift.data.digits(classes=[5, 6, 7, 8, 9])
    assert set(t["train"][1].tolist()) == {0, 1, 2, 3, 4}
    with pytest.raises(ValueError, match="distinct digits"):
        fastshift.data.digits(classes=[1, 1])


def test_batch_stream_is_resumable_and_crosses_epochs():
    data = (torch.arange(10.0).reshape(10, 1, 1, 1), torch.arange(10))
    s = BatchStream(data, 4, seed=3)
    seen = [s.next()[1] for _ in range(5)]
    assert all(len(b) == 4 for b in seen)
    first_epoch = torch.cat(seen)[:10]
    assert sorted(first_epoch.tolist()) == list(range(10))
    again = BatchStream(data, 4, seed=3)
    again.load_state_dict({**s.state_dict(), "taken": 2})
    assert torch.equal(again.next()[1], seen[2])
    with pytest.raises(ValueError, match="batch_size was 4, now 5"):
        BatchStream(data, 5, seed=3).load_state_dict(s.state_dict())


def test_eval_set_is_class_balanced(digits_split):
    ev = EvalSet.balanced(digits_split["val"], 2, 50, seed=0)
    labels = torch.cat([y for _, y in ev.batches])
    assert ev.num_images == 100 and len(ev.batches) == 2
    counts = torch.bincount(labels, minlength=10)
    assert int(counts.max() - counts.min()) <= 1
    whole = EvalSet.balanced(digits_split["val"], 25, 500)
    assert whole.num_images == len(digits_split["val"][1])


def test_tensor_data_validation():
    with pytest.raises(ValueError, match=r"images must be \[N, C, H, W\]"):
        TensorData(torch.zeros(3, 8, 8), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="labels must be \\[N\\] with N = 3"):
        TensorData(torch.zeros(3, 1, 8, 8), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="labels must be >= 0"):
        TensorData(torch.zeros(2, 1, 8, 8), torch.tensor([0, -1]))
    with pytest.raises(ValueError, match="is empty"):
        fastshift.data.as_dataset((torch.zeros(0, 1, 8, 8), torch.zeros(0, dtype=torch.long)))


def test_image_folder(tmp_path):
    pytest.importorskip("torchvision")
    from PIL import Image

    for c in ("cat", "dog"):
        (tmp_path / c).mkdir()
        for i in range(2):
            arr = np.full((20, 24, 3), (10, 20, 200), dtype=np.uint8)
            Image.fromarray(arr).save(tmp_path / c / f"{i}.png")
    ds = fastshift.data.image_folder(tmp_path, input_size=16, train=False)
    x, y = ds[0]
    assert x.shape == (3, 16, 16) and y == 0
    assert x[0].mean() == pytest.approx(200) and x[2].mean() == pytest.approx(10)  # BGR 0-255
    with pytest.raises(FileNotFoundError, match="image folder not found"):
        fastshift.data.image_folder(tmp_path / "missing")


def test_flops_bin_sampling_lands_in_bins():
    space = fastshift.spaces.spos_shufflenetv2()
    rng = np.random.default_rng(0)
    bins = (290e6, 360e6, 10e6)
    flops = [space.flops(sample_path(space, rng, bins)) for _ in range(40)]
    assert sum(290e6 <= f < 360e6 for f in flops) >= 36


def test_train_supernet_learns_and_resumes(digits_space, digits_split, tmp_path):
    def fresh():
        return fastshift.Supernet(digits_space, generator=torch.Generator().manual_seed(0))

    full = fresh()
    stats = fastshift.train_supernet(full, digits_split["train"], iterations=80, batch_size=64,
                                     lr=0.1, progress=False)
    assert stats["final_loss"] < 1.8  # well below chance level, log(10) = 2.30

    # a run that crashes at iteration 60 (its data fail), resumed from the checkpoint taken
    # at iteration 40, ends with the same weights as the uninterrupted run
    class FailingData(torch.utils.data.Dataset):
        def __init__(self, data, fail_after_items):
            self.inner, self.left = TensorData(*data), fail_after_items

        def __len__(self):
            return len(self.inner)

        def __getitem__(self, i):
            self.left -= 1
            if self.left < 0:
                raise OSError("disk went away")
            return self.inner[i]

    crashed = fresh()
    with pytest.raises(OSError, match="disk went away"):
        fastshift.train_supernet(crashed, FailingData(digits_split["train"], 60 * 64),
                                 iterations=80, batch_size=64, lr=0.1, progress=False,
                                 checkpoint_dir=tmp_path, checkpoint_every=40)
    state = torch.load(tmp_path / TRAIN_CHECKPOINT_NAME, weights_only=True)
    assert state["done"] == 40
    resumed = fresh()
    fastshift.train_supernet(resumed, digits_split["train"], iterations=80, batch_size=64,
                             lr=0.1, progress=False, checkpoint_dir=tmp_path,
                             checkpoint_every=40, resume=True)
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)
