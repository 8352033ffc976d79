// Warp / block reductions for the CUDA kernels.
#pragma once

#include <cuda_runtime.h>

namespace ckpt_ops {
namespace cuda {

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Sum over the whole block (blockDim.x a multiple of 32, at most 1024); every
// thread receives the result. `smem` holds 32 values and may be reused by the
// next call (the leading __syncthreads protects it).
template <typename T>
__device__ __forceinline__ T block_sum(T v, T* smem) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int nwarps = blockDim.x >> 5;
  v = warp_sum(v);
  __syncthreads();
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  if (warp == 0) {
    T w = lane < nwarps ? smem[lane] : T(0);
    w = warp_sum(w);
    if (lane == 0) smem[0] = w;
  }
  __syncthreads();
  return smem[0];
}

// Threads per block for a per-row kernel over N features: about 4 elements a
// thread, a multiple of 32, between 32 and 1024.
inline int row_threads(int64_t n) {
  int threads = 32;
  while (threads < 1024 && threads * 4 < n) threads *= 2;
  return threads;
}

}  // namespace cuda
}  // namespace ckpt_ops
