// CPU bodies of the channel shuffle ops: plane copies spread over at::parallel_for.
//
// With x contiguous [B, C, H, W], channel 2c + p of image b is the plane starting at
// ((b * C) + 2c + p) * H * W; it goes to plane (b * C/2 + c) of output p (p = 0 even, 1 odd).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>
#include <vector>

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

// Channels-last layout: per pixel, channel 2c + p of the full tensor <-> channel c of half p.
// Any strides are read (the halves may be views, e.g. slices of a concatenated gradient).
template <typename T, bool to_halves>
void shuffle_pixels(T* full, at::IntArrayRef fs, T* even, at::IntArrayRef es, T* odd,
                    at::IntArrayRef os, int64_t N, int64_t half_channels, int64_t H, int64_t W) {
  at::parallel_for(0, N * H * W, /*grain_size=*/64, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const int64_t w = p % W, h = (p / W) % H, n = p / (W * H);
      T* f = full + n * fs[0] + h * fs[2] + w * fs[3];
      T* e = even + n * es[0] + h * es[2] + w * es[3];
      T* o = odd + n * os[0] + h * os[2] + w * os[3];
      for (int64_t c = 0; c < half_channels; ++c) {
        if (to_halves) {
          e[c * es[1]] = f[2 * c * fs[1]];
          o[c * os[1]] = f[(2 * c + 1) * fs[1]];
        } else {
          f[2 * c * fs[1]] = e[c * es[1]];
          f[(2 * c + 1) * fs[1]] = o[c * os[1]];
        }
      }
    }
  });
}

template <bool to_halves>
void shuffle_rows_last(const at::Tensor& full, const at::Tensor& even, const at::Tensor& odd) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, full.scalar_type(), "channel_shuffle",
                                  [&] {
    shuffle_pixels<scalar_t, to_halves>(full.data_ptr<scalar_t>(), full.strides(),
                                        even.data_ptr<scalar_t>(), even.strides(),
                                        odd.data_ptr<scalar_t>(), odd.strides(), even.size(0),
                                        even.size(1), even.size(2), even.size(3));
  });
}

std::tuple<at::Tensor, at::Tensor> channel_split_cpu(const at::Tensor& x_in) {
  check_channel_split(x_in);
  if (rows_last_layout(x_in)) {
    const auto cl = at::MemoryFormat::ChannelsLast;
    const auto opts = x_in.options().memory_format(cl);
    const std::vector<int64_t> sizes{x_in.size(0), x_in.size(1) / 2, x_in.size(2), x_in.size(3)};
    at::Tensor even = at::empty(sizes, opts), odd = at::empty(sizes, opts);
    if (x_in.numel() > 0) shuffle_rows_last<true>(x_in, even, odd);
    return {even, odd};
  }
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
  if (rows_last_layout(even_in)) {
    at::Tensor out = at::empty({even_in.size(0), 2 * even_in.size(1), even_in.size(2),
                                even_in.size(3)},
                               even_in.options().memory_format(at::MemoryFormat::ChannelsLast));
    if (out.numel() > 0) shuffle_rows_last<false>(out, even_in, odd_in);
    return out;
  }
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
