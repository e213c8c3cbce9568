// Differentiable sorting networks and the fused NeCo loss on the CPU (OpenMP over rows):
// see kernels_api.h for the functions, fastssl/reference/diffsort.py for the semantics.
//
// Algorithm. The (layers, N) code table is decoded once per call into comparator lists
// (lo wire, hi wire, sign = dc/dalpha). Per row, a thread holds the wire values x (n) and P in
// wire-major order (P[w * n + i] = weight of input i on wire w), so that a comparator on wires
// (a, b) with c = alpha or 1 - alpha (alpha = F(steepness * (x[b] - x[a]))) updates two
// contiguous columns of n floats:
//     P[a] <- c P[a] + (1 - c) P[b],   P[b] <- c P[b] + (1 - c) P[a]   (and the same for x).
// Rows i >= n and wires >= n never meet a comparator (diffsort's padding), so only n x n
// entries are stored. Work per row: about 6 n FLOPs per comparator (n * comparators * 6:
// 142 kFLOP for NeCo's n = 49, 483 comparators); reads n * e bytes, writes 4 (n + n^2).
//
// Backward (recomputation; nothing is kept from the forward but the input). The thread
// reruns the forward, keeping (x, P) before layers 0, E, 2E, ... (checkpoints), then walks
// the segments backwards: it recomputes a segment's E states from its checkpoint and goes
// back through them, keeping the adjoints g (values) and G (P, wire-major) of the state after
// the layer. For a comparator on (a, b):
//     dL/dc = (g[a] - g[b]) (x[a] - x[b]) + sum_i (G[a, i] - G[b, i]) (P[a, i] - P[b, i])
//     g, G  <- the layer applied to them (its 2 x 2 block is symmetric: its own transpose)
//     dL/dd = sign * dL/dc * steepness * F'(steepness * d);  g[b] += dL/dd, g[a] -= dL/dd.
// E = L (every state kept) when the L states take at most STATE_BYTES, else ceil(sqrt(L))
// (states and recomputation both O(sqrt(L)) then). About 2.5 forwards' worth of FLOPs per
// row (forward, recomputation, adjoint with the inner products): ~15 n FLOPs per comparator.
//
// NeCo: both rows are sorted into thread-local P_s, P_t and only the per-row loss is stored;
// its backward forms G = -(g / n) P_t / P_s (0 where P_s == 0, the guard's clamp) on the fly.
#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu_math.h"
#include "kernels_api.h"

