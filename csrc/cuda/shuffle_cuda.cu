// CUDA bodies of the channel shuffle ops: one thread per element, vector-free grid-stride copy.
// (channel_split / channel_interleave below, then shuffle_cat and its backward.) Channels-last
// tensors (the fused block path) take one thread per pixel and half channel instead.
//
// Element (b, c, i) of half tensor p (i indexes the H*W plane) is element (b, 2c + p, i) of the
// full tensor; the kernel walks the half tensors and gathers/scatters the full one.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../block_checks.h"
#include "../shuffle_checks.h"

namespace fastshift {
namespace {

constexpr int kThreads = 256;

// Blocks of kThreads for a grid-stride loop over n elements (at most 8 per 65535).
inline int64_t grid_blocks(int64_t n) {
  return std::min<int64_t>((n + kThreads - 1) / kThreads, 65535 * 8);
}

template <typename scalar_t, bool to_halves>
__global__ void shuffle_kernel(scalar_t* __restrict__ full, scalar_t* __restrict__ even,
                               scalar_t* __restrict__ odd, int64_t half_numel,
                               int64_t half_channels, int64_t plane) {
  for (int64_t idx = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; idx < half_numel;
       idx += (int64_t)blockDim.x * gridDim.x) {
    const int64_t i = idx % plane;
    const int64_t bc = idx / plane;  // b * half_channels + c
    const int64_t b = bc / half_channels;
    const int64_t c = bc % half_channels;
    const int64_t f = ((b * 2 * half_channels) + 2 * c) * plane + i;
    if (to_halves) {
      even[idx] = full[f];
      odd[idx] = full[f + plane];
    } else {
      full[f] = even[idx];
      full[f + plane] = odd[idx];
    }
  }
}

// Channels-last: pixel p's channels are a run (rows of [P, C]); half channel j of pixel p is
// channel 2j + parity. One thread per (p, j) moves both parities; full's pixels are sf apart,
// even's se, odd's so (each a dense channel run: a channel range of a channels-last tensor is
// read or written in place).
template <typename scalar_t, bool to_halves>
__global__ void shuffle_rows_kernel(scalar_t* __restrict__ full, scalar_t* __restrict__ even,
                                    scalar_t* __restrict__ odd, int64_t half_numel, int64_t half,
                                    int64_t sf, int64_t se, int64_t so) {
  for (int64_t idx = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; idx < half_numel;
       idx += (int64_t)blockDim.x * gridDim.x) {
    const int64_t p = idx / half, j = idx - p * half;
    scalar_t* f = full + p * sf + 2 * j;
    if (to_halves) {
      even[p * se + j] = f[0];
      odd[p * so + j] = f[1];
    } else {
      f[0] = even[p * se + j];
      f[1] = odd[p * so + j];
    }
  }
}

// shuffle_rows_kernel over the [P, 2h] / [P, h] pixel rows of full / even / odd (each with
// dense channels: strided_pixel_rows or a fresh channels-last tensor's pixel_rows).
template <bool to_halves>
void launch_rows(const at::Tensor& full, const at::Tensor& even, const at::Tensor& odd) {
  const int64_t half_numel = even.numel();
  if (half_numel == 0) return;
  const int64_t blocks = grid_blocks(half_numel);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, full.scalar_type(), "channel_shuffle",
                                  [&] {
                                    shuffle_rows_kernel<scalar_t, to_halves>
                                        <<<blocks, kThreads, 0, stream>>>(
                                            full.data_ptr<scalar_t>(), even.data_ptr<scalar_t>(),
                                            odd.data_ptr<scalar_t>(), half_numel, even.size(1),
                                            pixel_stride(full), pixel_stride(even),
                                            pixel_stride(odd));
                                  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <bool to_halves>
void launch(const at::Tensor& full, const at::Tensor& even, const at::Tensor& odd) {
  const int64_t half_numel = even.numel();
  if (half_numel == 0) return;
  const int64_t blocks = grid_blocks(half_numel);
  const int64_t plane = even.size(2) * even.size(3);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, full.scalar_type(), "channel_shuffle",
                                  [&] {
                                    shuffle_kernel<scalar_t, to_halves>
                                        <<<blocks, kThreads, 0, stream>>>(
                                            full.data_ptr<scalar_t>(), even.data_ptr<scalar_t>(),
                                            odd.data_ptr<scalar_t>(), half_numel, even.size(1),
                                            plane);
                                  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> channel_split_cuda(const at::Tensor& x_in) {
  check_channel_split(x_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  if (rows_last_layout(x_in)) {  // one pass over the pixel rows, x read in place
    at::Tensor even = empty_in_layout(x_in, x_in.size(1) / 2, true);
    at::Tensor odd = empty_in_layout(x_in, x_in.size(1) / 2, true);
    if (even.numel() > 0) {
      launch_rows<true>(strided_pixel_rows(x_in), pixel_rows(even), pixel_rows(odd));
    }
    return {even, odd};
  }
  const at::Tensor x = x_in.contiguous();
  at::Tensor even = empty_in_layout(x, x.size(1) / 2, false);
  at::Tensor odd = empty_in_layout(x, x.size(1) / 2, false);
  launch<true>(x, even, odd);
  return {even, odd};
}

at::Tensor channel_interleave_cuda(const at::Tensor& even_in, const at::Tensor& odd_in) {
  check_channel_interleave(even_in, odd_in);
  const c10::cuda::CUDAGuard guard(even_in.device());
  if (rows_last_layout(even_in)) {  // one pass, the halves read in place
    at::Tensor out = empty_in_layout(even_in, 2 * even_in.size(1), true);
    if (even_in.numel() > 0) {
      launch_rows<false>(pixel_rows(out), strided_pixel_rows(even_in),
                         strided_pixel_rows(odd_in));
    }
    return out;
  }
  const at::Tensor even = even_in.contiguous();
  const at::Tensor odd = odd_in.contiguous();
  at::Tensor out = empty_in_layout(even, 2 * even.size(1), false);
  launch<false>(out, even, odd);
  return out;
}

// shuffle_cat / shuffle_cat_backward: one thread per element of the "t side", the virtual
// t = cat(a, b) [N, C, H, W] (channel c: a[c] for c < Ca, else b[c - Ca]), which pairs with
// element shuffled_position(c) of the "out side". The forward gathers t into out, the backward
// gathers out (the gradient) into a and b. Threads walk (n, h, w, c) with c fastest when the
// tensors are channels-last (coalesced channel runs), else (n, c, h, w).
struct Strides4 {
  int64_t s[4];
};

inline Strides4 strides_of(const at::Tensor& t) {
  return {{t.stride(0), t.stride(1), t.stride(2), t.stride(3)}};
}

template <typename scalar_t, bool backward>
__global__ void shuffle_cat_kernel(scalar_t* __restrict__ out, Strides4 os,
                                   scalar_t* __restrict__ a, Strides4 as,
                                   scalar_t* __restrict__ b, Strides4 bs, int64_t numel,
                                   int64_t C, int64_t Ca, int64_t H, int64_t W, bool pixels) {
  for (int64_t idx = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; idx < numel;
       idx += (int64_t)blockDim.x * gridDim.x) {
    int64_t n, c, h, w;
    if (pixels) {
      c = idx % C;
      const int64_t p = idx / C;
      w = p % W;
      h = (p / W) % H;
      n = p / (W * H);
    } else {
      w = idx % W;
      h = (idx / W) % H;
      c = (idx / (W * H)) % C;
      n = idx / (W * H * C);
    }
    const int64_t j = shuffled_position(c, C);
    const int64_t o = n * os.s[0] + j * os.s[1] + h * os.s[2] + w * os.s[3];
    scalar_t* t = c < Ca ? a + n * as.s[0] + c * as.s[1] + h * as.s[2] + w * as.s[3]
                         : b + n * bs.s[0] + (c - Ca) * bs.s[1] + h * bs.s[2] + w * bs.s[3];
    if (backward) {
      *t = out[o];
    } else {
      out[o] = *t;
    }
  }
}

template <bool backward>
void launch_shuffle_cat(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b,
                        bool pixels) {
  const int64_t C = out.size(1), Ca = a.size(1), H = out.size(2), W = out.size(3);
  const int64_t numel = out.numel();
  if (numel == 0) return;
  const int64_t blocks = grid_blocks(numel);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "shuffle_cat",
                                  [&] {
                                    shuffle_cat_kernel<scalar_t, backward>
                                        <<<blocks, kThreads, 0, stream>>>(
                                            out.data_ptr<scalar_t>(), strides_of(out),
                                            a.data_ptr<scalar_t>(), strides_of(a),
                                            b.data_ptr<scalar_t>(), strides_of(b), numel, C, Ca,
                                            H, W, pixels);
                                  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor shuffle_cat_cuda(const at::Tensor& a, const at::Tensor& b) {
  check_shuffle_cat(a, b);
  const c10::cuda::CUDAGuard guard(a.device());
  const bool pixels = shuffle_cat_rows_last(a, b);
  at::Tensor out = empty_in_layout(a, a.size(1) + b.size(1), pixels);
  launch_shuffle_cat<false>(out, a, b, pixels);
  return out;
}

std::tuple<at::Tensor, at::Tensor> shuffle_cat_backward_cuda(const at::Tensor& grad,
                                                             int64_t split) {
  check_shuffle_cat_backward(grad, split);
  const c10::cuda::CUDAGuard guard(grad.device());
  const bool pixels = rows_last_layout(grad);
  at::Tensor ga = empty_in_layout(grad, split, pixels);
  at::Tensor gb = empty_in_layout(grad, grad.size(1) - split, pixels);
  launch_shuffle_cat<true>(grad, ga, gb, pixels);
  return {ga, gb};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastshift, CUDA, m) {
  m.impl("shuffle_cat", &shuffle_cat_cuda);
  m.impl("shuffle_cat_backward", &shuffle_cat_backward_cuda);
  m.impl("channel_split", &channel_split_cuda);
  m.impl("channel_interleave", &channel_interleave_cuda);
}

}  // namespace fastshift
