// Sinkhorn-Knopp half-iterations on the GPU: see csrc/kernels_api.h for the functions.
//
// All reductions are online base-2 log-sum-exps: a running (max, sum) pair rescaled when
// the max grows, so every exponent is <= 0 and one exp2 is computed per element.
// - col_lse: a thread per column over a slice of rows (threads of a warp read consecutive
//   columns of one row: coalesced when the column stride is 1), partials (max, sum) per
//   slice in a workspace, merged by a second kernel. Slices are chosen by the caller so
//   that about four blocks run per SM.
// - row_lse / write: a block per row, a block-wide merge of the threads' pairs; the write
//   kernel then sweeps the row again (from L2) and stores Q.
// Memory traffic: col_lse and row_lse read the scores once each; write reads them twice
// (the second time mostly from L2) and writes 4 bytes per element.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "kernels_api.h"

namespace fastssl {
namespace {

constexpr int COLUMN_THREADS = 256;
constexpr int ROW_THREADS = 256;

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }

// (m, s) <- the pair for the union of (m, s) and (other_m, other_s); -inf maxima are empty.
__device__ __forceinline__ void merge_pair(float& m, float& s, float other_m, float other_s) {
  const float top = fmaxf(m, other_m);
  if (top == -INFINITY) return;
  s = s * exp2f(m - top) + other_s * exp2f(other_m - top);
  m = top;
}

__device__ __forceinline__ void add_value(float& m, float& s, float v) {
  if (v > m) {
    s = s * exp2f(m - v) + 1.0f;
    m = v;
  } else if (v != -INFINITY) {  // -inf scores add nothing; NaN lands here and makes s NaN
    s += exp2f(v - m);
  }
}

// Grid: (problems x column blocks, splits). The problems share axis x with the column
// blocks (limit 2^31 - 1) rather than taking axis z, whose limit is 65,535.
template <typename T>
__global__ void col_lse_partial_kernel(ScoresView s, float scale, const float* __restrict__ lse_b,
                                       float* __restrict__ workspace, int64_t splits, int64_t column_blocks) {
  const int64_t p = blockIdx.x / column_blocks;
  const int64_t k = (blockIdx.x % column_blocks) * COLUMN_THREADS + threadIdx.x;
  const int64_t split = blockIdx.y;
  if (k >= s.cols) return;
  const int64_t rows_per_split = (s.rows + splits - 1) / splits;
  const int64_t begin = split * rows_per_split, end = min(s.rows, begin + rows_per_split);
  const T* column = reinterpret_cast<const T*>(s.data) + p * s.stride_problem + k * s.stride_col;
  const float* shift = lse_b + p * s.rows;
  float m = -INFINITY, total = 0.0f;
  for (int64_t b = begin; b < end; ++b) add_value(m, total, to_float(column[b * s.stride_row]) * scale - shift[b]);
  const int64_t slot = (p * splits + split) * s.cols + k;
  const int64_t half = s.problems * splits * s.cols;
  workspace[slot] = m;
  workspace[half + slot] = total;
}

__global__ void col_lse_merge_kernel(int64_t problems, int64_t cols, int64_t splits,
                                     const float* __restrict__ workspace, float* __restrict__ lse_k) {
  const int64_t index = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (index >= problems * cols) return;
  const int64_t p = index / cols, k = index % cols, half = problems * splits * cols;
  float m = -INFINITY, total = 0.0f;
  for (int64_t split = 0; split < splits; ++split) {
    const int64_t slot = (p * splits + split) * cols + k;
    merge_pair(m, total, workspace[slot], workspace[half + slot]);
  }
  lse_k[index] = m + log2f(total);
}

// The block's merged (max, sum) pair, returned to every thread.
__device__ float block_lse(float m, float total) {
  __shared__ float shared_m[ROW_THREADS / 32], shared_s[ROW_THREADS / 32];
  for (int offset = 16; offset > 0; offset /= 2) {
    merge_pair(m, total, __shfl_xor_sync(0xffffffff, m, offset), __shfl_xor_sync(0xffffffff, total, offset));
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) {
    shared_m[warp] = m;
    shared_s[warp] = total;
  }
  __syncthreads();
  m = lane < ROW_THREADS / 32 ? shared_m[lane] : -INFINITY;
  total = lane < ROW_THREADS / 32 ? shared_s[lane] : 0.0f;
  for (int offset = 16; offset > 0; offset /= 2) {
    merge_pair(m, total, __shfl_xor_sync(0xffffffff, m, offset), __shfl_xor_sync(0xffffffff, total, offset));
  }
  return m + log2f(total);
}

template <typename T, bool WRITE>
__global__ void row_lse_kernel(ScoresView s, float scale, const float* __restrict__ lse_k, float* __restrict__ lse_b,
                               float* __restrict__ q) {
  const int64_t row_index = blockIdx.x, p = row_index / s.rows, b = row_index % s.rows;
  const T* row = reinterpret_cast<const T*>(s.data) + p * s.stride_problem + b * s.stride_row;
  const float* shift = lse_k + p * s.cols;
  float m = -INFINITY, total = 0.0f;
  for (int64_t k = threadIdx.x; k < s.cols; k += ROW_THREADS) {
    add_value(m, total, to_float(row[k * s.stride_col]) * scale - shift[k]);
  }
  const float lse = block_lse(m, total);
  if (threadIdx.x == 0) lse_b[row_index] = lse;
  if (WRITE) {
    float* out = q + row_index * s.cols;
    for (int64_t k = threadIdx.x; k < s.cols; k += ROW_THREADS) {
      out[k] = exp2f(to_float(row[k * s.stride_col]) * scale - shift[k] - lse);
    }
  }
}

void check_launch(const char* what) {
  const cudaError_t error = cudaGetLastError();
  if (error != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(error));
}

template <typename Fn>
void dispatch_cuda_dtype(int dtype, Fn&& fn) {
  switch (dtype) {
    case 0: fn(static_cast<const float*>(nullptr)); break;
    case 1: fn(static_cast<const __nv_bfloat16*>(nullptr)); break;
    case 2: fn(static_cast<const __half*>(nullptr)); break;
    default: throw std::invalid_argument("fastssl._C: unsupported dtype code");
  }
}

template <bool WRITE>
void launch_rows(const ScoresView& s, float scale, uintptr_t lse_k, uintptr_t lse_b, uintptr_t q, uintptr_t stream) {
  dispatch_cuda_dtype(s.dtype, [&](auto tag) {
    using T = std::remove_const_t<std::remove_pointer_t<decltype(tag)>>;
    row_lse_kernel<T, WRITE><<<s.problems * s.rows, ROW_THREADS, 0, reinterpret_cast<cudaStream_t>(stream)>>>(
        s, scale, reinterpret_cast<const float*>(lse_k), reinterpret_cast<float*>(lse_b),
        reinterpret_cast<float*>(q));
  });
  check_launch(WRITE ? "sinkhorn_write_cuda" : "sinkhorn_row_lse_cuda");
}

}  // namespace

