import os

# Triton kernels run on CPU tensors in the interpreter; must be set before they are imported.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import fastshift  # noqa: E402

# The float32 reference runs its convolutions through cuDNN, which by PyTorch's default uses
# TF32 (about 1e-3 relative error): the tests compare against true float32 arithmetic.
torch.backends.cudnn.allow_tf32 = False
torch.backends.cuda.matmul.allow_tf32 = False


@pytest.fixture(scope="session")
def digits_split():
    return fastshift.data.digits(seed=0)


@pytest.fixture(scope="session")
def digits_space():
    return fastshift.spaces.digits()


@pytest.fixture(scope="session")
def trained_state(digits_split, digits_space):
    """State dict of a digits supernet trained briefly (shared, read-only)."""
    net = fastshift.Supernet(digits_space, generator=torch.Generator().manual_seed(0))
    fastshift.train_supernet(net, digits_split["train"], iterations=60, batch_size=64, lr=0.1,
                             progress=False)
    return {k: v.clone() for k, v in net.state_dict().items()}


@pytest.fixture
def trained_net(trained_state, digits_space):
    net = fastshift.Supernet(digits_space)
    net.load_state_dict(trained_state)
    return net
