// Every fastshift operator schema, declared once.
//
// Device bodies register themselves with TORCH_LIBRARY_IMPL in csrc/cpu/*.cpp and
// csrc/cuda/*.cu, so the dispatcher picks the body from the input's device; conv_bn_chain's
// bodies (csrc/chain.cpp) are compositions of the layer ops, for every device. Autograd is
// registered in C++ (csrc/autograd.cpp), the fake (meta) kernels from Python
// (fastshift/ops/_registry.py).
#include <torch/library.h>

#include <Python.h>

// Importing fastshift._C as a Python module only needs a module object: the operators live
// in the dispatcher, reached as torch.ops.fastshift.<name>.
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(fastshift, m) {
  // ShuffleNetV2 channel shuffle of the released code: x [B, C, H, W] with C even ->
  // (x[:, 0::2], x[:, 1::2]), each [B, C/2, H, W] and contiguous.
  m.def("channel_split(Tensor x) -> (Tensor, Tensor)");
  // Inverse of channel_split (and its backward): (even, odd) [B, C/2, H, W] -> [B, C, H, W]
  // with out[:, 0::2] = even and out[:, 1::2] = odd.
  m.def("channel_interleave(Tensor even, Tensor odd) -> Tensor");
  // The channel split of the next ShuffleNetV2 unit fused into this unit's concat: with
  // t = cat(a, b) along channels (a [B, Ca, H, W], b [B, Cb, H, W], Ca + Cb = C even),
  // out[:, :C/2] = t[:, 0::2] and out[:, C/2:] = t[:, 1::2], i.e. cat(channel_split(t)), so the
  // next unit's two halves are the contiguous channel ranges of out (no split copy).
  // Inputs may be strided (e.g. channel slices); out is channels-last when a is.
  m.def("shuffle_cat(Tensor a, Tensor b) -> Tensor");
  // Backward of shuffle_cat (and its inverse): grad [B, C, H, W] -> (grad_a, grad_b) with
  // t = channel_interleave(grad[:, :C/2], grad[:, C/2:]), grad_a = t[:, :split],
  // grad_b = t[:, split:].
  m.def("shuffle_cat_backward(Tensor grad, int split) -> (Tensor, Tensor)");
  // shuffle_cat's output as its two halves, each a tensor of its own: (lo, hi) =
  // channel_split(cat(a, b)), [B, C/2, H, W] each, the next unit's (x_proj, x_main) without
  // a split and, in the backward, without a concatenation of their gradients (the CPU body;
  // other devices compose channel_split and cat). Same layout rule as shuffle_cat.
  m.def("shuffle_cat_pair(Tensor a, Tensor b) -> (Tensor, Tensor)");
  // Backward of shuffle_cat_pair (and its inverse): (grad_lo, grad_hi) [B, C/2, H, W] ->
  // (grad_a, grad_b) = shuffle_cat_backward(cat(grad_lo, grad_hi), split).
  m.def("shuffle_cat_pair_backward(Tensor grad_lo, Tensor grad_hi, int split) -> "
        "(Tensor, Tensor)");
  // The batched engine's hand-over between layers: shuffle_cat_pair of row blocks gathered
  // from several sources. Sources i: a[i] [R_i, Ca, H, W], b[i] [R_i, Cb, H, W] (same Ca, Cb,
  // H, W), each a stack of R_i / batch row blocks. routes: for each destination its run count
  // n, then n triples (source, first block, end block); returns [lo_0, hi_0, lo_1, hi_1, ...]
  // with (lo_d, hi_d) = shuffle_cat_pair(cat of a's runs, cat of b's runs) [rows_d, C/2, H, W]
  // (C = Ca + Cb). One copy straight into the next layer's inputs on the CPU (other devices
  // compose narrow, cat and shuffle_cat_pair). Layout as shuffle_cat.
  m.def("shuffle_regroup(Tensor[] a, Tensor[] b, int[] routes, int batch) -> Tensor[]");
  // Backward of shuffle_regroup: grads [grad_lo_0, grad_hi_0, ...] of its outputs, rows the
  // sources' R_i, split = Ca -> [grad_a_0, grad_b_0, ...]: a block's gradient is the sum, in
  // destination order, over the runs that took it (zero where none did).
  m.def("shuffle_regroup_backward(Tensor[] grads, int[] routes, int batch, int[] rows, "
        "int split) -> Tensor[]");
  // Depthwise conv (k x k, odd k, stride 1 or 2, padding k / 2, no bias) + BatchNorm without
  // affine, over `groups` equal row groups of x [R, C, H, W] with their own statistics.
  // training: batch statistics per group, returned as mean/var [G, C] (var biased);
  // eval: normalises with the given mean/var [G, C] (returned as copies).
  // y is channels-last [R, C, H', W']; it is xhat, which the backward reads in training.
  m.def("dwconv_bn(Tensor x, Tensor weight, Tensor mean, Tensor var, int stride, int groups, "
        "float eps, bool training) -> (Tensor y, Tensor mean, Tensor var)");
  // Gradients of dwconv_bn's y with respect to x and weight (statistics as in the forward).
  m.def("dwconv_bn_backward(Tensor grad_y, Tensor x, Tensor weight, Tensor y, Tensor var, "
        "int stride, int groups, float eps, bool training) -> (Tensor grad_x, Tensor grad_weight)");
  // 1x1 conv (weight [O, C, 1, 1]) + BatchNorm without affine (grouped as dwconv_bn) + ReLU.
  // Returns y = relu(xhat) channels-last, xhat (training; empty in eval), mean, var [G, O].
  m.def("pwconv_bn_relu(Tensor x, Tensor weight, Tensor mean, Tensor var, int groups, "
        "float eps, bool training) -> (Tensor y, Tensor xhat, Tensor mean, Tensor var)");
  // Gradients of pwconv_bn_relu's y with respect to x and weight; reads xhat in training and
  // y in eval.
  m.def("pwconv_bn_relu_backward(Tensor grad_y, Tensor x, Tensor weight, Tensor y, Tensor xhat, "
        "Tensor var, int groups, float eps, bool training) -> (Tensor grad_x, Tensor grad_weight)");
  // The classifier y [B, O] = x [B, C] weight^T (weight [O, C], no bias; float32 / float64),
  // and its gradients. CPU body only (csrc/cpu/block_cpu.cpp): on CUDA, cuBLAS's matmul is
  // what the Python side calls (fastshift.ops.linear).
  m.def("linear(Tensor x, Tensor weight) -> Tensor");
  m.def("linear_backward(Tensor grad_y, Tensor x, Tensor weight) -> (Tensor grad_x, "
        "Tensor grad_weight)");
  // The network's stem: a k x k conv (odd k, padding k / 2, stride, no bias) + BatchNorm
  // without affine + ReLU. training: batch statistics, returned as mean / var [O] (var biased),
  // and z, the raw conv output the backward reads; eval: normalises with the given mean / var
  // [O] (returned as copies; z empty). y and z are channels-last [B, O, H', W']. CPU body only
  // (csrc/cpu/stem_cpu.cpp): values independent of the thread count.
  m.def("stem_conv_bn_relu(Tensor x, Tensor weight, Tensor mean, Tensor var, int stride, "
        "float eps, bool training) -> (Tensor y, Tensor z, Tensor mean, Tensor var)");
  // The weight's gradient of stem_conv_bn_relu's y (x, the network's input, takes none).
  m.def("stem_conv_bn_relu_backward(Tensor grad_y, Tensor x, Tensor weight, Tensor y, "
        "Tensor z, Tensor mean, Tensor var, int stride, float eps, bool training) -> Tensor");
  // The same four ops with bodies written in Triton (fastshift/ops/triton), registered from
  // Python for CUDA tensors (and CPU tensors under TRITON_INTERPRET=1). Same contracts.
  m.def("dwconv_bn_triton(Tensor x, Tensor weight, Tensor mean, Tensor var, int stride, "
        "int groups, float eps, bool training) -> (Tensor y, Tensor mean, Tensor var)");
  m.def("dwconv_bn_backward_triton(Tensor grad_y, Tensor x, Tensor weight, Tensor y, Tensor var, "
        "int stride, int groups, float eps, bool training) -> (Tensor grad_x, Tensor grad_weight)");
  m.def("pwconv_bn_relu_triton(Tensor x, Tensor weight, Tensor mean, Tensor var, int groups, "
        "float eps, bool training) -> (Tensor y, Tensor xhat, Tensor mean, Tensor var)");
  m.def("pwconv_bn_relu_backward_triton(Tensor grad_y, Tensor x, Tensor weight, Tensor y, "
        "Tensor xhat, Tensor var, int groups, float eps, bool training) -> "
        "(Tensor grad_x, Tensor grad_weight)");
  // A branch of a choice block as one op: x through the layers in order, layers[i] = 0 for a
  // pwconv_bn_relu layer, 1 or 2 for a dwconv_bn layer of that stride, with weights[i] (same
  // groups, eps and training). Statistics side by side: mean/var [G, sum_i C_i], layer i's
  // [G, C_i] (C_i = weights[i].size(0)) after those of layers 0 .. i-1, in and out.
  // Returns y (the last layer's), saved (the outputs of layers 0 .. n-2, then the xhat of each
  // pwconv_bn_relu layer: in training; empty in eval) and the batch mean and var, all equal to
  // calling the layer ops in turn. Bodies: csrc/chain.cpp (through the layer ops).
  m.def("conv_bn_chain(Tensor x, Tensor[] weights, int[] layers, Tensor mean, Tensor var, "
        "int groups, float eps, bool training) -> (Tensor y, Tensor[] saved, Tensor mean, "
        "Tensor var)");
  // conv_bn_chain's y in eval (mean / var: the running statistics), for callers that keep
  // no autograd graph (fastshift.ops.conv_bn_chain under no_grad / inference_mode): nothing
  // else is returned, so the CPU body (csrc/cpu/block_cpu.cpp, the only one) runs the layers
  // chunk by chunk of images with the intermediate outputs in cache. Not differentiable.
  // With shuffle_with = a ([R, Ca, H', W']), the output is shuffle_cat(a, y): the unit's
  // split-ready output written from the chunks in cache.
  m.def("conv_bn_chain_eval(Tensor x, Tensor[] weights, int[] layers, Tensor mean, Tensor var, "
        "int groups, float eps, Tensor? shuffle_with=None) -> Tensor");
  // Gradients of conv_bn_chain's y with respect to x and every weight (the layer ops'
  // backwards in reverse order), from the forward's y, saved and var.
  m.def("conv_bn_chain_backward(Tensor grad_y, Tensor x, Tensor[] weights, int[] layers, "
        "Tensor y, Tensor[] saved, Tensor var, int groups, float eps, bool training) -> "
        "(Tensor grad_x, Tensor[] grad_weights)");
  // The same through the Triton layer ops.
  m.def("conv_bn_chain_triton(Tensor x, Tensor[] weights, int[] layers, Tensor mean, "
        "Tensor var, int groups, float eps, bool training) -> (Tensor y, Tensor[] saved, "
        "Tensor mean, Tensor var)");
  m.def("conv_bn_chain_backward_triton(Tensor grad_y, Tensor x, Tensor[] weights, int[] layers, "
        "Tensor y, Tensor[] saved, Tensor var, int groups, float eps, bool training) -> "
        "(Tensor grad_x, Tensor[] grad_weights)");
  // Enters (true) or leaves (false) a scope in which the CPU bodies keep each weight's packed
  // form across calls (per data pointer, layout and version); returns the scope depth. The
  // validation passes run inside one (fastshift.ops.frozen_weights).
  m.def("pack_cache(bool enter) -> int");
  // The CUDA toolkit version the extension was compiled with, or 0 for a CPU-only build.
  m.def("cuda_version() -> int");
  // The compute capabilities the CUDA bodies were compiled for (major * 10 + minor; 1000 +
  // that for PTX, which newer GPUs compile at load time); empty for a CPU-only build.
  m.def("cuda_archs() -> int[]");
  // The instruction-set level of the CPU bodies' kernels that run in this process (csrc/cpu/
  // multiversion.h): 4 (x86-64-v4: AVX-512), 3 (x86-64-v3: AVX2 + FMA) or 0 (generic).
  m.def("cpu_kernel_level() -> int");
}
