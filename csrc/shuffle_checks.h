// Host-side argument checks of the channel shuffle ops, shared by the CPU and CUDA bodies.
#pragma once

#include <ATen/ATen.h>

namespace fastshift {

inline void check_channel_split(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 4, "channel_split: x must be 4-D [B, C, H, W], got ", x.dim(), "-D");
  TORCH_CHECK(x.size(1) % 2 == 0, "channel_split: the channel count of x must be even, got ",
              x.size(1));
}

inline void check_channel_interleave(const at::Tensor& even, const at::Tensor& odd) {
  TORCH_CHECK(even.dim() == 4, "channel_interleave: even must be 4-D, got ", even.dim(), "-D");
  TORCH_CHECK(even.sizes() == odd.sizes(),
              "channel_interleave: even and odd must have the same shape, got ", even.sizes(),
              " and ", odd.sizes());
  TORCH_CHECK(even.scalar_type() == odd.scalar_type(),
              "channel_interleave: even and odd must have the same dtype");
  TORCH_CHECK(even.device() == odd.device(),
              "channel_interleave: even and odd must be on the same device");
}

// The layout of the channel shuffle ops' outputs: channels-last when the (first) input is
// channels-last-like (the fused block path), else contiguous NCHW. The fake kernels in
// fastshift/ops/_registry.py follow the same rule (suggest_memory_format).
inline bool rows_last_layout(const at::Tensor& t) {
  return t.suggest_memory_format() == at::MemoryFormat::ChannelsLast;
}

}  // namespace fastshift