void sinkhorn_col_lse_cuda(const ScoresView& s, float scale, uintptr_t lse_b, uintptr_t lse_k, uintptr_t workspace,
                           int64_t splits, uintptr_t stream) {
  const auto cuda_stream = reinterpret_cast<cudaStream_t>(stream);
  dispatch_cuda_dtype(s.dtype, [&](auto tag) {
    using T = std::remove_const_t<std::remove_pointer_t<decltype(tag)>>;
    const int64_t column_blocks = (s.cols + COLUMN_THREADS - 1) / COLUMN_THREADS;
    const dim3 grid(s.problems * column_blocks, splits);
    col_lse_partial_kernel<T><<<grid, COLUMN_THREADS, 0, cuda_stream>>>(
        s, scale, reinterpret_cast<const float*>(lse_b), reinterpret_cast<float*>(workspace), splits, column_blocks);
  });
  check_launch("sinkhorn_col_lse_cuda (partials)");
  const int64_t outputs = s.problems * s.cols;
  col_lse_merge_kernel<<<(outputs + 255) / 256, 256, 0, cuda_stream>>>(
      s.problems, s.cols, splits, reinterpret_cast<const float*>(workspace), reinterpret_cast<float*>(lse_k));
  check_launch("sinkhorn_col_lse_cuda (merge)");
}

void sinkhorn_row_lse_cuda(const ScoresView& s, float scale, uintptr_t lse_k, uintptr_t lse_b, uintptr_t stream) {
  launch_rows<false>(s, scale, lse_k, lse_b, 0, stream);
}

void sinkhorn_write_cuda(const ScoresView& s, float scale, uintptr_t lse_k, uintptr_t lse_b, uintptr_t q,
                         uintptr_t stream) {
  launch_rows<true>(s, scale, lse_k, lse_b, q, stream);
}

}  // namespace fastssl