namespace fastssl {
namespace {

// Per-thread bytes of layer states up to which the backward keeps every state.
constexpr int64_t STATE_BYTES = int64_t{8} << 20;
constexpr float LOG_SMALLEST_POSITIVE = -103.27892990343185f;  // ln 2^-149

enum Distribution : int { LOGISTIC = 0, LOGISTIC_PHI, GAUSSIAN, RECIPROCAL, CAUCHY, OPTIMAL };

struct Comparator {
  int32_t lo, hi;
  float sign;  // dc/dalpha: +1 where both wires keep alpha, -1 where they keep 1 - alpha
};

// The network as comparator lists per layer: layers [begin[k], begin[k + 1]).
struct Layers {
  std::vector<Comparator> comparators;
  std::vector<int64_t> begin;
  int64_t count() const { return static_cast<int64_t>(begin.size()) - 1; }
};

Layers decode(const SortingNetwork& net) {
  const int32_t* codes = reinterpret_cast<const int32_t*>(net.codes);
  Layers layers;
  layers.begin.push_back(0);
  for (int64_t k = 0; k < net.layers; ++k) {
    for (int32_t w = 0; w < net.wires; ++w) {
      const int32_t code = codes[k * net.wires + w];
      const int32_t partner = code >> 2;
      if (partner != w && (code & 2)) layers.comparators.push_back({w, partner, (code & 1) ? 1.0f : -1.0f});
    }
    layers.begin.push_back(static_cast<int64_t>(layers.comparators.size()));
  }
  return layers;
}

// alpha = F(steepness * d) for d = x[hi] - x[lo], written as the reference writes it in float32.
float relaxed_min_weight(float d, float steepness, int distribution, float art_lambda) {
  switch (distribution) {
    case LOGISTIC: return 1.0f / (1.0f + std::exp(-(d * steepness)));
    case LOGISTIC_PHI: {
      const float u = d * steepness / std::pow(std::fabs(d) + 1e-10f, art_lambda);
      return 1.0f / (1.0f + std::exp(-u));
    }
    case GAUSSIAN: return 0.5f + 0.5f * std::erf(steepness * d / 1.41421356237309515f);
    case RECIPROCAL: {
      const float v = steepness * d;
      return 0.5f * (v / (2.0f + std::fabs(v)) + 1.0f);
    }
    case CAUCHY: return std::atan(steepness * d) / 3.14159265358979312f + 0.5f;
    default: {  // OPTIMAL; comparisons rather than fmin/fmax so that NaN propagates
      const float v = steepness * d;
      const float clamped = v > 0.25f ? 0.25f : (v < -0.25f ? -0.25f : v);
      const float outside = v > 0.25f ? 1.0f : (v < -0.25f ? -1.0f : 0.0f);
      return clamped + 0.5f + outside * (0.25f - 0.0625f / (std::fabs(v) + 1e-10f));
    }
  }
}

// dalpha/dd, derived from the formulas above (F' times the chain through steepness * d).
float relaxed_min_slope(float d, float steepness, int distribution, float art_lambda) {
  switch (distribution) {
    case LOGISTIC: {
      const float alpha = 1.0f / (1.0f + std::exp(-(d * steepness)));
      return steepness * alpha * (1.0f - alpha);
    }
    case LOGISTIC_PHI: {  // u = s d a^-lambda, a = |d| + 1e-10: du/dd = s a^-lambda (1 - lambda |d| / a)
      const float a = std::fabs(d) + 1e-10f;
      const float scale = steepness / std::pow(a, art_lambda);
      const float alpha = 1.0f / (1.0f + std::exp(-(d * scale)));
      return alpha * (1.0f - alpha) * scale * (1.0f - art_lambda * std::fabs(d) / a);
    }
    case GAUSSIAN: {
      const float v = steepness * d;
      return steepness * 0.398942280401432678f * std::exp(-0.5f * v * v);
    }
    case RECIPROCAL: {
      const float r = 2.0f + std::fabs(steepness * d);
      return steepness / (r * r);
    }
    case CAUCHY: {
      const float v = steepness * d;
      return steepness / (3.14159265358979312f * (1.0f + v * v));
    }
    default: {  // OPTIMAL: 1 on the clamp's closed interval, 1/(16 v^2) outside
      const float v = steepness * d;
      const float r = std::fabs(v) + 1e-10f;
      return std::fabs(v) <= 0.25f ? steepness : (v == v ? steepness * 0.0625f / (r * r) : v);
    }
  }
}

struct Sorter {
  const Layers& layers;
  int64_t n;
  float steepness;
  int distribution;
  float art_lambda;

  float kept_weight(const Comparator& c, const float* x) const {
    const float alpha = relaxed_min_weight(x[c.hi] - x[c.lo], steepness, distribution, art_lambda);
    return c.sign > 0 ? alpha : 1.0f - alpha;
  }

  // Layer k on values x and wire-major P, in place.
  void apply(int64_t k, float* x, float* P) const {
    for (int64_t q = layers.begin[k]; q < layers.begin[k + 1]; ++q) {
      const Comparator& comparator = layers.comparators[q];
      const float c = kept_weight(comparator, x), keep_other = 1.0f - c;
      mix(c, keep_other, x + comparator.lo, x + comparator.hi, 1);
      mix(c, keep_other, P + comparator.lo * n, P + comparator.hi * n, n);
    }
  }

  static void mix(float c, float keep_other, float* a, float* b, int64_t count) {
#pragma omp simd
    for (int64_t i = 0; i < count; ++i) {
      const float old_a = a[i], old_b = b[i];
      a[i] = c * old_a + keep_other * old_b;
      b[i] = c * old_b + keep_other * old_a;
    }
  }

  static void identity(float* P, int64_t n) {
    std::fill(P, P + n * n, 0.0f);
    for (int64_t i = 0; i < n; ++i) P[i * n + i] = 1.0f;
  }

  void forward(float* x, float* P) const {
    identity(P, n);
    for (int64_t k = 0; k < layers.count(); ++k) apply(k, x, P);
  }

