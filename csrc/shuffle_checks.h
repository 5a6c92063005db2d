// Host-side argument checks of the channel shuffle ops, shared by the CPU and CUDA bodies.
#pragma once

#include <ATen/ATen.h>

#include <vector>

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

inline void check_shuffle_cat(const at::Tensor& a, const at::Tensor& b) {
  TORCH_CHECK(a.dim() == 4 && b.dim() == 4, "shuffle_cat: a and b must be 4-D [B, C, H, W], got ",
              a.dim(), "-D and ", b.dim(), "-D");
  TORCH_CHECK(a.size(0) == b.size(0) && a.size(2) == b.size(2) && a.size(3) == b.size(3),
              "shuffle_cat: a and b must agree in batch and spatial sizes, got ", a.sizes(),
              " and ", b.sizes());
  TORCH_CHECK((a.size(1) + b.size(1)) % 2 == 0,
              "shuffle_cat: the channel count of cat(a, b) must be even, got ",
              a.size(1) + b.size(1));
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), "shuffle_cat: a and b must have the same dtype");
  TORCH_CHECK(a.device() == b.device(), "shuffle_cat: a and b must be on the same device");
}

inline void check_shuffle_cat_backward(const at::Tensor& grad, int64_t split) {
  TORCH_CHECK(grad.dim() == 4, "shuffle_cat_backward: grad must be 4-D, got ", grad.dim(), "-D");
  TORCH_CHECK(grad.size(1) % 2 == 0,
              "shuffle_cat_backward: the channel count of grad must be even, got ", grad.size(1));
  TORCH_CHECK(split >= 0 && split <= grad.size(1), "shuffle_cat_backward: split must be in [0, ",
              grad.size(1), "], got ", split);
}

inline void check_shuffle_cat_pair_backward(const at::Tensor& lo, const at::Tensor& hi,
                                            int64_t split) {
  TORCH_CHECK(lo.dim() == 4 && hi.dim() == 4, "shuffle_cat_pair_backward: grad_lo and grad_hi "
              "must be 4-D [B, C/2, H, W], got ", lo.dim(), "-D and ", hi.dim(), "-D");
  TORCH_CHECK(lo.sizes() == hi.sizes(), "shuffle_cat_pair_backward: grad_lo and grad_hi must "
              "have the same shape, got ", lo.sizes(), " and ", hi.sizes());
  TORCH_CHECK(lo.scalar_type() == hi.scalar_type() && lo.device() == hi.device(),
              "shuffle_cat_pair_backward: grad_lo and grad_hi must have the same dtype and "
              "device");
  TORCH_CHECK(split >= 0 && split <= 2 * lo.size(1), "shuffle_cat_pair_backward: split must "
              "be in [0, ", 2 * lo.size(1), "], got ", split);
}

// shuffle_regroup's routes: for each destination its run count n, then n triples (source,
// first row block, end row block) in blocks of `batch` rows. Parsed and checked against the
// sources' block counts; returns the destinations' runs.
struct RegroupRun {
  int64_t src, b0, b1;
};

inline std::vector<std::vector<RegroupRun>> parse_regroup_routes(
    const char* op, at::IntArrayRef routes, const std::vector<int64_t>& blocks) {
  std::vector<std::vector<RegroupRun>> dest;
  size_t k = 0;
  while (k < routes.size()) {
    const int64_t n = routes[k++];
    TORCH_CHECK(n >= 0 && k + 3 * size_t(n) <= routes.size(), op, ": routes must hold, per "
                "destination, a run count n and n triples (source, first block, end block); "
                "destination ", dest.size(), " is cut short");
    std::vector<RegroupRun> runs;
    for (int64_t r = 0; r < n; ++r, k += 3) {
      const int64_t i = routes[k], b0 = routes[k + 1], b1 = routes[k + 2];
      TORCH_CHECK(i >= 0 && i < int64_t(blocks.size()), op, ": run ", r, " of destination ",
                  dest.size(), " names source ", i, " of ", blocks.size());
      TORCH_CHECK(0 <= b0 && b0 < b1 && b1 <= blocks[i], op, ": run ", r, " of destination ",
                  dest.size(), " takes row blocks [", b0, ", ", b1, ") of source ", i,
                  ", which has ", blocks[i]);
      runs.push_back({i, b0, b1});
    }
    dest.push_back(std::move(runs));
  }
  return dest;
}

// The row blocks of each source (rows[i] / batch), checking that batch divides every count.
inline std::vector<int64_t> regroup_blocks(const char* op, at::IntArrayRef rows,
                                           int64_t batch) {
  TORCH_CHECK(batch > 0, op, ": batch must be positive, got ", batch);
  std::vector<int64_t> blocks;
  for (size_t i = 0; i < rows.size(); ++i) {
    TORCH_CHECK(rows[i] % batch == 0, op, ": source ", i, " has ", rows[i],
                " rows, not a multiple of batch ", batch);
    blocks.push_back(rows[i] / batch);
  }
  return blocks;
}

// Position in shuffle_cat's output of channel c of t = cat(a, b) (C channels): even channels
// fill the first half, odd ones the second.
#if defined(__CUDACC__)
__host__ __device__
#endif
inline int64_t shuffled_position(int64_t c, int64_t C) {
  return (c & 1) ? C / 2 + c / 2 : c / 2;
}

// The layout of the channel shuffle ops' outputs: channels-last when the (first) input is
// channels-last-like (the fused block path), else contiguous NCHW. The fake kernels in
// fastshift/ops/_registry.py follow the same rule (suggest_memory_format).
inline bool rows_last_layout(const at::Tensor& t) {
  return t.suggest_memory_format() == at::MemoryFormat::ChannelsLast;
}

// A new [N, C, H, W] tensor (N, H, W of like): channels-last when rows_last, else NCHW.
inline at::Tensor empty_in_layout(const at::Tensor& like, int64_t C, bool rows_last) {
  return at::empty({like.size(0), C, like.size(2), like.size(3)},
                   like.options().memory_format(rows_last ? at::MemoryFormat::ChannelsLast
                                                          : at::MemoryFormat::Contiguous));
}

// shuffle_cat's output layout: that of a (of b when a has no channels).
inline bool shuffle_cat_rows_last(const at::Tensor& a, const at::Tensor& b) {
  return rows_last_layout(a.size(1) > 0 ? a : b);
}

}  // namespace fastshift
