// Entry points of fastssl._C. Pointers are addresses passed from Python (tensor.data_ptr());
// shapes and strides are in elements; tensors are checked in Python before any call.
#pragma once

#include <cstdint>

namespace fastssl {

// Sinkhorn-Knopp in base 2, on P problems of (B, K) scores x = scores * scale:
//   col_lse:  lse_k[p, k] = log2 sum_b 2^(x[p, b, k] - lse_b[p, b])
//   row_lse:  lse_b[p, b] = log2 sum_k 2^(x[p, b, k] - lse_k[p, k])
//   write:    the row_lse above, then q[p, b, k] = 2^(x[p, b, k] - lse_k[p, k] - lse_b[p, b])
// lse_b, lse_k, q are contiguous float32; scores has strides (sp, sb, sk) and a dtype code.
struct ScoresView {
  uintptr_t data;
  int dtype;
  int64_t problems, rows, cols;
  int64_t stride_problem, stride_row, stride_col;
};

// One process only: the whole algorithm in the linear domain (one exp2 per element, then
// multiply-adds), writing Q and lse_b, when every problem's exponents span less than 100
// (float32 keeps full relative precision there). Returns false, writing nothing usable,
// when they do not (or hold NaN/+inf): the caller then runs the log-domain half-iterations.
bool sinkhorn_linear_cpu(const ScoresView& scores, float scale, int n_iters, uintptr_t q, uintptr_t lse_b);
void sinkhorn_col_lse_cpu(const ScoresView& scores, float scale, uintptr_t lse_b, uintptr_t lse_k);
void sinkhorn_row_lse_cpu(const ScoresView& scores, float scale, uintptr_t lse_k, uintptr_t lse_b);
void sinkhorn_write_cpu(const ScoresView& scores, float scale, uintptr_t lse_k, uintptr_t lse_b, uintptr_t q);

#ifdef FASTSSL_WITH_CUDA
// The same on the GPU, on the caller's stream. col_lse reduces rows in `splits` slices into
// the float32 workspace (2 * P * splits * K floats), then merges them.
void sinkhorn_col_lse_cuda(const ScoresView& scores, float scale, uintptr_t lse_b, uintptr_t lse_k,
                           uintptr_t workspace, int64_t splits, uintptr_t stream);
void sinkhorn_row_lse_cuda(const ScoresView& scores, float scale, uintptr_t lse_k, uintptr_t lse_b,
                           uintptr_t stream);
void sinkhorn_write_cuda(const ScoresView& scores, float scale, uintptr_t lse_k, uintptr_t lse_b, uintptr_t q,
                         uintptr_t stream);
#endif

}  // namespace fastssl