  // Back through layer k, from the state (x, P) before it; g and G hold the adjoints of the
  // state after it on entry and of the state before it on return.
  void backward_layer(int64_t k, const float* x, const float* P, float* g, float* G) const {
    for (int64_t q = layers.begin[k]; q < layers.begin[k + 1]; ++q) {
      const Comparator& comparator = layers.comparators[q];
      const int64_t a = comparator.lo, b = comparator.hi;
      const float d = x[b] - x[a];
      const float c = kept_weight(comparator, x), keep_other = 1.0f - c;
      float dc = (g[a] - g[b]) * (x[a] - x[b]);
      const float *Pa = P + a * n, *Pb = P + b * n;
      const float *Ga = G + a * n, *Gb = G + b * n;
      float inner = 0.0f;
#pragma omp simd reduction(+ : inner)
      for (int64_t i = 0; i < n; ++i) inner += (Ga[i] - Gb[i]) * (Pa[i] - Pb[i]);
      dc += inner;
      mix(c, keep_other, G + a * n, G + b * n, n);
      mix(c, keep_other, g + a, g + b, 1);
      const float dd = comparator.sign * dc * relaxed_min_slope(d, steepness, distribution, art_lambda);
      g[b] += dd;
      g[a] -= dd;
    }
  }
};

// Thread-local states for the backward: checkpoints every `every` layers and one segment.
struct Recomputation {
  const Sorter& sorter;
  int64_t every, segments, state;  // state: floats of one (x, P) pair, x first
  std::vector<float> checkpoints, segment;

  explicit Recomputation(const Sorter& s) : sorter(s) {
    const int64_t L = std::max<int64_t>(s.layers.count(), 1);
    state = s.n + s.n * s.n;
    every = L * state * 4 <= STATE_BYTES ? L : static_cast<int64_t>(std::ceil(std::sqrt(static_cast<double>(L))));
    segments = (L + every - 1) / every;
    checkpoints.resize(segments * state);
    segment.resize(every * state);
  }

  // The adjoints g (n) and G (n x n, wire-major) of the sorted state, back to the input's.
  void backward(const float* x_in, float* g, float* G) {
    const int64_t L = sorter.layers.count(), n = sorter.n;
    float* x = checkpoints.data();
    std::copy(x_in, x_in + n, x);
    Sorter::identity(x + n, n);
    for (int64_t s = 1; s < segments; ++s) {  // checkpoints 1.. from checkpoint 0
      float* next = checkpoints.data() + s * state;
      std::copy(next - state, next, next);
      for (int64_t k = (s - 1) * every; k < s * every; ++k) sorter.apply(k, next, next + n);
    }
    for (int64_t s = segments - 1; s >= 0; --s) {
      const int64_t first = s * every, last = std::min(L, first + every);
      std::copy(checkpoints.data() + s * state, checkpoints.data() + (s + 1) * state, segment.data());
      for (int64_t k = first; k + 1 < last; ++k) {
        float* next = segment.data() + (k + 1 - first) * state;
        std::copy(next - state, next, next);
        sorter.apply(k, next, next + n);
      }
      for (int64_t k = last - 1; k >= first; --k) {
        const float* before = segment.data() + (k - first) * state;
        sorter.backward_layer(k, before, before + n, g, G);
      }
    }
  }
};

Sorter make_sorter(const Layers& layers, const SortingNetwork& net, int64_t n, float steepness) {
  return Sorter{layers, n, steepness, net.distribution, net.art_lambda};
}

// Threads pay off above a few rows' worth of work.
bool threads_pay_off(int64_t rows, int64_t n) { return rows * n * n >= (int64_t{1} << 14); }

void load_row(const RowsView& v, int64_t r, float* out) {
  load_floats(v.data, v.dtype, r * v.stride_row, v.n, v.stride_col, out);
}

// -(1/n) sum_ij P_t log(max(P_s, 2^-149)), wire-major P of n x n.
float neco_row_loss(const float* P_s, const float* P_t, int64_t n) {
  double total = 0.0;
  for (int64_t w = 0; w < n; ++w) {
    float column = 0.0f;
#pragma omp simd reduction(+ : column)
    for (int64_t i = 0; i < n; ++i) {
      const float p = P_s[w * n + i];
      column += P_t[w * n + i] * (p > 0.0f ? log_positive(p) : LOG_SMALLEST_POSITIVE);
    }
    total += column;
  }
  return static_cast<float>(-total / static_cast<double>(n));
}

}  // namespace

void soft_sort_forward_cpu(const RowsView& xv, const SortingNetwork& net, float steepness, uintptr_t x_sorted,
                           uintptr_t P_out) {
  const Layers layers = decode(net);
  const int64_t n = xv.n;
  const Sorter sorter = make_sorter(layers, net, n, steepness);
  float* sorted = reinterpret_cast<float*>(x_sorted);
  float* P_rows = reinterpret_cast<float*>(P_out);
#pragma omp parallel if (threads_pay_off(xv.rows, n))
  {
    std::vector<float> x(n), P(n * n);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < xv.rows; ++r) {
      load_row(xv, r, x.data());
      sorter.forward(x.data(), P.data());
      std::copy(x.begin(), x.end(), sorted + r * n);
      float* out = P_rows + r * n * n;
      for (int64_t i = 0; i < n; ++i)
        for (int64_t w = 0; w < n; ++w) out[i * n + w] = P[w * n + i];
    }
  }
}

