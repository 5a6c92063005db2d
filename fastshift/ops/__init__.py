"""fastshift's ops and the backend choice.

Backends (``backend=`` argument, else the ``FASTSHIFT_BACKEND`` environment variable, else
``auto``):

- ``reference``: plain PyTorch (``fastshift.ops.reference``), always available.
- ``cpu``: the compiled C++ bodies of ``fastshift._C`` (CPU tensors).
- ``cuda``: the compiled CUDA bodies of ``fastshift._C`` (CUDA tensors).
- ``triton``: the Triton kernels of ``fastshift.ops.triton`` (CUDA tensors; CPU tensors only
  under the interpreter, ``TRITON_INTERPRET=1``, which is for tests). The op schemas still come
  from ``fastshift._C``.
- ``auto``: the fastest measured backend for the tensor's device: ``cpu`` on CPU when the
  extension was built, else ``reference``; on CUDA ``cuda`` when its bodies were compiled for
  that GPU (``cuda_auto_backend``) and the workload is as large as those measured faster than
  cuDNN on an H200 (``AUTO_CUDA_MIN_ROWS``, ``AUTO_CUDA_MIN_NETWORK_ROWS``; README, "GPU"),
  else ``reference`` (cuDNN). ``triton`` is never picked by ``auto``.

An explicitly requested backend that was not built raises with the rebuild command.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch

from . import reference
from . import triton as _triton
from ._registry import BUILD_ERROR, CUDA_ARCHS, HAVE_C, conv_out_size, cpu_kernel_level, cuda_built
from .allocator import tune_cpu_allocator

__all__ = ["BACKENDS", "available_backends", "resolve_backend", "channel_split",
           "channel_interleave", "shuffle_cat", "shuffle_cat_pair", "shuffle_regroup", "dwconv_bn",
           "frozen_weights",
           "pwconv_bn_relu", "conv_bn_chain", "linear", "stem_conv_bn_relu", "reference",
           "HAVE_C", "BUILD_ERROR", "cuda_built", "CUDA_ARCHS", "cpu_kernel_level",
           "cuda_auto_backend",
           "AUTO_CUDA_MIN_ROWS", "AUTO_CUDA_MIN_NETWORK_ROWS",
           "triton_usable", "tune_cpu_allocator"]

BACKENDS = ("reference", "cpu", "cuda", "triton", "auto")
REBUILD = "pip install --no-build-isolation -e .  (or: bash scripts/install.sh)"


def triton_usable(device: torch.device | str) -> bool:
    """Whether the ``triton`` backend can run tensors of ``device`` now."""
    return HAVE_C and _triton.usable(device)


def available_backends(device: torch.device | str | None = None) -> list[str]:
    """Backends usable now (for ``device`` when given): built, and with a device to run on."""
    out = ["reference"]
    if HAVE_C:
        out.append("cpu")
        if cuda_built() and torch.cuda.is_available():
            out.append("cuda")
    if device is not None:
        kind = torch.device(device).type
        out = [b for b in out if b == "reference" or b == kind]
        if triton_usable(kind):
            out.append("triton")
    elif triton_usable("cuda") or triton_usable("cpu"):
        out.append("triton")
    return out


def cuda_auto_backend(capability: tuple[int, int] | None, archs=CUDA_ARCHS) -> str:
    """``auto``'s backend on a GPU of this compute capability (None: unknown): ``cuda`` where
    the CUDA bodies carry code for it (``archs``: major * 10 + minor, or 1000 + that for PTX,
    which GPUs of that capability and newer compile at load time), else ``reference``."""
    if capability is None:
        return "reference"
    code = capability[0] * 10 + capability[1]
    if code in archs or any(1000 < a <= 1000 + code for a in archs):
        return "cuda"
    return "reference"


_AUTO_CUDA: dict = {}


@torch.compiler.assume_constant_result
def _auto_on_cuda(index) -> str:
    """cuda_auto_backend for CUDA device ``index`` (None: the current one), asked once per
    device (a constant for torch.compile)."""
    if index not in _AUTO_CUDA:
        try:
            capability = torch.cuda.get_device_capability(index)
        except (RuntimeError, AssertionError, ValueError):  # no usable CUDA device here
            capability = None
        _AUTO_CUDA[index] = cuda_auto_backend(capability)
    return _AUTO_CUDA[index]


# ``auto`` on CUDA runs the CUDA bodies only on workloads at least as large as those measured
# faster than cuDNN on an H200 (docs/performance.md, "GPU: one H200, second session"), since
# smaller ones are bound by host work and measured slower: a block (or op) whose input has at
# least AUTO_CUDA_MIN_ROWS pixel rows (N*H*W; the 28x28 blocks at batch 150, 117,600 rows,
# measured 1.07-1.42x, the 14x14 ones 0.84-0.94x), and a whole network on at least
# AUTO_CUDA_MIN_NETWORK_ROWS image pixel rows (150 images of 224x224: 1.19x end to end).
AUTO_CUDA_MIN_ROWS = 100_000
AUTO_CUDA_MIN_NETWORK_ROWS = 150 * 224 * 224


def resolve_backend(backend: str | None, device: torch.device, rows: int | None = None,
                    min_rows: int = AUTO_CUDA_MIN_ROWS) -> str:
    """The concrete backend (reference | cpu | cuda) to run on ``device``.

    ``rows``: the workload's pixel rows (N*H*W of its input), if the caller knows them;
    ``auto`` on CUDA then picks the reference below ``min_rows`` (see AUTO_CUDA_MIN_ROWS).
    Explicit backends and ``auto`` on CPU ignore them."""
    name = (backend or os.environ.get("FASTSHIFT_BACKEND") or "auto").strip().lower()
    if name not in BACKENDS:
        raise ValueError(f"unknown fastshift backend {name!r}: choose one of {list(BACKENDS)}")
    device = torch.device(device)
    kind = device.type
    if name == "auto":
        # The fastest measured backend per device: the C++ bodies on CPU, the CUDA bodies on
        # a GPU they were compiled for (H200, README "GPU"); PyTorch's own path otherwise.
        if HAVE_C and kind == "cpu":
            return kind
        if kind == "cuda" and cuda_built():
            if rows is not None and rows < min_rows:
                return "reference"
            return _auto_on_cuda(device.index)
        return "reference"
    if name == "reference":
        return name
    if name == "triton":
        if not HAVE_C:
            raise RuntimeError(
                "fastshift backend 'triton' needs the op schemas of fastshift._C, which failed "
                f"to import ({BUILD_ERROR}); rebuild with: {REBUILD}")
        if not _triton.usable(kind):
            why = (f"triton is not importable ({_triton.TRITON_ERROR})" if _triton.TRITON_ERROR
                   else "CPU tensors need Triton's interpreter: set TRITON_INTERPRET=1 before "
                   "the first use (slow; for tests)")
            raise RuntimeError(f"fastshift backend 'triton' cannot run on {kind!r} here: {why}")
        return name
    if not HAVE_C:
        raise RuntimeError(
            f"fastshift backend {name!r} was not built (fastshift._C failed to import: "
            f"{BUILD_ERROR}); rebuild with: {REBUILD}"
        )
    if name == "cuda" and not cuda_built():
        raise RuntimeError(
            "fastshift backend 'cuda' was not built (fastshift._C has no CUDA bodies); rebuild "
            f"on a machine with the CUDA toolkit and FASTSHIFT_FORCE_CUDA=1: {REBUILD}"
        )
    if name != kind:
        raise ValueError(f"fastshift backend {name!r} cannot run tensors on device {kind!r}")
    return name


def channel_split(x: torch.Tensor, backend: str | None = None):
    """``x [B, C, H, W]`` -> ``(x[:, 0::2], x[:, 1::2])``; see ``reference.channel_split``.

    Compiled backends return contiguous copies and are differentiable (the backward is
    ``channel_interleave``); the reference returns strided views.
    """
    if resolve_backend(backend, x.device) == "reference":
        return reference.channel_split(x)
    return torch.ops.fastshift.channel_split.default(x)


def channel_interleave(even: torch.Tensor, odd: torch.Tensor, backend: str | None = None):
    """``(even, odd)`` -> ``out`` with ``out[:, 0::2] = even``, ``out[:, 1::2] = odd``."""
    if resolve_backend(backend, even.device) == "reference":
        return reference.channel_interleave(even, odd)
    return torch.ops.fastshift.channel_interleave.default(even, odd)


def shuffle_cat(a: torch.Tensor, b: torch.Tensor, backend: str | None = None) -> torch.Tensor:
    """``cat((a, b), 1)`` already split for the next ShuffleNetV2 unit: ``out [B, Ca+Cb, H, W]``
    with ``out[:, :C/2] = t[:, 0::2]``, ``out[:, C/2:] = t[:, 1::2]`` (``t = cat((a, b), 1)``).

    One copy where ``cat`` then ``channel_split`` make two. ``a``/``b`` may be strided
    (channel slices); compiled backends return channels-last when ``a`` is channels-last-like
    (``b`` when ``a`` has no channels), and are differentiable (the backward is
    ``shuffle_cat_backward``). The ``triton`` backend runs the compiled body of the tensor's
    device, as for ``channel_split``. Equivalent to ``reference.shuffle_cat``.
    """
    if resolve_backend(backend, a.device) == "reference":
        return reference.shuffle_cat(a, b)
    return torch.ops.fastshift.shuffle_cat.default(a, b)


def shuffle_cat_pair(a: torch.Tensor, b: torch.Tensor, backend: str | None = None):
    """:func:`shuffle_cat`'s output as its two halves, two tensors ``(lo, hi)``, each
    ``[B, (Ca+Cb)/2, H, W]``: ``channel_split(cat((a, b), 1))``, the next unit's ``x_proj`` and
    ``x_main``. Where the next unit splits a :func:`shuffle_cat` output into channel ranges,
    autograd concatenates the ranges' gradients before ``shuffle_cat_backward``; the pair's
    backward (``shuffle_cat_pair_backward``) reads the two gradients where they are. One copy
    each way on the ``cpu`` backend; on other devices a ``cat`` more (it composes
    ``channel_split``), so the fused blocks use it on the CPU only. Layout as
    :func:`shuffle_cat`. Equivalent to ``reference.shuffle_cat_pair``.
    """
    if resolve_backend(backend, a.device) == "reference":
        return reference.shuffle_cat_pair(a, b)
    return torch.ops.fastshift.shuffle_cat_pair.default(a, b)


def shuffle_regroup(a: list[torch.Tensor], b: list[torch.Tensor], routes: list[int],
                    batch: int, backend: str | None = None) -> list[torch.Tensor]:
    """:func:`shuffle_cat_pair` of row blocks gathered from several sources, the batched
    engine's hand-over between two layers (one layer's unit outputs, one per choice group, to
    the next layer's group inputs).

    Sources ``i``: ``a[i] [R_i, Ca, H, W]`` and ``b[i] [R_i, Cb, H, W]`` (the same Ca, Cb, H,
    W, dtype and device), stacks of ``R_i / batch`` row blocks of ``batch`` rows. ``routes``:
    per destination its run count ``n``, then ``n`` triples ``(source, first block, end
    block)``. Returns ``[lo_0, hi_0, lo_1, hi_1, ...]``, ``(lo_d, hi_d) =
    shuffle_cat_pair(cat(a's runs), cat(b's runs))`` ``[rows_d, (Ca+Cb)/2, H, W]``. On the
    ``cpu`` backend one copy writes every destination (its backward sums a block's gradients
    over the runs that took it, in destination order, and interleaves the sum once); other
    devices compose ``cat`` and ``shuffle_cat_pair``. Layout as :func:`shuffle_cat`.
    Equivalent to ``reference.shuffle_regroup``: values bit for bit (a permutation);
    gradients too except where a block feeds three or more destinations, whose sum autograd's
    backward of the composition may take in another order (last-bit differences)."""
    if resolve_backend(backend, a[0].device) == "reference":
        return reference.shuffle_regroup(a, b, routes, batch)
    return torch.ops.fastshift.shuffle_regroup.default(list(a), list(b), list(routes), batch)


@contextlib.contextmanager
def frozen_weights():
    """A block in which no weight changes (the validation passes of ``Shifter``): the CPU
    bodies pack each 1x1 and depthwise weight once for the whole block and reuse the packed
    form in every later call (every node of the trie, every batch) instead of packing it per
    call. Entries are keyed per data pointer, layout and version counter, so a weight changed
    in place by a torch op inside the block is packed again; a change that bypasses the
    version counter (through ``.data``) is not seen. Nestable; without the extension a no-op.
    Results are the same bit for bit (the same packing, done once)."""
    if not HAVE_C:
        yield
        return
    torch.ops.fastshift.pack_cache(True)
    try:
        yield
    finally:
        torch.ops.fastshift.pack_cache(False)


def linear(x: torch.Tensor, weight: torch.Tensor, backend: str | None = None) -> torch.Tensor:
    """The classifier ``x [B, C] @ weight.T`` (``weight [O, C]``, no bias) -> ``[B, O]``.

    On the ``cpu`` backend (float32 / float64 CPU tensors) the op ``fastshift::linear`` runs it
    on fastshift's own products (about twice MKL's rate for the SPOS head's shapes on the
    project's machine; differentiable, the backward is ``fastshift::linear_backward``); every
    other backend, device or dtype runs ``torch.nn.functional.linear`` (cuBLAS on CUDA).
    Equivalent to ``reference.linear`` up to the rounding of a different summation blocking.
    """
    if (x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)
            and resolve_backend(backend, x.device) == "cpu"):
        return torch.ops.fastshift.linear.default(x, weight)
    return reference.linear(x, weight)


def _stats_args(x, channels, groups, running_mean, running_var, training, op):
    """The ``[G, C]`` statistics handed to a compiled op: the running ones in eval (required),
    placeholders in training (where the op computes batch statistics and never reads them:
    uninitialised, so no fill kernel runs)."""
    if running_mean is not None:
        return running_mean.view(groups, channels), running_var.view(groups, channels)
    if not training:
        raise ValueError(f"{op}: eval mode needs running_mean and running_var")
    placeholder = x.new_empty((groups, channels))
    return placeholder, placeholder


def _stat_count(y, groups):
    """How many values each ``[G, C]`` batch statistic of ``y [G*N, C, H, W]`` averages."""
    return (y.shape[0] // groups) * y.shape[2] * y.shape[3]


def _update_running(y, mean, var, mean_in, var_in, running_mean, groups, training, momentum):
    """After a compiled op in training: fold its batch statistics into the running ones (the
    ``[G, C]`` views ``mean_in`` / ``var_in``), unless none were given or the batch is empty."""
    if training and running_mean is not None and y.shape[0]:
        reference.update_running_stats(mean_in, var_in, mean, var, _stat_count(y, groups),
                                       momentum)


@functools.lru_cache(maxsize=256)
def _unbiased_row(counts: tuple, sizes: tuple, dtype: torch.dtype,
                  device: torch.device) -> torch.Tensor:
    """``[1, sum(sizes)]``: each layer's ``unbiased_factor(count)`` over its columns (read
    only)."""
    row = [reference.unbiased_factor(c) for c, n in zip(counts, sizes) for _ in range(n)]
    return torch.tensor(row, dtype=dtype, device=device).view(1, -1)


def _update_chain_running(outs, batch_mean, batch_var, sizes, running_means, running_vars,
                          momentums, groups, training):
    """:func:`_update_running` for every layer of a chain (``outs``: each layer's output;
    ``batch_mean`` / ``batch_var``: the ``[G, sum C_i]`` batch statistics, layer i in its
    ``sizes[i]`` columns). Where every updated layer has the same momentum and the statistics
    are float32 / float64, the updates are one multiplication (by each column's unbiasing
    factor, a cached row) and two multi-tensor lerps instead of three calls per layer: the
    arithmetic of :func:`reference.update_running_stats` (``lerp_`` toward ``var *
    factor``, the factor rounded to the statistics' dtype as a Python scalar operand is)."""
    if not training:
        return
    counts = [_stat_count(out, groups) for out in outs]
    live = [i for i, (rm, out) in enumerate(zip(running_means, outs))
            if rm is not None and out.shape[0]]
    means = batch_mean.split(sizes, 1)
    if (len(live) > 1 and len({momentums[i] for i in live}) == 1
            and batch_var.dtype in (torch.float32, torch.float64)):
        row = _unbiased_row(tuple(counts), tuple(sizes), batch_var.dtype, batch_var.device)
        unbiased = (batch_var * row).split(sizes, 1)
        momentum = momentums[live[0]]
        torch._foreach_lerp_([running_means[i].view(groups, -1) for i in live],
                             [means[i] for i in live], momentum)
        torch._foreach_lerp_([running_vars[i].view(groups, -1) for i in live],
                             [unbiased[i] for i in live], momentum)
        return
    variances = batch_var.split(sizes, 1)
    for i in live:
        reference.update_running_stats(running_means[i].view(groups, -1),
                                       running_vars[i].view(groups, -1), means[i],
                                       variances[i], counts[i], momentums[i])


def _live_taps(weight: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """A depthwise weight cropped to the taps that can meet an input pixel of an h x w map.

    Exact: only the central 2 max(h, w) - 1 taps ever do (any stride); the cropped taps get
    zero gradient through the slice."""
    k = weight.shape[-1]
    live = 2 * max(h, w) - 1
    if weight.dim() == 4 and k > live and k % 2 == 1:
        off = (k - live) // 2
        weight = weight[:, :, off:off + live, off:off + live]
    return weight


def dwconv_bn(x: torch.Tensor, weight: torch.Tensor, stride: int,
              running_mean: torch.Tensor | None, running_var: torch.Tensor | None, *,
              groups: int = 1, training: bool, momentum: float = 0.1, eps: float = 1e-5,
              backend: str | None = None) -> torch.Tensor:
    """Depthwise conv + BatchNorm (no affine) over ``groups`` row groups, fused.

    ``x [G*N, C, H, W]`` (float32/float64 on CPU), ``weight [C, 1, k, k]`` (k odd, padding
    k // 2), ``stride`` 1 or 2, ``running_mean`` / ``running_var`` ``[G, C]`` (``[C]`` when
    G = 1). Training: each group is normalised by its own batch statistics and its running
    statistics are updated in place (as ``F.batch_norm``); eval: by its running statistics.
    Returns ``[G*N, C, H', W']`` (channels-last from the compiled backends). Equivalent, values
    and gradients with respect to x and weight, to ``reference.dwconv_bn``.
    """
    name = resolve_backend(backend, x.device)
    if name == "reference":
        return reference.dwconv_bn(x, weight, stride, running_mean, running_var, groups=groups,
                                   training=training, momentum=momentum, eps=eps)
    mean_in, var_in = _stats_args(x, x.shape[1], groups, running_mean, running_var, training,
                                  "dwconv_bn")
    op = (torch.ops.fastshift.dwconv_bn_triton.default if name == "triton"
          else torch.ops.fastshift.dwconv_bn.default)
    y, mean, var = op(x, _live_taps(weight, x.shape[2], x.shape[3]), mean_in, var_in, stride,
                      groups, eps, training)
    _update_running(y, mean, var, mean_in, var_in, running_mean, groups, training, momentum)
    return y


def pwconv_bn_relu(x: torch.Tensor, weight: torch.Tensor,
                   running_mean: torch.Tensor | None, running_var: torch.Tensor | None, *,
                   groups: int = 1, training: bool, momentum: float = 0.1, eps: float = 1e-5,
                   backend: str | None = None) -> torch.Tensor:
    """1x1 conv + BatchNorm (no affine) over ``groups`` row groups + ReLU, fused.

    ``x [G*N, C, H, W]``, ``weight [O, C, 1, 1]``; statistics ``[G, O]`` as in
    :func:`dwconv_bn`. Returns ``[G*N, O, H, W]``. Equivalent to ``reference.pwconv_bn_relu``.
    Precision: float32 products on CUDA run in TF32 while ``torch.backends.cudnn.allow_tf32``
    is on (PyTorch's default), as the reference's ``conv2d`` does in cuDNN; with it off, in
    true float32 (the tests' setting).
    """
    name = resolve_backend(backend, x.device)
    if name == "reference":
        return reference.pwconv_bn_relu(x, weight, running_mean, running_var, groups=groups,
                                        training=training, momentum=momentum, eps=eps)
    mean_in, var_in = _stats_args(x, weight.shape[0], groups, running_mean, running_var,
                                  training, "pwconv_bn_relu")
    op = (torch.ops.fastshift.pwconv_bn_relu_triton.default if name == "triton"
          else torch.ops.fastshift.pwconv_bn_relu.default)
    y, _, mean, var = op(x, weight, mean_in, var_in, groups, eps, training)
    _update_running(y, mean, var, mean_in, var_in, running_mean, groups, training, momentum)
    return y


def stem_conv_bn_relu(x: torch.Tensor, weight: torch.Tensor,
                      running_mean: torch.Tensor | None, running_var: torch.Tensor | None, *,
                      stride: int, training: bool, momentum: float = 0.1, eps: float = 1e-5,
                      backend: str | None = None) -> torch.Tensor:
    """The network's stem as one op: ``k x k`` conv (``weight [O, C, k, k]``, odd k, padding
    ``k // 2``, no bias) + BatchNorm without affine + ReLU.

    ``x [B, C, H, W]``: the network's input images (float32 / float64; the op gives no
    gradient for x). ``running_mean`` / ``running_var`` ``[O]``: used in eval, updated in place
    in training (None in training: no update). Returns ``[B, O, H', W']``, channels-last.
    Equivalent to ``reference.stem_conv_bn_relu`` (values, the weight's gradient, running
    statistics). The ``cpu`` backend runs the op (``csrc/cpu/stem_cpu.cpp``: work in fixed
    chunks of output rows, so its values do not depend on the thread count, unlike oneDNN's conv
    gradient and ATen's batch norm); every other backend, and an x that requires grad, runs
    the reference.
    """
    name = resolve_backend(backend, x.device)
    if name != "cpu" or x.requires_grad:
        return reference.stem_conv_bn_relu(x, weight, running_mean, running_var, stride=stride,
                                           training=training, momentum=momentum, eps=eps)
    channels = weight.shape[0]
    mean_in, var_in = _stats_args(x, channels, 1, running_mean, running_var, training,
                                  "stem_conv_bn_relu")
    y, _, mean, var = torch.ops.fastshift.stem_conv_bn_relu.default(
        x, weight, mean_in.view(channels), var_in.view(channels), stride, eps, training)
    _update_running(y, mean, var, mean_in, var_in, running_mean, 1, training, momentum)
    return y


def conv_bn_chain(x: torch.Tensor, weights, layers, running_means, running_vars, *,
                  groups: int = 1, training: bool, momentums, eps: float = 1e-5,
                  backend: str | None = None,
                  shuffle_with: torch.Tensor | None = None) -> torch.Tensor:
    """A branch of a choice block as one fused op: the layers in turn, ``layers[i] == 0`` a
    ``pwconv_bn_relu`` layer, 1 or 2 a ``dwconv_bn`` layer of that stride.

    ``weights[i]``, ``running_means[i]`` / ``running_vars[i]`` (``[G, C_i]`` or ``[C_i]``,
    None in training for no running update) and ``momentums[i]`` are that layer's, as in
    :func:`dwconv_bn` / :func:`pwconv_bn_relu`; ``groups``, ``training`` and ``eps`` are shared.
    Same values, gradients (x and every weight) and running statistics as calling those ops in
    turn (``reference.conv_bn_chain``); one autograd node and one op call for the whole chain
    instead of one per layer. Returns the last layer's output (channels-last from the compiled
    backends). Its 1x1 layers follow ``torch.backends.cudnn.allow_tf32`` on CUDA as
    :func:`pwconv_bn_relu` does.

    ``shuffle_with`` (a ``[G*N, Ca, H', W']`` tensor, e.g. a ShuffleNetV2 unit's passed-through
    half): return ``shuffle_cat(shuffle_with, y)`` instead of y, the unit's split-ready output;
    in eval without autograd on the ``cpu`` backend it is written from the chunks in cache
    (``conv_bn_chain_eval``), else ``shuffle_cat`` runs after the chain.
    """
    name = resolve_backend(backend, x.device)
    layers = [int(k) for k in layers]
    if name == "reference":
        y = reference.conv_bn_chain(x, weights, layers, running_means, running_vars,
                                    groups=groups, training=training, momentums=momentums,
                                    eps=eps)
        return y if shuffle_with is None else reference.shuffle_cat(shuffle_with, y)
    counts = [len(v) for v in (weights, layers, running_means, running_vars, momentums)]
    if len(set(counts)) != 1:
        raise ValueError("conv_bn_chain: weights, layers, running_means, running_vars and "
                         f"momentums need one entry per layer, got {counts}")
    h, w = x.shape[2], x.shape[3]
    live = []
    for weight, kind in zip(weights, layers):
        if kind != 0:
            weight = _live_taps(weight, h, w)
            k = weight.shape[-1]
            h, w = conv_out_size(h, k, kind), conv_out_size(w, k, kind)
        live.append(weight)
    sizes = [weight.shape[0] for weight in weights]
    # the layers' [G, C_i] statistics side by side: the running ones in eval, a placeholder in
    # training (where the op computes batch statistics and never reads it)
    if training:
        mean_in = var_in = x.new_empty((groups, sum(sizes)))
    else:
        if any(s is None for s in (*running_means, *running_vars)):
            raise ValueError("conv_bn_chain: eval mode needs every layer's running_mean and "
                             "running_var")
        mean_in = torch.cat([m.view(groups, -1) for m in running_means], 1)
        var_in = torch.cat([v.view(groups, -1) for v in running_vars], 1)
    if name == "cpu" and not training and not torch.is_grad_enabled():
        # no graph to keep: the CPU body that runs the layers image chunk by image chunk with
        # their intermediate outputs in cache, and returns y alone (the same values)
        return torch.ops.fastshift.conv_bn_chain_eval.default(x, live, layers, mean_in, var_in,
                                                              groups, eps, shuffle_with)
    op = (torch.ops.fastshift.conv_bn_chain_triton.default if name == "triton"
          else torch.ops.fastshift.conv_bn_chain.default)
    y, saved, batch_mean, batch_var = op(x, live, layers, mean_in, var_in, groups, eps, training)
    outs = [*saved[:len(layers) - 1], y]  # each layer's output, for its statistics' count
    _update_chain_running(outs, batch_mean, batch_var, sizes, running_means, running_vars,
                          momentums, groups, training)
    return y if shuffle_with is None else shuffle_cat(shuffle_with, y, backend=name)
