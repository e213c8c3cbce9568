// Differentiable sorting networks and the fused NeCo loss on the GPU: see csrc/kernels_api.h
// for the functions and csrc/soft_sort_cpu.cpp for the same algorithm on the CPU (tested
// there against the float64 reference).
//
// A block of 256 threads owns a row's wire values x (N) and a tile of P: TILE = 4096 / N
// input rows by N wires (N <= 256), wire-major in shared memory with a leading dimension of
// TILE + 1 (conflict-free both along inputs and along wires). A layer is two barriers:
//   1. each wire w decodes its code (partner p, which end, which weight it keeps) and sets
//      c[w] = alpha or 1 - alpha (alpha = F(steepness * (x[hi] - x[lo])), 1 for pass-through)
//      and the next x[w] = c[w] x[w] + (1 - c[w]) x[p];
//   2. every P entry of the tile: P'[w, i] = c[w] P[w, i] + (1 - c[w]) P[p, i]
//      (double-buffered, so that no entry is read after its partner was overwritten).
// The mixing runs on PTX mul/fma without .ftz: --use_fast_math flushes subnormals, and NeCo's
// P entries reach 1e-40, whose log the loss needs exactly.
//
// Kernels (R rows, L layers; NeCo's n = 49: N = 64, TILE = 64, L = 21):
// - soft_sort_forward_kernel: grid R * ceil(n / TILE); writes P's tile rows and, from the
//   first tile, x_sorted. Reads n*e bytes, writes 4 (n + n^2) per row; about 4 N^2 L FLOPs
//   per row (344 kFLOP for NeCo's rows).
// - neco_forward_kernel: a block per row, looping over the tiles: sorts teacher and student,
//   reduces sum P_t log(max(P_s, 2^-149)) and writes the row's loss. Reads 2 n*e bytes, writes
//   4; about 8 N^2 L FLOPs per row.
// - soft_sort_backward_kernel<NECO>: persistent blocks (two per SM), a row at a time. Per tile
//   it reruns the forward, keeping the tile's P before layers 0, E, 2E, ... (E = ceil(sqrt L))
//   and x before every layer in the block's global scratch; then, segment by segment
//   backwards, it recomputes the segment's E states of P into the scratch (L2-resident) and
//   walks them back: per layer, part[w] = sign * sum_i G[w, i] (P[w, i] - P[p, i]) (a warp per
//   wire) is accumulated over the tiles, and the adjoint G goes through the layer (its own
//   transpose: the 2 x 2 block is symmetric). The value phase then runs the layers backwards
//   with a thread per wire: dL/dalpha = part[w] + part[p] + (g[a] - g[b]) (x[a] - x[b]), times
//   F' into dL/dx. With NECO the adjoint is -(g / n) P_t / P_s (0 where P_s == 0), formed in
//   shared memory from a teacher sort of the same tile. Reads (2n + n^2) e bytes per row
//   (n*e more for NeCo), writes 4n; scratch per block: (2L + 1) N + (ceil(L/E) + E) N (TILE+1)
//   floats; about 3 forwards' worth of FLOPs (~12 N^2 L per row, 16 N^2 L for NeCo).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>

#include "kernels_api.h"

