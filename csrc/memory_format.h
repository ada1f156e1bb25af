// The layout every op of this extension computes in and returns, shared by the CPU and CUDA files
// (and mirrored by jsigr_fast/ops.py's _bn_memory_format for the fake kernels): the tensor's own
// layout when it is dense contiguous or channels-last(3d) — then each sample (and, for batch norm,
// each channel's rows) is a block the kernels can index directly — else a contiguous copy.
#pragma once

#include <ATen/core/Tensor.h>

namespace jsigr_fast {

inline at::MemoryFormat dense_memory_format(const at::Tensor& t) {
  if (t.is_contiguous()) return at::MemoryFormat::Contiguous;
  if (t.dim() == 4 && t.is_contiguous(at::MemoryFormat::ChannelsLast)) return at::MemoryFormat::ChannelsLast;
  if (t.dim() == 5 && t.is_contiguous(at::MemoryFormat::ChannelsLast3d)) return at::MemoryFormat::ChannelsLast3d;
  return at::MemoryFormat::Contiguous;
}

}  // namespace jsigr_fast
