// CPU bodies of the channel shuffle ops: plane copies spread over at::parallel_for.
//
// With x contiguous [B, C, H, W], channel 2c + p of image b is the plane starting at
// ((b * C) + 2c + p) * H * W; it goes to plane (b * C/2 + c) of output p (p = 0 even, 1 odd).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>

#include "../shuffle_checks.h"

namespace fastshift {
namespace {

// Copies plane pairs: for every (b, c) of the half tensors, plane 2c + p of the full tensor
// <-> plane c of half tensor p. to_halves selects the direction.
template <bool to_halves>
void copy_planes(char* full, char* even, char* odd, int64_t batch, int64_t half_channels,
                 int64_t plane_bytes) {
  const int64_t rows = batch * half_channels;
  at::parallel_for(0, rows, /*grain_size=*/16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      char* f = full + 2 * r * plane_bytes;  // rows are (b, c); 2r = b*C + 2c
      char* e = even + r * plane_bytes;
      char* o = odd + r * plane_bytes;
      if (to_halves) {
        std::memcpy(e, f, plane_bytes);
        std::memcpy(o, f + plane_bytes, plane_bytes);
      } else {
        std::memcpy(f, e, plane_bytes);
        std::memcpy(f + plane_bytes, o, plane_bytes);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> channel_split_cpu(const at::Tensor& x_in) {
  check_channel_split(x_in);
  const at::Tensor x = x_in.contiguous();
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  at::Tensor even = at::empty({B, C / 2, H, W}, x.options());
  at::Tensor odd = at::empty({B, C / 2, H, W}, x.options());
  if (x.numel() == 0) return {even, odd};
  copy_planes<true>(static_cast<char*>(x.data_ptr()), static_cast<char*>(even.data_ptr()),
                    static_cast<char*>(odd.data_ptr()), B, C / 2, H * W * x.element_size());
  return {even, odd};
}

at::Tensor channel_interleave_cpu(const at::Tensor& even_in, const at::Tensor& odd_in) {
  check_channel_interleave(even_in, odd_in);
  const at::Tensor even = even_in.contiguous();
  const at::Tensor odd = odd_in.contiguous();
  const int64_t B = even.size(0), Ch = even.size(1), H = even.size(2), W = even.size(3);
  at::Tensor out = at::empty({B, 2 * Ch, H, W}, even.options());
  if (out.numel() == 0) return out;
  copy_planes<false>(static_cast<char*>(out.data_ptr()), static_cast<char*>(even.data_ptr()),
                     static_cast<char*>(odd.data_ptr()), B, Ch, H * W * even.element_size());
  return out;
}

int64_t cuda_version() {
#ifdef FASTSHIFT_WITH_CUDA
  return FASTSHIFT_CUDA_VERSION;
#else
  return 0;
#endif
}

}  // namespace

TORCH_LIBRARY_IMPL(fastshift, CPU, m) {
  m.impl("channel_split", &channel_split_cpu);
  m.impl("channel_interleave", &channel_interleave_cpu);
}

TORCH_LIBRARY_IMPL(fastshift, CompositeExplicitAutograd, m) {
  m.impl("cuda_version", &cuda_version);
}

}  // namespace fastshift
