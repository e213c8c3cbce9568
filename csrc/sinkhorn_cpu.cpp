// Sinkhorn-Knopp half-iterations on the CPU (OpenMP): see kernels_api.h for the functions.
//
// Each half-iteration is two sweeps over the scores: the maxima of x - shift along the
// reduced axis, then the sums of 2^(x - shift - max), so every exponent is <= 0 (no
// overflow for any finite input) and one exp2 is computed per element. Nothing of size
// (B, K) is written except Q. Column reductions keep a chunk of COLUMN_CHUNK running
// maxima and sums per thread, so rows are read contiguously when the column stride is 1.
#include <algorithm>
#include <cmath>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "cpu_math.h"
#include "kernels_api.h"

namespace fastssl {
namespace {

constexpr int64_t COLUMN_CHUNK = 512;
// Sums: float32 within blocks of SUM_BLOCK (vectorized), float64 across blocks and along
// columns, so the error of the normalizers stays at float32 rounding for rows of 10^5.
constexpr int64_t SUM_BLOCK = 256;

// Below this many elements, waking threads costs more than the work.
bool threads_pay_off(const ScoresView& s) { return s.problems * s.rows * s.cols >= (int64_t{1} << 15); }

// Where the threads go: many problems are shared out whole, fewer than the threads are
// each split (OpenMP runs a region nested in an active one on a single thread).
struct Threading {
  bool across, inside;
  explicit Threading(const ScoresView& s) {
#ifdef _OPENMP
    const bool many = s.problems >= omp_get_max_threads();
#else
    const bool many = true;
#endif
    across = threads_pay_off(s) && many;
    inside = threads_pay_off(s) && !many;
  }
};

template <typename T>
const T* problem_base(const ScoresView& s, int64_t p) {
  return reinterpret_cast<const T*>(s.data) + p * s.stride_problem;
}

template <typename T>
void col_lse(const ScoresView& s, float scale, const float* lse_b, float* lse_k) {
  const int64_t chunks = (s.cols + COLUMN_CHUNK - 1) / COLUMN_CHUNK;
#pragma omp parallel for schedule(static) if (threads_pay_off(s))
  for (int64_t task = 0; task < s.problems * chunks; ++task) {
    const int64_t p = task / chunks, k0 = (task % chunks) * COLUMN_CHUNK;
    const int64_t width = std::min(COLUMN_CHUNK, s.cols - k0);
    const T* base = problem_base<T>(s, p) + k0 * s.stride_col;
    const float* shift = lse_b + p * s.rows;
    float maximum[COLUMN_CHUNK];
    double total[COLUMN_CHUNK];
    std::fill(maximum, maximum + width, -INFINITY);
    std::fill(total, total + width, 0.0);
    for (int64_t b = 0; b < s.rows; ++b) {
      const T* row = base + b * s.stride_row;
#pragma omp simd
      for (int64_t k = 0; k < width; ++k) {
        const float v = to_float(row[k * s.stride_col]) * scale - shift[b];
        maximum[k] = v > maximum[k] ? v : maximum[k];
      }
    }
    for (int64_t b = 0; b < s.rows; ++b) {
      const T* row = base + b * s.stride_row;
#pragma omp simd
      for (int64_t k = 0; k < width; ++k) {
        total[k] += fast_exp2(to_float(row[k * s.stride_col]) * scale - shift[b] - maximum[k]);
      }
    }
    float* out = lse_k + p * s.cols + k0;
    for (int64_t k = 0; k < width; ++k) out[k] = maximum[k] + static_cast<float>(std::log2(total[k]));
  }
}

// log2 sum_k 2^(x[b, k] - lse_k[k]) of one row.
template <typename T>
float row_lse_of(const T* row, int64_t cols, int64_t stride_col, float scale, const float* lse_k) {
  float maximum = -INFINITY;
#pragma omp simd reduction(max : maximum)
  for (int64_t k = 0; k < cols; ++k) {
    const float v = to_float(row[k * stride_col]) * scale - lse_k[k];
    maximum = v > maximum ? v : maximum;
  }
  double total = 0.0;
  for (int64_t k0 = 0; k0 < cols; k0 += SUM_BLOCK) {
    float block = 0.0f;
#pragma omp simd reduction(+ : block)
    for (int64_t k = k0; k < std::min(cols, k0 + SUM_BLOCK); ++k) {
      block += fast_exp2(to_float(row[k * stride_col]) * scale - lse_k[k] - maximum);
    }
    total += block;
  }
  return maximum + static_cast<float>(std::log2(total));
}

template <typename T>
void row_lse(const ScoresView& s, float scale, const float* lse_k, float* lse_b, float* q) {
#pragma omp parallel for schedule(static) if (threads_pay_off(s))
  for (int64_t task = 0; task < s.problems * s.rows; ++task) {
    const int64_t p = task / s.rows, b = task % s.rows;
    const T* row = problem_base<T>(s, p) + b * s.stride_row;
    const float* shift = lse_k + p * s.cols;
    const float lse = row_lse_of(row, s.cols, s.stride_col, scale, shift);
    lse_b[task] = lse;
    if (q != nullptr) {
      float* out = q + task * s.cols;
#pragma omp simd
      for (int64_t k = 0; k < s.cols; ++k) out[k] = fast_exp2(to_float(row[k * s.stride_col]) * scale - shift[k] - lse);
    }
  }
}


// E = 2^(x - shift) of every problem (x = scores * scale), if each problem's finite
// exponents span less than LINEAR_SPREAD (so no entry underflows or overflows). The shift
// is 0 when every |x| <= LINEAR_SPREAD, so that x is rounded once, as in the original's
// exp(scores / eps); the problem's maximum otherwise. False if a problem does not fit or
// x holds NaN or +inf.
constexpr float LINEAR_SPREAD = 100.0f;

template <typename T>
bool linear_domain_exponents(const ScoresView& s, float scale, float* e) {
  const Threading threads(s);
  bool fits = true;
#pragma omp parallel for schedule(static) reduction(&& : fits) if (threads.across)
  for (int64_t p = 0; p < s.problems; ++p) {
    const T* base = problem_base<T>(s, p);
    float maximum = -INFINITY, minimum = INFINITY;
    bool finite = true;
#pragma omp parallel for schedule(static) reduction(max : maximum) reduction(min : minimum) \
    reduction(&& : finite) if (threads.inside)
    for (int64_t b = 0; b < s.rows; ++b) {
      for (int64_t k = 0; k < s.cols; ++k) {
        const float v = to_float(base[b * s.stride_row + k * s.stride_col]) * scale;
        finite = finite && !(v != v) && v != INFINITY;
        maximum = v > maximum ? v : maximum;
        minimum = v < minimum && v != -INFINITY ? v : minimum;
      }
    }
    fits = fits && finite && maximum - minimum < LINEAR_SPREAD;
    if (!fits) continue;
    const float shift = maximum <= LINEAR_SPREAD && minimum >= -LINEAR_SPREAD ? 0.0f : maximum;
    float* out = e + p * s.rows * s.cols;
#pragma omp parallel for schedule(static) if (threads.inside)
    for (int64_t b = 0; b < s.rows; ++b) {
      const T* row = base + b * s.stride_row;
#pragma omp simd
      for (int64_t k = 0; k < s.cols; ++k) {
        out[b * s.cols + k] = fast_exp2(to_float(row[k * s.stride_col]) * scale - shift);
      }
    }
  }
  return fits;
}

// Sinkhorn in the linear domain on E (problems, B, K), in place: column scales c and row
// scales r alternate n_iters times, then Q = E * r * c. Each iteration reads E twice and
// computes no exponential. Columns are scaled to sum to B / K (rows sum to 1), so the
// scales do not drift by K / B per iteration. lse_b receives -log2(r), finite exactly when
// the input was.
void linear_iterations(const ScoresView& s, int n_iters, float* e, float* lse_b) {
  const int64_t problems = s.problems, rows = s.rows, cols = s.cols;
  const Threading threads(s);
  const int64_t chunks = (cols + COLUMN_CHUNK - 1) / COLUMN_CHUNK;
  const double column_mass = static_cast<double>(rows) / static_cast<double>(cols);
#pragma omp parallel for schedule(static) if (threads.across)
  for (int64_t p = 0; p < problems; ++p) {
    float* q = e + p * rows * cols;
    std::vector<float> r(rows, 1.0f), c(cols);
    std::vector<double> column_total(cols);
    for (int iteration = 0; iteration < n_iters; ++iteration) {
#pragma omp parallel for schedule(static) if (threads.inside)
      for (int64_t chunk = 0; chunk < chunks; ++chunk) {
        const int64_t k0 = chunk * COLUMN_CHUNK, k1 = std::min(cols, k0 + COLUMN_CHUNK);
        std::fill(column_total.begin() + k0, column_total.begin() + k1, 0.0);
        for (int64_t b = 0; b < rows; ++b) {
          const float* row = q + b * cols;
          const float scale_b = r[b];
#pragma omp simd
          for (int64_t k = k0; k < k1; ++k) column_total[k] += row[k] * scale_b;
        }
        for (int64_t k = k0; k < k1; ++k) c[k] = static_cast<float>(column_mass / column_total[k]);
      }
#pragma omp parallel for schedule(static) if (threads.inside)
      for (int64_t b = 0; b < rows; ++b) {
        const float* row = q + b * cols;
        double total = 0.0;
        for (int64_t k0 = 0; k0 < cols; k0 += SUM_BLOCK) {
          float block = 0.0f;
#pragma omp simd reduction(+ : block)
          for (int64_t k = k0; k < std::min(cols, k0 + SUM_BLOCK); ++k) block += row[k] * c[k];
          total += block;
        }
        r[b] = static_cast<float>(1.0 / total);
      }
    }
#pragma omp parallel for schedule(static) if (threads.inside)
    for (int64_t b = 0; b < rows; ++b) {
      float* row = q + b * cols;
#pragma omp simd
      for (int64_t k = 0; k < cols; ++k) row[k] *= r[b] * c[k];
      lse_b[p * rows + b] = -std::log2(r[b]);
    }
  }
}

}  // namespace

bool sinkhorn_linear_cpu(const ScoresView& scores, float scale, int n_iters, uintptr_t q, uintptr_t lse_b) {
  bool fits = false;
  dispatch_dtype(scores.dtype, [&](auto tag) {
    using T = std::remove_const_t<std::remove_pointer_t<decltype(tag)>>;
    fits = linear_domain_exponents<T>(scores, scale, reinterpret_cast<float*>(q));
  });
  if (fits) {
    linear_iterations(scores, n_iters, reinterpret_cast<float*>(q), reinterpret_cast<float*>(lse_b));
  }
  return fits;
}

void sinkhorn_col_lse_cpu(const ScoresView& scores, float scale, uintptr_t lse_b, uintptr_t lse_k) {
  dispatch_dtype(scores.dtype, [&](auto tag) {
    using T = std::remove_const_t<std::remove_pointer_t<decltype(tag)>>;
    col_lse<T>(scores, scale, reinterpret_cast<const float*>(lse_b), reinterpret_cast<float*>(lse_k));
  });
}

void sinkhorn_row_lse_cpu(const ScoresView& scores, float scale, uintptr_t lse_k, uintptr_t lse_b) {
  dispatch_dtype(scores.dtype, [&](auto tag) {
    using T = std::remove_const_t<std::remove_pointer_t<decltype(tag)>>;
    row_lse<T>(scores, scale, reinterpret_cast<const float*>(lse_k), reinterpret_cast<float*>(lse_b), nullptr);
  });
}

void sinkhorn_write_cpu(const ScoresView& scores, float scale, uintptr_t lse_k, uintptr_t lse_b, uintptr_t q) {
  dispatch_dtype(scores.dtype, [&](auto tag) {
    using T = std::remove_const_t<std::remove_pointer_t<decltype(tag)>>;
    row_lse<T>(scores, scale, reinterpret_cast<const float*>(lse_k), reinterpret_cast<float*>(lse_b),
               reinterpret_cast<float*>(q));
  });
}

}  // namespace fastssl