void soft_sort_backward_cpu(const RowsView& xv, const RowsView& grad_sorted, const MatricesView& grad_P,
                            const SortingNetwork& net, float steepness, uintptr_t grad_x) {
  const Layers layers = decode(net);
  const int64_t n = xv.n;
  const Sorter sorter = make_sorter(layers, net, n, steepness);
  float* out = reinterpret_cast<float*>(grad_x);
#pragma omp parallel if (threads_pay_off(xv.rows, n))
  {
    Recomputation recomputation(sorter);
    std::vector<float> x(n), g(n), G(n * n);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < xv.rows; ++r) {
      load_row(xv, r, x.data());
      if (grad_sorted.data) {
        load_row(grad_sorted, r, g.data());
      } else {
        std::fill(g.begin(), g.end(), 0.0f);
      }
      if (grad_P.data) {  // G[w, i] = dL/dP[i, w]
        for (int64_t w = 0; w < n; ++w)
          load_floats(grad_P.data, grad_P.dtype, r * grad_P.stride_row + w * grad_P.stride_j, n, grad_P.stride_i,
                      G.data() + w * n);
      } else {
        std::fill(G.begin(), G.end(), 0.0f);
      }
      recomputation.backward(x.data(), g.data(), G.data());
      std::copy(g.begin(), g.end(), out + r * n);
    }
  }
}

void neco_loss_forward_cpu(const RowsView& student, const RowsView& teacher, const SortingNetwork& net,
                           float steepness_student, float steepness_teacher, uintptr_t loss) {
  const Layers layers = decode(net);
  const int64_t n = student.n;
  const Sorter sort_student = make_sorter(layers, net, n, steepness_student);
  const Sorter sort_teacher = make_sorter(layers, net, n, steepness_teacher);
  float* out = reinterpret_cast<float*>(loss);
#pragma omp parallel if (threads_pay_off(student.rows, n))
  {
    std::vector<float> x(n), P_s(n * n), P_t(n * n);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < student.rows; ++r) {
      load_row(teacher, r, x.data());
      sort_teacher.forward(x.data(), P_t.data());
      load_row(student, r, x.data());
      sort_student.forward(x.data(), P_s.data());
      out[r] = neco_row_loss(P_s.data(), P_t.data(), n);
    }
  }
}

void neco_loss_backward_cpu(const RowsView& student, const RowsView& teacher, const SortingNetwork& net,
                            float steepness_student, float steepness_teacher, uintptr_t grad_rows,
                            uintptr_t grad_student) {
  const Layers layers = decode(net);
  const int64_t n = student.n;
  const Sorter sort_student = make_sorter(layers, net, n, steepness_student);
  const Sorter sort_teacher = make_sorter(layers, net, n, steepness_teacher);
  const float* upstream = reinterpret_cast<const float*>(grad_rows);
  float* out = reinterpret_cast<float*>(grad_student);
#pragma omp parallel if (threads_pay_off(student.rows, n))
  {
    Recomputation recomputation(sort_student);
    std::vector<float> x(n), g(n), P_s(n * n), G(n * n);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < student.rows; ++r) {
      load_row(student, r, x.data());
      sort_student.forward(x.data(), P_s.data());
      load_row(teacher, r, x.data());
      sort_teacher.forward(x.data(), G.data());  // P_t, turned into the adjoint in place
      // Autograd's order for -(sum P_t log P_s) / n: (-(g / n) * P_t) / P_s.
      const float scale = -(upstream[r] / static_cast<float>(n));
#pragma omp simd
      for (int64_t e = 0; e < n * n; ++e) G[e] = P_s[e] > 0.0f ? scale * G[e] / P_s[e] : 0.0f;
      std::fill(g.begin(), g.end(), 0.0f);
      load_row(student, r, x.data());
      recomputation.backward(x.data(), g.data(), G.data());
      std::copy(g.begin(), g.end(), out + r * n);
    }
  }
}

}  // namespace fastssl
