// CUDA bodies of the channel shuffle ops: one thread per element, vector-free grid-stride copy.
//
// Element (b, c, i) of half tensor p (i indexes the H*W plane) is element (b, 2c + p, i) of the
// full tensor; the kernel walks the half tensors and gathers/scatters the full one.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../shuffle_checks.h"

namespace fastshift {
namespace {

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

template <bool to_halves>
void launch(const at::Tensor& full, const at::Tensor& even, const at::Tensor& odd) {
  const int64_t half_numel = even.numel();
  if (half_numel == 0) return;
  const int threads = 256;
  const int64_t blocks = std::min<int64_t>((half_numel + threads - 1) / threads, 65535 * 8);
  const int64_t plane = even.size(2) * even.size(3);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, full.scalar_type(), "channel_shuffle",
                                  [&] {
                                    shuffle_kernel<scalar_t, to_halves>
                                        <<<blocks, threads, 0, stream>>>(
                                            full.data_ptr<scalar_t>(), even.data_ptr<scalar_t>(),
                                            odd.data_ptr<scalar_t>(), half_numel, even.size(1),
                                            plane);
                                  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> channel_split_cuda(const at::Tensor& x_in) {
  check_channel_split(x_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  if (rows_last_layout(x_in)) {  // strided copies of the channel-sliced views (ATen)
    const auto cl = at::MemoryFormat::ChannelsLast;
    return {x_in.slice(1, 0, x_in.size(1), 2).contiguous(cl),
            x_in.slice(1, 1, x_in.size(1), 2).contiguous(cl)};
  }
  const at::Tensor x = x_in.contiguous();
  const auto sizes = std::vector<int64_t>{x.size(0), x.size(1) / 2, x.size(2), x.size(3)};
  at::Tensor even = at::empty(sizes, x.options());
  at::Tensor odd = at::empty(sizes, x.options());
  launch<true>(x, even, odd);
  return {even, odd};
}

at::Tensor channel_interleave_cuda(const at::Tensor& even_in, const at::Tensor& odd_in) {
  check_channel_interleave(even_in, odd_in);
  const c10::cuda::CUDAGuard guard(even_in.device());
  if (rows_last_layout(even_in)) {
    at::Tensor out = at::empty({even_in.size(0), 2 * even_in.size(1), even_in.size(2),
                                even_in.size(3)},
                               even_in.options().memory_format(at::MemoryFormat::ChannelsLast));
    out.slice(1, 0, out.size(1), 2).copy_(even_in);
    out.slice(1, 1, out.size(1), 2).copy_(odd_in);
    return out;
  }
  const at::Tensor even = even_in.contiguous();
  const at::Tensor odd = odd_in.contiguous();
  at::Tensor out =
      at::empty({even.size(0), 2 * even.size(1), even.size(2), even.size(3)}, even.options());
  launch<false>(out, even, odd);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastshift, CUDA, m) {
  m.impl("channel_split", &channel_split_cuda);
  m.impl("channel_interleave", &channel_interleave_cuda);
}

}  // namespace fastshift
