// effqat CUDA dequant kernel: packed int32 W_int (see kernels/packing.py) -> (W_int - z) * s.
//
// packed : int32 [Kp = ceil(K / VPW), N], VPW = 32 / BITS values per word along K, LSB first
//          (3-bit: 10 per word, top 2 bits unused).
// zeros  : float32 [N, n_groups]   (the Python wrapper casts uint8 / trained zeros)
// scales : float32 [N, n_groups]
// out    : T [N, K] (nn.Linear orientation), T in {half, bfloat16, float}
//
// One block handles a tile of TILE_W packed rows x TILE_N outputs: coalesced int32 loads along N
// into shared memory, then each thread expands one word into VPW contiguous outputs of one row.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "effqat_dequant.h"

namespace effqat {
namespace {

constexpr int TILE_N = 32;
constexpr int TILE_W = 32;
constexpr int ROWS = 8;  // blockDim.y

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

template <typename T, int BITS>
__global__ void dequant_kernel(const int32_t* __restrict__ packed, const float* __restrict__ zeros,
                               const float* __restrict__ scales, T* __restrict__ out, int N, int K,
                               int Kp, int gs, int n_groups) {
  constexpr int VPW = 32 / BITS;
  constexpr uint32_t MASK = (1u << BITS) - 1u;
  __shared__ uint32_t tile[TILE_W][TILE_N + 1];
  const int n0 = blockIdx.x * TILE_N;
  const int w0 = blockIdx.y * TILE_W;
  // load: threadIdx.x walks N (coalesced), threadIdx.y walks packed rows
  for (int r = threadIdx.y; r < TILE_W; r += ROWS) {
    const int w = w0 + r, n = n0 + threadIdx.x;
    tile[r][threadIdx.x] = (w < Kp && n < N) ? static_cast<uint32_t>(packed[(int64_t)w * N + n]) : 0u;
  }
  __syncthreads();
  // store: threadIdx.x walks packed words of one output row -> VPW contiguous values each
  for (int c = threadIdx.y; c < TILE_N; c += ROWS) {
    const int n = n0 + c, w = w0 + threadIdx.x;
    if (n >= N || w >= Kp) continue;
    const uint32_t word = tile[threadIdx.x][c];
    const int kbase = w * VPW;
    const float* zrow = zeros + (int64_t)n * n_groups;
    const float* srow = scales + (int64_t)n * n_groups;
    T* orow = out + (int64_t)n * K;
#pragma unroll
    for (int j = 0; j < VPW; ++j) {
      const int k = kbase + j;
      if (k < K) {
        const int g = k / gs;
        const float q = static_cast<float>((word >> (BITS * j)) & MASK);
        orow[k] = from_float<T>((q - zrow[g]) * srow[g]);
      }
    }
  }
}

template <typename T>
void launch(const at::Tensor& packed, const at::Tensor& zeros, const at::Tensor& scales,
            at::Tensor& out, int bits, int gs, cudaStream_t stream) {
  const int Kp = packed.size(0), N = packed.size(1), K = out.size(1);
  const int n_groups = zeros.size(1);
  dim3 block(TILE_N, ROWS);
  dim3 grid((N + TILE_N - 1) / TILE_N, (Kp + TILE_W - 1) / TILE_W);
  const int32_t* p = packed.data_ptr<int32_t>();
  const float* z = zeros.data_ptr<float>();
  const float* s = scales.data_ptr<float>();
  T* o = reinterpret_cast<T*>(out.data_ptr());
  switch (bits) {
    case 2: dequant_kernel<T, 2><<<grid, block, 0, stream>>>(p, z, s, o, N, K, Kp, gs, n_groups); break;
    case 3: dequant_kernel<T, 3><<<grid, block, 0, stream>>>(p, z, s, o, N, K, Kp, gs, n_groups); break;
    case 4: dequant_kernel<T, 4><<<grid, block, 0, stream>>>(p, z, s, o, N, K, Kp, gs, n_groups); break;
    case 8: dequant_kernel<T, 8><<<grid, block, 0, stream>>>(p, z, s, o, N, K, Kp, gs, n_groups); break;
    default: TORCH_CHECK(false, "effqat dequant: unsupported bits ", bits);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void dequant_into(const at::Tensor& packed, const at::Tensor& zeros, const at::Tensor& scales,
                  at::Tensor& out, int64_t bits, int64_t group_size) {
  TORCH_CHECK(packed.is_cuda() && zeros.is_cuda() && scales.is_cuda() && out.is_cuda(),
              "effqat dequant: all tensors must be on CUDA");
  TORCH_CHECK(packed.scalar_type() == at::kInt && packed.dim() == 2 && packed.is_contiguous(),
              "packed must be contiguous int32 [Kp, N]");
  TORCH_CHECK(zeros.scalar_type() == at::kFloat && scales.scalar_type() == at::kFloat &&
                  zeros.is_contiguous() && scales.is_contiguous(),
              "zeros / scales must be contiguous float32 [N, n_groups]");
  TORCH_CHECK(out.dim() == 2 && out.is_contiguous() && out.size(0) == packed.size(1),
              "out must be contiguous [N, K]");
  const int vpw = 32 / static_cast<int>(bits);
  TORCH_CHECK((out.size(1) + vpw - 1) / vpw == packed.size(0), "packed rows do not match K");
  TORCH_CHECK(group_size > 0, "group_size must be positive (pass K for one group)");
  TORCH_CHECK(zeros.size(0) == out.size(0) && scales.sizes() == zeros.sizes() &&
                  zeros.size(1) == (out.size(1) + group_size - 1) / group_size,
              "zeros / scales shape does not match [N, ceil(K / group_size)]");
  c10::cuda::CUDAGuard guard(packed.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int gs = static_cast<int>(group_size), b = static_cast<int>(bits);
  switch (out.scalar_type()) {
    case at::kHalf: launch<__half>(packed, zeros, scales, out, b, gs, stream); break;
    case at::kBFloat16: launch<__nv_bfloat16>(packed, zeros, scales, out, b, gs, stream); break;
    case at::kFloat: launch<float>(packed, zeros, scales, out, b, gs, stream); break;
    default: TORCH_CHECK(false, "effqat dequant: out must be fp16, bf16 or fp32");
  }
}

}  // namespace effqat
