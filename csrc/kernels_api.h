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

// Differentiable sorting networks (diffsort) and the fused NeCo loss on rows of length n.
// The network is the (layers, wires) int32 table of fastssl/reference/diffsort.py
// (code = partner * 4 + is_lo * 2 + keeps_alpha, wires = N = next power of two >= n); on the
// CPU it lives in host memory, for the CUDA launchers in device memory. distribution indexes
// DISTRIBUTIONS there (logistic, logistic_phi, gaussian, reciprocal, cauchy, optimal).
struct SortingNetwork {
  uintptr_t codes;
  int64_t layers, wires;
  int distribution;
  float art_lambda;
};

// Rows (rows, n) with strides and a dtype code; data == 0 means "absent" (a zero gradient).
struct RowsView {
  uintptr_t data;
  int dtype;
  int64_t rows, n;
  int64_t stride_row, stride_col;
};

// Matrices (rows, n, n) with strides and a dtype code; data == 0 means "absent".
struct MatricesView {
  uintptr_t data;
  int dtype;
  int64_t rows, n;
  int64_t stride_row, stride_i, stride_j;
};

// Outputs are contiguous float32: x_sorted (R, n), P (R, n, n), grad_x (R, n), loss (R,).
// NeCo's per-row loss is -(1/n) sum_ij P_t[i, j] log(max(P_s[i, j], 2^-149)); grad_rows (R,)
// float32 is the upstream gradient of those losses.
void soft_sort_forward_cpu(const RowsView& x, const SortingNetwork& net, float steepness, uintptr_t x_sorted,
                           uintptr_t P);
void soft_sort_backward_cpu(const RowsView& x, const RowsView& grad_sorted, const MatricesView& grad_P,
                            const SortingNetwork& net, float steepness, uintptr_t grad_x);
void neco_loss_forward_cpu(const RowsView& student, const RowsView& teacher, const SortingNetwork& net,
                           float steepness_student, float steepness_teacher, uintptr_t loss);
void neco_loss_backward_cpu(const RowsView& student, const RowsView& teacher, const SortingNetwork& net,
                            float steepness_student, float steepness_teacher, uintptr_t grad_rows,
                            uintptr_t grad_student);

#ifdef FASTSSL_WITH_CUDA
// The same on the GPU, on the caller's stream; N <= SOFT_SORT_MAX_WIRES_CUDA.
// The backward takes a float32 workspace of soft_sort_workspace_floats_cuda(...) floats.
constexpr int64_t SOFT_SORT_MAX_WIRES_CUDA = 256;
int64_t soft_sort_workspace_floats_cuda(int64_t rows, const SortingNetwork& net);
void soft_sort_forward_cuda(const RowsView& x, const SortingNetwork& net, float steepness, uintptr_t x_sorted,
                            uintptr_t P, uintptr_t stream);
void soft_sort_backward_cuda(const RowsView& x, const RowsView& grad_sorted, const MatricesView& grad_P,
                             const SortingNetwork& net, float steepness, uintptr_t grad_x, uintptr_t workspace,
                             uintptr_t stream);
void neco_loss_forward_cuda(const RowsView& student, const RowsView& teacher, const SortingNetwork& net,
                            float steepness_student, float steepness_teacher, uintptr_t loss, uintptr_t stream);
void neco_loss_backward_cuda(const RowsView& student, const RowsView& teacher, const SortingNetwork& net,
                             float steepness_student, float steepness_teacher, uintptr_t grad_rows,
                             uintptr_t grad_student, uintptr_t workspace, uintptr_t stream);
#endif

}  // namespace fastssl
