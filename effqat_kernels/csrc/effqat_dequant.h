#pragma once
#include <ATen/ATen.h>

namespace effqat {
// Writes (W_int - z) * s into out [N, K] from packed int32 [ceil(K / (32 / bits)), N].
void dequant_into(const at::Tensor& packed, const at::Tensor& zeros, const at::Tensor& scales,
                  at::Tensor& out, int64_t bits, int64_t group_size);
}  // namespace effqat