namespace fastssl {
namespace {

constexpr int THREADS = 256;  // also the largest N: the value phase gives each wire a thread
constexpr int WARPS = THREADS / 32;
constexpr int TILE_ELEMENTS = 4096;
constexpr int BLOCKS_PER_SM = 2;
constexpr float LOG_SMALLEST_POSITIVE = -103.27892990343185f;  // ln 2^-149
static_assert(THREADS >= SOFT_SORT_MAX_WIRES_CUDA, "the value phase needs a thread per wire");

enum Distribution : int { LOGISTIC = 0, LOGISTIC_PHI, GAUSSIAN, RECIPROCAL, CAUCHY, OPTIMAL };

// ----------------------------------------------------------------------------- arithmetic

// IEEE operations that keep subnormals under --use_fast_math (which sets .ftz on plain code).
__device__ __forceinline__ float mul_keep(float a, float b) {
  float r;
  asm("mul.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}
__device__ __forceinline__ float fma_keep(float a, float b, float c) {
  float r;
  asm("fma.rn.f32 %0, %1, %2, %3;" : "=f"(r) : "f"(a), "f"(b), "f"(c));
  return r;
}
__device__ __forceinline__ float div_keep(float a, float b) {
  float r;
  asm("div.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}
// c * a + (1 - c) * b, subnormals kept.
__device__ __forceinline__ float mix(float c, float a, float b) { return fma_keep(c, a, mul_keep(1.0f - c, b)); }
// p > 0 for p >= 0 without a flushing comparison (a subnormal is positive); NaN counts as positive.
__device__ __forceinline__ bool positive(float p) { return __float_as_int(p) > 0; }

// log of a positive float, subnormals included (the comparison and scaling on the bits:
// fast-math's log flushes them). Same scheme as csrc/cpu_math.h's log_positive.
__device__ __forceinline__ float log_positive(float x) {
  const bool subnormal = __float_as_int(x) < 0x00800000;
  const float scaled = subnormal ? mul_keep(x, 16777216.0f) : x;
  const int bits = __float_as_int(scaled);
  const int exponent = (bits - 0x3f3504f3) >> 23;
  const float m = __int_as_float(bits - (exponent << 23));
  const float s = (m - 1.0f) / (m + 1.0f);
  const float z = s * s;
  float p = 1.0f / 11.0f;
  p = p * z + 1.0f / 9.0f;
  p = p * z + 1.0f / 7.0f;
  p = p * z + 1.0f / 5.0f;
  p = p * z + 1.0f / 3.0f;
  p = p * z + 1.0f;
  const float e = static_cast<float>(exponent) - (subnormal ? 24.0f : 0.0f);
  const float result = e * 0.693147180559945309f + 2.0f * s * p;
  return isnan(x) || isinf(x) ? x : result;
}

__device__ __forceinline__ float load_float(uintptr_t data, int dtype, int64_t offset) {
  switch (dtype) {
    case 1: return __bfloat162float(reinterpret_cast<const __nv_bfloat16*>(data)[offset]);
    case 2: return __half2float(reinterpret_cast<const __half*>(data)[offset]);
    default: return reinterpret_cast<const float*>(data)[offset];
  }
}

struct Relaxation {
  float steepness, art_lambda;
  int distribution;
};

// alpha = F(steepness * d) (fastssl/reference/diffsort.py's relaxed_min_weight). Comparisons
// rather than fminf/fmaxf, which would turn NaN into a number.
__device__ float relaxed_min_weight(float d, const Relaxation& r) {
  const float v = r.steepness * d;
  switch (r.distribution) {
    case LOGISTIC: return 1.0f / (1.0f + expf(-v));
    case LOGISTIC_PHI: return 1.0f / (1.0f + expf(-(v / powf(fabsf(d) + 1e-10f, r.art_lambda))));
    case GAUSSIAN: return 0.5f + 0.5f * erff(v * 0.707106781186547524f);
    case RECIPROCAL: return 0.5f * (v / (2.0f + fabsf(v)) + 1.0f);
    case CAUCHY: return atanf(v) * 0.318309886183790672f + 0.5f;
    default: {
      const float clamped = v > 0.25f ? 0.25f : (v < -0.25f ? -0.25f : v);
      const float outside = v > 0.25f ? 1.0f : (v < -0.25f ? -1.0f : 0.0f);
      return clamped + 0.5f + outside * (0.25f - 0.0625f / (fabsf(v) + 1e-10f));
    }
  }
}

// dalpha/dd (derivations in csrc/soft_sort_cpu.cpp).
__device__ float relaxed_min_slope(float d, const Relaxation& r) {
  const float v = r.steepness * d;
  switch (r.distribution) {
    case LOGISTIC: {
      const float alpha = 1.0f / (1.0f + expf(-v));
      return r.steepness * alpha * (1.0f - alpha);
    }
    case LOGISTIC_PHI: {
      const float a = fabsf(d) + 1e-10f;
      const float scale = r.steepness / powf(a, r.art_lambda);
      const float alpha = 1.0f / (1.0f + expf(-(d * scale)));
      return alpha * (1.0f - alpha) * scale * (1.0f - r.art_lambda * fabsf(d) / a);
    }
    case GAUSSIAN: return r.steepness * 0.398942280401432678f * expf(-0.5f * v * v);
    case RECIPROCAL: {
      const float q = 2.0f + fabsf(v);
      return r.steepness / (q * q);
    }
    case CAUCHY: return r.steepness * 0.318309886183790672f / (1.0f + v * v);
    default: {
      const float q = fabsf(v) + 1e-10f;
      return fabsf(v) <= 0.25f ? r.steepness : (isnan(v) ? v : r.steepness * 0.0625f / (q * q));
    }
  }
}

// ----------------------------------------------------------------------------- block state

int tile_rows_for(int64_t wires) { return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(wires, TILE_ELEMENTS / wires))); }

// A block's shared state: values x (double-buffered), the layer's weights and partners, P
// tiles (double-buffered) and, for the backward and NeCo, the adjoint or P_t tile(s).
struct Tile {
  int N, rows, ld;  // wires, input rows in the tile, leading dimension (rows + 1)
  int cur;          // which buffer holds the current state
  float* values;    // x[0], x[1]: N floats each
  float* c;
  int* partner;
  float* part;    // value phase: dL/dalpha parts of a layer
  float* g;       // value phase: adjoint of the values
  float* tiles;   // P[0], P[1], then G[0], G[1] where the launch reserved them: size() floats each

  __device__ int size() const { return N * ld; }
  // Buffers by computed offset, not through arrays of pointers: an array indexed by the
  // runtime cur would live in local memory (a stack frame and its loads in every kernel).
  __device__ float* x(int which) const { return values + which * N; }
  __device__ float* P(int which) const { return tiles + which * size(); }
  __device__ float* G(int which) const { return tiles + (2 + which) * size(); }
};

size_t shared_bytes(int64_t N, int rows, int extra_tiles) {
  return sizeof(float) * (6 * N + (2 + extra_tiles) * N * static_cast<int64_t>(rows + 1));
}

__device__ Tile make_tile(float* shared, int N, int rows) {
  Tile t;
  t.N = N;
  t.rows = rows;
  t.ld = rows + 1;
  t.cur = 0;
  t.values = shared;
  t.c = t.values + 2 * N;
  t.partner = reinterpret_cast<int*>(t.c + N);
  t.part = t.c + 2 * N;
  t.g = t.part + N;
  t.tiles = t.g + N;
  return t;
}

__device__ void load_values(Tile& t, const RowsView& v, int64_t row) {
  for (int w = threadIdx.x; w < t.N; w += blockDim.x)
    t.x(t.cur)[w] = w < v.n ? load_float(v.data, v.dtype, row * v.stride_row + w * v.stride_col) : 0.0f;
}

__device__ void load_identity(Tile& t, int first_input) {
  for (int e = threadIdx.x; e < t.N * t.rows; e += blockDim.x) {
    const int w = e / t.rows, i = e - w * t.rows;
    t.P(t.cur)[w * t.ld + i] = first_input + i == w ? 1.0f : 0.0f;
  }
}

// Phase 1 of layer k: every wire's c and partner from values x_in; x_out (if any) the next values.
__device__ void layer_weights(Tile& t, const SortingNetwork& net, const Relaxation& r, int64_t k, const float* x_in,
                              float* x_out) {
  const int32_t* codes = reinterpret_cast<const int32_t*>(net.codes) + k * t.N;
  for (int w = threadIdx.x; w < t.N; w += blockDim.x) {
    const int code = codes[w], p = code >> 2;
    float c = 1.0f;
    if (p != w) {
      const float d = (code & 2) ? x_in[p] - x_in[w] : x_in[w] - x_in[p];
      const float alpha = relaxed_min_weight(d, r);
      c = (code & 1) ? alpha : 1.0f - alpha;
    }
    t.c[w] = c;
    t.partner[w] = p;
    if (x_out != nullptr) x_out[w] = mix(c, x_in[w], x_in[p]);
  }
}

// Phase 2: a (N x rows) tile through the layer whose weights phase 1 left in shared memory.
__device__ void mix_tile(const Tile& t, const float* in, float* out) {
  for (int e = threadIdx.x; e < t.N * t.rows; e += blockDim.x) {
    const int w = e / t.rows, i = e - w * t.rows;
    out[w * t.ld + i] = mix(t.c[w], in[w * t.ld + i], in[t.partner[w] * t.ld + i]);
  }
}

__device__ void step(Tile& t, const SortingNetwork& net, const Relaxation& r, int64_t k) {
  layer_weights(t, net, r, k, t.x(t.cur), t.x(t.cur ^ 1));
  __syncthreads();
  mix_tile(t, t.P(t.cur), t.P(t.cur ^ 1));
  __syncthreads();
  t.cur ^= 1;
}

// Sort row `row` of v with the tile's identity rows from `first_input`; the result in t.P(t.cur).
__device__ void sort_tile(Tile& t, const SortingNetwork& net, const Relaxation& r, const RowsView& v, int64_t row,
                          int first_input) {
  t.cur = 0;
  load_values(t, v, row);
  load_identity(t, first_input);
  __syncthreads();
  for (int64_t k = 0; k < net.layers; ++k) step(t, net, r, k);
}

__device__ void copy_floats(const float* from, float* to, int count) {
  for (int e = threadIdx.x; e < count; e += blockDim.x) to[e] = from[e];
}

__device__ float block_sum(float value) {
  __shared__ float warp_sums[WARPS];
  for (int offset = 16; offset > 0; offset /= 2) value += __shfl_xor_sync(0xffffffffu, value, offset);
  if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = value;
  __syncthreads();
  float total = 0.0f;
  for (int w = 0; w < WARPS; ++w) total += warp_sums[w];
  return total;
}

// ----------------------------------------------------------------------------- kernels

__global__ void __launch_bounds__(THREADS)
    soft_sort_forward_kernel(RowsView xv, SortingNetwork net, Relaxation r, int rows, int tiles, float* x_sorted,
                             float* P_out) {
  extern __shared__ float shared[];
  Tile t = make_tile(shared, static_cast<int>(net.wires), rows);
  const int64_t row = blockIdx.x / tiles;
  const int tile = blockIdx.x % tiles;
  const int64_t n = xv.n;
  sort_tile(t, net, r, xv, row, tile * rows);
  const float* P = t.P(t.cur);
  for (int e = threadIdx.x; e < rows * t.N; e += blockDim.x) {  // wires fastest: coalesced stores
    const int i = e / t.N, w = e - i * t.N;
    const int64_t input = static_cast<int64_t>(tile) * rows + i;
    if (input < n && w < n) P_out[(row * n + input) * n + w] = P[w * t.ld + i];
  }
  if (tile == 0)
    for (int w = threadIdx.x; w < n; w += blockDim.x) x_sorted[row * n + w] = t.x(t.cur)[w];
}

__global__ void __launch_bounds__(THREADS)
    neco_forward_kernel(RowsView student, RowsView teacher, SortingNetwork net, Relaxation r_student,
                        Relaxation r_teacher, int rows, int tiles, float* loss) {
  extern __shared__ float shared[];
  Tile t = make_tile(shared, static_cast<int>(net.wires), rows);
  const int64_t row = blockIdx.x, n = student.n;
  float total = 0.0f;
  for (int tile = 0; tile < tiles; ++tile) {
    sort_tile(t, net, r_teacher, teacher, row, tile * rows);
    copy_floats(t.P(t.cur), t.G(0), t.size());
    __syncthreads();  // the student's sort overwrites the buffer just copied
    sort_tile(t, net, r_student, student, row, tile * rows);
    const float* P_s = t.P(t.cur);
    for (int e = threadIdx.x; e < rows * t.N; e += blockDim.x) {
      const int w = e / rows, i = e - w * rows;
      const float p = P_s[w * t.ld + i];
      if (tile * rows + i < n && w < n)
        total += t.G(0)[w * t.ld + i] * (positive(p) ? log_positive(p) : LOG_SMALLEST_POSITIVE);
    }
    __syncthreads();
  }
  total = block_sum(total);
  if (threadIdx.x == 0) loss[row] = -total / static_cast<float>(n);
}

// The block's global scratch: x before every layer, the P parts of dL/dalpha per layer, P
// checkpoints and one segment of P states.
struct Scratch {
  float *x, *parts, *checkpoints, *segment;
};

__host__ __device__ int64_t checkpoint_every(int64_t layers) {
  int64_t every = 1;
  while (every * every < layers) ++every;
  return every;
}

__host__ __device__ int64_t scratch_floats(const SortingNetwork& net, int rows) {
  const int64_t every = checkpoint_every(net.layers), segments = (net.layers + every - 1) / every;
  return (2 * net.layers + 1) * net.wires + (segments + every) * net.wires * (rows + 1);
}

__device__ Scratch make_scratch(float* workspace, const SortingNetwork& net, int rows) {
  const int64_t every = checkpoint_every(net.layers), segments = (net.layers + every - 1) / every;
  Scratch s;
  s.x = workspace + blockIdx.x * scratch_floats(net, rows);
  s.parts = s.x + (net.layers + 1) * net.wires;
  s.checkpoints = s.parts + net.layers * net.wires;
  s.segment = s.checkpoints + segments * net.wires * (rows + 1);
  return s;
}

struct OutputAdjoint {
  RowsView grad_sorted;
  MatricesView grad_P;
  RowsView teacher;        // NeCo
  Relaxation r_teacher;    // NeCo
  const float* grad_rows;  // NeCo: upstream gradient of the per-row losses
};

// The adjoint of the tile's P into t.G(0): grad_P's rows (zero where absent or padded).
__device__ void load_grad_P(Tile& t, const MatricesView& gp, int64_t row, int first_input) {
  for (int e = threadIdx.x; e < t.N * t.rows; e += blockDim.x) {
    const int w = e / t.rows, i = e - w * t.rows;
    const int64_t input = first_input + i;
    float value = 0.0f;
    if (gp.data != 0 && input < gp.n && w < gp.n)
      value = load_float(gp.data, gp.dtype, row * gp.stride_row + input * gp.stride_i + w * gp.stride_j);
    t.G(0)[w * t.ld + i] = value;
  }
}

// NeCo: t.G(0) holds P_t and t.P(t.cur) the final P_s; G = (-(g / n) * P_t) / P_s (autograd's
// order), 0 where P_s == 0 or outside the n x n block.
__device__ void neco_adjoint(Tile& t, float upstream, int64_t n, int first_input) {
  const float scale = -(upstream / static_cast<float>(n));
  const float* P_s = t.P(t.cur);
  for (int e = threadIdx.x; e < t.N * t.rows; e += blockDim.x) {
    const int w = e / t.rows, i = e - w * t.rows, at = w * t.ld + i;
    const bool inside = first_input + i < n && w < n && positive(P_s[at]);
    t.G(0)[at] = inside ? div_keep(mul_keep(scale, t.G(0)[at]), P_s[at]) : 0.0f;
  }
}

// The P part of dL/dalpha at layer k, from the state P before it and the adjoint G after it:
// a warp per wire, summed over the tile's inputs and accumulated over tiles.
__device__ void accumulate_parts(const Tile& t, const SortingNetwork& net, int64_t k, const float* P, const float* G,
                                 float* parts, bool first_tile) {
  const int32_t* codes = reinterpret_cast<const int32_t*>(net.codes) + k * t.N;
  const int lane = threadIdx.x % 32;
  for (int w = threadIdx.x / 32; w < t.N; w += WARPS) {
    const int p = t.partner[w];
    float sum = 0.0f;
    if (p != w)
      for (int i = lane; i < t.rows; i += 32) sum += G[w * t.ld + i] * (P[w * t.ld + i] - P[p * t.ld + i]);
    for (int offset = 16; offset > 0; offset /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
    if (lane == 0) {
      const float signed_sum = p == w ? 0.0f : ((codes[w] & 1) ? sum : -sum);
      parts[k * t.N + w] = first_tile ? signed_sum : parts[k * t.N + w] + signed_sum;
    }
  }
}

// Rerun the forward of one tile (checkpoints of P, every x), then back through the layers.
__device__ void tile_backward(Tile& t, const Scratch& s, const SortingNetwork& net, const Relaxation& r,
                              const RowsView& xv, int64_t row, int first_input, bool first_tile) {
  // 32-bit layer arithmetic (a network has at most a few hundred layers): 64-bit division is a
  // subroutine call, around which the compiler spills registers.
  const int L = static_cast<int>(net.layers), every = static_cast<int>(checkpoint_every(L)),
            segments = (L + every - 1) / every;
  const int size = t.size();
  t.cur = 0;
  load_values(t, xv, row);
  load_identity(t, first_input);
  __syncthreads();
  for (int k = 0; k < L; ++k) {
    if (k % every == 0) copy_floats(t.P(t.cur), s.checkpoints + (k / every) * size, size);
    copy_floats(t.x(t.cur), s.x + k * t.N, t.N);
    step(t, net, r, k);
  }
  copy_floats(t.x(t.cur), s.x + L * t.N, t.N);
  int g_cur = 0;
  for (int segment = segments - 1; segment >= 0; --segment) {
    const int first = segment * every, last = min(L, first + every);
    // Recompute the segment's states into the scratch (the checkpoint is the first).
    copy_floats(s.checkpoints + segment * size, t.P(t.cur), size);
    copy_floats(s.x + first * t.N, t.x(t.cur), t.N);
    __syncthreads();
    for (int k = first; k < last; ++k) {
      copy_floats(t.P(t.cur), s.segment + (k - first) * size, size);
      if (k + 1 < last) step(t, net, r, k);
    }
    __syncthreads();  // the segment's global stores are visible to the whole block
    for (int k = last - 1; k >= first; --k) {
      layer_weights(t, net, r, k, s.x + k * t.N, nullptr);
      __syncthreads();
      accumulate_parts(t, net, k, s.segment + (k - first) * size, t.G(g_cur), s.parts, first_tile);
      mix_tile(t, t.G(g_cur), t.G(g_cur ^ 1));
      __syncthreads();
      g_cur ^= 1;
    }
  }
}

// Values: dL/dx_sorted back through the layers with every dL/dalpha chained through F'.
__device__ void value_backward(Tile& t, const Scratch& s, const SortingNetwork& net, const Relaxation& r,
                               const RowsView& grad_sorted, int64_t row, int64_t n, float* grad_x) {
  const int w = threadIdx.x;
  const bool wire = w < t.N;
  if (wire)
    t.g[w] = grad_sorted.data != 0 && w < n
                 ? load_float(grad_sorted.data, grad_sorted.dtype, row * grad_sorted.stride_row + w * grad_sorted.stride_col)
                 : 0.0f;
  __syncthreads();
  for (int64_t k = net.layers - 1; k >= 0; --k) {
    int code = 0, p = 0;
    float c = 1.0f, dd_sign = 0.0f, slope = 0.0f;
    if (wire) {
      code = reinterpret_cast<const int32_t*>(net.codes)[k * t.N + w];
      p = code >> 2;
      const float x_w = s.x[k * t.N + w], x_p = s.x[k * t.N + p];
      float part = s.parts[k * t.N + w];
      if (p != w) {
        const float d = (code & 2) ? x_p - x_w : x_w - x_p;
        const float alpha = relaxed_min_weight(d, r), sign = (code & 1) ? 1.0f : -1.0f;
        c = (code & 1) ? alpha : 1.0f - alpha;
        slope = relaxed_min_slope(d, r);
        dd_sign = (code & 2) ? -1.0f : 1.0f;  // d = x[hi] - x[lo]
        part += sign * t.g[w] * (x_w - x_p);
      }
      t.part[w] = part;
    }
    __syncthreads();
    float g_next = 0.0f;
    if (wire) {
      const float alpha_grad = t.part[w] + t.part[p];
      g_next = mix(c, t.g[w], t.g[p]) + (p != w ? dd_sign * alpha_grad * slope : 0.0f);
    }
    __syncthreads();
    if (wire) t.g[w] = g_next;
    __syncthreads();
  }
  if (wire && w < n) grad_x[row * n + w] = t.g[w];
}

template <bool NECO>
__global__ void __launch_bounds__(THREADS)
    soft_sort_backward_kernel(RowsView xv, OutputAdjoint adjoint, SortingNetwork net, Relaxation r, int rows,
                              int tiles, float* workspace, float* grad_x) {
  extern __shared__ float shared[];
  Tile t = make_tile(shared, static_cast<int>(net.wires), rows);
  const Scratch s = make_scratch(workspace, net, rows);
  const int64_t n = xv.n;
  for (int64_t row = blockIdx.x; row < xv.rows; row += gridDim.x) {
    for (int tile = 0; tile < tiles; ++tile) {
      if (NECO) {
        sort_tile(t, net, adjoint.r_teacher, adjoint.teacher, row, tile * rows);
        copy_floats(t.P(t.cur), t.G(0), t.size());
        __syncthreads();
        // The student's final P for the adjoint (tile_backward reruns it with checkpoints).
        sort_tile(t, net, r, xv, row, tile * rows);
        neco_adjoint(t, adjoint.grad_rows[row], n, tile * rows);
      } else {
        load_grad_P(t, adjoint.grad_P, row, tile * rows);
      }
      __syncthreads();
      tile_backward(t, s, net, r, xv, row, tile * rows, tile == 0);
    }
    value_backward(t, s, net, r, NECO ? RowsView{} : adjoint.grad_sorted, row, n, grad_x);
    __syncthreads();  // the next row reuses the scratch and shared memory
  }
}

// ----------------------------------------------------------------------------- launchers

void check_launch(const char* what) {
  const cudaError_t error = cudaGetLastError();
  if (error != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(error));
}

void check_wires(const SortingNetwork& net) {
  if (net.wires < 2 || net.wires > SOFT_SORT_MAX_WIRES_CUDA)
    throw std::invalid_argument("fastssl._C soft sort: the CUDA kernels take 2 <= N <= " +
                                std::to_string(SOFT_SORT_MAX_WIRES_CUDA) + " wires");
}

template <typename Kernel>
void allow_shared(Kernel kernel, size_t bytes) {
  const cudaError_t error = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                 static_cast<int>(bytes));
  if (error != cudaSuccess) throw std::runtime_error(std::string("fastssl._C soft sort: ") + cudaGetErrorString(error));
}

int tiles_for(int64_t n, int rows) { return static_cast<int>((n + rows - 1) / rows); }

int64_t backward_blocks(int64_t rows) {
  int device = 0, sms = 1;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  return std::max<int64_t>(1, std::min<int64_t>(rows, int64_t{BLOCKS_PER_SM} * sms));
}

Relaxation relaxation(const SortingNetwork& net, float steepness) {
  return Relaxation{steepness, net.art_lambda, net.distribution};
}

template <bool NECO>
void launch_backward(const RowsView& x, const OutputAdjoint& adjoint, const SortingNetwork& net, float steepness,
                     uintptr_t grad_x, uintptr_t workspace, uintptr_t stream) {
  check_wires(net);
  if (x.rows == 0) return;
  const int rows = tile_rows_for(net.wires);
  const size_t bytes = shared_bytes(net.wires, rows, 2);
  allow_shared(soft_sort_backward_kernel<NECO>, bytes);
  soft_sort_backward_kernel<NECO><<<backward_blocks(x.rows), THREADS, bytes, reinterpret_cast<cudaStream_t>(stream)>>>(
      x, adjoint, net, relaxation(net, steepness), rows, tiles_for(x.n, rows), reinterpret_cast<float*>(workspace),
      reinterpret_cast<float*>(grad_x));
  check_launch(NECO ? "neco_loss_backward_cuda" : "soft_sort_backward_cuda");
}

}  // namespace

int64_t soft_sort_workspace_floats_cuda(int64_t rows, const SortingNetwork& net) {
  check_wires(net);
  return backward_blocks(rows) * scratch_floats(net, tile_rows_for(net.wires));
}

void soft_sort_forward_cuda(const RowsView& x, const SortingNetwork& net, float steepness, uintptr_t x_sorted,
                            uintptr_t P, uintptr_t stream) {
  check_wires(net);
  if (x.rows == 0) return;
  const int rows = tile_rows_for(net.wires), tiles = tiles_for(x.n, rows);
  const size_t bytes = shared_bytes(net.wires, rows, 0);
  allow_shared(soft_sort_forward_kernel, bytes);
  soft_sort_forward_kernel<<<x.rows * tiles, THREADS, bytes, reinterpret_cast<cudaStream_t>(stream)>>>(
      x, net, relaxation(net, steepness), rows, tiles, reinterpret_cast<float*>(x_sorted), reinterpret_cast<float*>(P));
  check_launch("soft_sort_forward_cuda");
}

void soft_sort_backward_cuda(const RowsView& x, const RowsView& grad_sorted, const MatricesView& grad_P,
                             const SortingNetwork& net, float steepness, uintptr_t grad_x, uintptr_t workspace,
                             uintptr_t stream) {
  const OutputAdjoint adjoint{grad_sorted, grad_P, RowsView{}, Relaxation{}, nullptr};
  launch_backward<false>(x, adjoint, net, steepness, grad_x, workspace, stream);
}

void neco_loss_forward_cuda(const RowsView& student, const RowsView& teacher, const SortingNetwork& net,
                            float steepness_student, float steepness_teacher, uintptr_t loss, uintptr_t stream) {
  check_wires(net);
  if (student.rows == 0) return;
  const int rows = tile_rows_for(net.wires);
  const size_t bytes = shared_bytes(net.wires, rows, 1);
  allow_shared(neco_forward_kernel, bytes);
  neco_forward_kernel<<<student.rows, THREADS, bytes, reinterpret_cast<cudaStream_t>(stream)>>>(
      student, teacher, net, relaxation(net, steepness_student), relaxation(net, steepness_teacher), rows,
      tiles_for(student.n, rows), reinterpret_cast<float*>(loss));
  check_launch("neco_loss_forward_cuda");
}

void neco_loss_backward_cuda(const RowsView& student, const RowsView& teacher, const SortingNetwork& net,
                             float steepness_student, float steepness_teacher, uintptr_t grad_rows,
                             uintptr_t grad_student, uintptr_t workspace, uintptr_t stream) {
  const OutputAdjoint adjoint{RowsView{}, MatricesView{}, teacher, relaxation(net, steepness_teacher),
                              reinterpret_cast<const float*>(grad_rows)};
  launch_backward<true>(student, adjoint, net, steepness_student, grad_student, workspace, stream);
}

}  // namespace fastssl
