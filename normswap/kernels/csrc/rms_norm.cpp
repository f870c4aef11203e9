// Fused RMSNorm for CPU: y = x * rsqrt(mean(x^2) + eps) * weight + bias over the last dimension.
//
// Why this exists: on CPU F.rms_norm is a composite of ~7 ATen ops (pow, mean, add, rsqrt, mul, mul, cast), each a
// full pass over the tensor plus a temporary, so it runs ~3x slower than F.layer_norm. Here each row is read once
// for the sum of squares and a second time, while still hot in L1/L2, for the write pass, so the tensor makes one
// trip through memory, like a copy. Low-precision inputs are widened to fp32 in registers and rounded back once.
//
// The file is compiled by torch.utils.cpp_extension.load (normswap/kernels/_build.py) with -DCPU_CAPABILITY=
// <AVX512|AVX2|DEFAULT> and the matching -m flags, chosen at load time from torch's own CPU capability check (plus
// -mavx512bf16 where the CPU has it); the level is part of the extension name, so a build cache shared between
// machines never loads AVX512 code on a CPU without it. Never -march=native, for the same reason.

// Deliberately narrow includes instead of <torch/extension.h>: the C++ frontend it pulls in triples the first-use
// compile time (~18 s -> ~5 s of header parsing) for nothing this file uses.
#include <torch/csrc/utils/pybind.h>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <type_traits>

namespace {

using at::vec::Vectorized;
using fVec = Vectorized<float>;
constexpr int64_t kV = fVec::size();  // floats per vector register
constexpr int64_t kBlock = 4 * kV;    // elements per unrolled step: 4 independent accumulators hide FMA latency

// ---- load / store helpers: every dtype is seen by the kernels as fp32 vectors ----------------------------------

template <typename T>
struct Io;

template <>
struct Io<float> {
  static inline void load4(const float* p, fVec (&v)[4]) {
    for (int i = 0; i < 4; ++i) v[i] = fVec::loadu(p + i * kV);
  }
  static inline void store4(float* p, const fVec (&v)[4]) {
    for (int i = 0; i < 4; ++i) v[i].store(p + i * kV);
  }
  // n <= kV; lanes past n load as zero, so they add nothing to a sum.
  static inline fVec load1(const float* p, int64_t n) { return fVec::loadu(p, n); }
  static inline void store1(float* p, const fVec& v, int64_t n) { v.store(p, n); }
};

template <typename T>
struct IoReduced {  // bf16 / fp16: one reduced vector holds two float vectors' worth of elements
  using rVec = Vectorized<T>;
  static_assert(rVec::size() == 2 * kV, "reduced-precision vector must hold two float vectors");
  static inline void load4(const T* p, fVec (&v)[4]) {
    std::tie(v[0], v[1]) = at::vec::convert_to_float<T>(rVec::loadu(p));
    std::tie(v[2], v[3]) = at::vec::convert_to_float<T>(rVec::loadu(p + 2 * kV));
  }
  static inline void store4(T* p, const fVec (&v)[4]) {
    at::vec::convert_from_float<T>(v[0], v[1]).store(p);
    at::vec::convert_from_float<T>(v[2], v[3]).store(p + 2 * kV);
  }
  static inline fVec load1(const T* p, int64_t n) {
    return std::get<0>(at::vec::convert_to_float<T>(rVec::loadu(p, n)));
  }
  static inline void store1(T* p, const fVec& v, int64_t n) { at::vec::convert_from_float<T>(v, v).store(p, n); }
};

template <>
struct Io<at::Half> : IoReduced<at::Half> {};

#if defined(CPU_CAPABILITY_AVX512) && defined(__AVX512BF16__)
// CPUs with AVX512-BF16 round fp32 -> bf16 in one instruction (round-to-nearest-even, like c10::BFloat16), instead
// of the ~8 integer ops per vector of the portable path; that conversion is most of the bf16 write-pass cost. The one
// difference: the instruction flushes results below bf16's normal range (|y| < 1.2e-38) to zero.
template <>
struct Io<at::BFloat16> : IoReduced<at::BFloat16> {
  static inline void store4(at::BFloat16* p, const fVec (&v)[4]) {
    _mm512_storeu_si512(p, (__m512i)_mm512_cvtne2ps_pbh(v[1], v[0]));
    _mm512_storeu_si512(p + 2 * kV, (__m512i)_mm512_cvtne2ps_pbh(v[3], v[2]));
  }
  static inline void store1(at::BFloat16* p, const fVec& v, int64_t n) {
    const __mmask16 mask = static_cast<__mmask16>((1u << n) - 1u);  // n <= 16
    _mm256_mask_storeu_epi16(p, mask, (__m256i)_mm512_cvtneps_pbh(v));
  }
};
#else
template <>
struct Io<at::BFloat16> : IoReduced<at::BFloat16> {};
#endif

// Sum of squares does not care about element order, so bf16 can skip the order-preserving widening: the high half
// of each 32-bit lane already is the odd element as fp32 (mask the low half off) and shifting left by 16 gives the
// even one. Two integer ops per 32 elements instead of five.
template <typename T>
inline void load4_any_order(const T* p, fVec (&v)[4]) {
  Io<T>::load4(p, v);
}
#if defined(CPU_CAPABILITY_AVX512)
template <>
inline void load4_any_order<at::BFloat16>(const at::BFloat16* p, fVec (&v)[4]) {
  const __m512i hi_mask = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
  for (int i = 0; i < 2; ++i) {
    const __m512i r = _mm512_loadu_si512(p + i * 2 * kV);
    v[2 * i] = fVec(_mm512_castsi512_ps(_mm512_slli_epi32(r, 16)));
    v[2 * i + 1] = fVec(_mm512_castsi512_ps(_mm512_and_si512(r, hi_mask)));
  }
}
#endif

inline float hsum(const fVec& v) {
  return at::vec::vec_reduce_all<float>([](fVec& a, fVec& b) { return a + b; }, v);
}

// Rows per parallel task: at least ~16K elements so a tiny input is not split across threads for nothing.
inline int64_t row_grain(int64_t H) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(H, 1)); }

constexpr int64_t kCacheLine = 64;

// Prefetch the cache lines of one kBlock-element block starting at p into L2. L2 rather than L1: an L1 prefetch
// holds one of the core's few L1 fill buffers for the whole trip from memory, competing with the demand loads of
// the pass in progress; measured, L2 prefetch was 5-15% faster than L1 prefetch at the benchmarked shapes.
template <typename T>
inline void prefetch_block(const T* p) {
  const char* c = reinterpret_cast<const char*>(p);
  constexpr int64_t bytes = kBlock * static_cast<int64_t>(sizeof(T));
  for (int64_t o = 0; o < bytes; o += kCacheLine) __builtin_prefetch(c + o, 0, 2);
}

// ---- forward ----------------------------------------------------------------------------------------------------

template <typename T>
inline float row_sum_squares(const T* x, int64_t H) {
  fVec acc[4] = {fVec(0.f), fVec(0.f), fVec(0.f), fVec(0.f)};
  fVec v[4];
  int64_t j = 0;
  for (; j + kBlock <= H; j += kBlock) {
    load4_any_order<T>(x + j, v);
    for (int i = 0; i < 4; ++i) acc[i] = at::vec::fmadd(v[i], v[i], acc[i]);
  }
  for (; j < H; j += kV) {
    const int64_t n = std::min(kV, H - j);
    const fVec a = Io<T>::load1(x + j, n);
    acc[0] = at::vec::fmadd(a, a, acc[0]);
  }
  return hsum((acc[0] + acc[1]) + (acc[2] + acc[3]));
}

// PT is the parameters' dtype: T itself (a bf16 model's own bf16 weights, widened in registers like x) or float.
template <typename T, typename PT, bool HAS_W, bool HAS_B>
void forward_rows(const T* x, int64_t x_row_stride, T* y, const PT* w, const PT* b, float* rstd_out, int64_t N,
                  int64_t H, float eps) {
  const float inv_h = 1.0f / static_cast<float>(H);
  at::parallel_for(0, N, row_grain(H), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* xr = x + r * x_row_stride;
      T* yr = y + r * H;
      const float rs = 1.0f / std::sqrt(row_sum_squares(xr, H) * inv_h + eps);
      if (rstd_out != nullptr) rstd_out[r] = rs;
      const fVec rsv(rs);
      fVec v[4], wv[4], bv[4];
      int64_t j = 0;
      const T* next = r + 1 < end ? xr + x_row_stride : nullptr;
      // Write pass: the row was just read, so it comes from L1/L2 rather than memory. Meanwhile the next row is
      // prefetched, block by block, so memory keeps streaming while this pass only touches cache; without it the
      // two passes alternate between memory-bound and cache-bound (measured: 2-14% slower in fp32, 10-25% in bf16).
      for (; j + kBlock <= H; j += kBlock) {
        if (next != nullptr) prefetch_block(next + j);
        Io<T>::load4(xr + j, v);
        if constexpr (HAS_W) Io<PT>::load4(w + j, wv);
        if constexpr (HAS_B) Io<PT>::load4(b + j, bv);
        for (int i = 0; i < 4; ++i) {
          const fVec t = v[i] * rsv;
          if constexpr (HAS_W && HAS_B) {
            v[i] = at::vec::fmadd(t, wv[i], bv[i]);
          } else if constexpr (HAS_W) {
            v[i] = t * wv[i];
          } else if constexpr (HAS_B) {
            v[i] = t + bv[i];
          } else {
            v[i] = t;
          }
        }
        Io<T>::store4(yr + j, v);
      }
      for (; j < H; j += kV) {
        const int64_t n = std::min(kV, H - j);
        fVec t = Io<T>::load1(xr + j, n) * rsv;
        if constexpr (HAS_W && HAS_B) {
          t = at::vec::fmadd(t, Io<PT>::load1(w + j, n), Io<PT>::load1(b + j, n));
        } else if constexpr (HAS_W) {
          t = t * Io<PT>::load1(w + j, n);
        } else if constexpr (HAS_B) {
          t = t + Io<PT>::load1(b + j, n);
        }
        Io<T>::store1(yr + j, t, n);
      }
    }
  });
}

// ---- backward ---------------------------------------------------------------------------------------------------
//
// With xh = x * rstd and g = dy * w:
//   dx = rstd * (g - xh * mean(g * xh)) = rstd * g - x * (rstd^3 / H) * sum(g * x)
//   dw = sum_rows(dy * xh),  db = sum_rows(dy)
// dw/db are accumulated per task into private fp32 rows and summed at the end, so the result does not depend on
// thread scheduling (tasks are fixed row ranges).

constexpr int64_t kRowBlock = 64;

// total += block; block = 0. No-op for a gradient that is not wanted (nullptr).
inline void fold_into(float* total, float* block, int64_t H) {
  if (total == nullptr) return;
  int64_t j = 0;
  for (; j + kV <= H; j += kV) {
    (fVec::loadu(total + j) + fVec::loadu(block + j)).store(total + j);
    fVec(0.f).store(block + j);
  }
  for (; j < H; ++j) {
    total[j] += block[j];
    block[j] = 0.f;
  }
}

// Backward when only dweight/dbias are wanted (frozen input, e.g. adapter-style fine-tuning): no row reduction,
// so a single row-major pass of x and dy, streaming from memory, accumulating into private rows of H floats.
template <typename T>
void backward_params_only(const T* dy, const T* x, const float* rstd, float* dw_part, float* db_part, int64_t N,
                          int64_t H, int64_t n_tasks) {
  const int64_t rows_per_task = (N + n_tasks - 1) / n_tasks;
  at::parallel_for(0, n_tasks, 1, [&](int64_t t_begin, int64_t t_end) {
    for (int64_t task = t_begin; task < t_end; ++task) {
      // Per task: [total | block] rows of H floats. Rows accumulate into the block, the block is folded into the
      // total every kRowBlock rows: a two-level sum whose rounding error grows with N/kRowBlock + kRowBlock
      // instead of N, so dweight stays as accurate as ATen's cascaded column sum on long sequences.
      float* dw_tot = dw_part != nullptr ? dw_part + task * 2 * H : nullptr;
      float* db_tot = db_part != nullptr ? db_part + task * 2 * H : nullptr;
      float* dw_acc = dw_tot != nullptr ? dw_tot + H : nullptr;
      float* db_acc = db_tot != nullptr ? db_tot + H : nullptr;
      const int64_t r_end = std::min(N, (task + 1) * rows_per_task);
      for (int64_t r = task * rows_per_task; r < r_end; ++r) {
        if (r % kRowBlock == 0) {
          fold_into(dw_tot, dw_acc, H);
          fold_into(db_tot, db_acc, H);
        }
        const T* dyr = dy + r * H;
        const T* xr = x + r * H;
        const fVec rsv(rstd[r]);
        fVec a[4], g[4];
        int64_t j = 0;
        for (; j + kBlock <= H; j += kBlock) {
          Io<T>::load4(xr + j, a);
          Io<T>::load4(dyr + j, g);
          for (int i = 0; i < 4; ++i) {
            if (dw_acc != nullptr) {
              float* p = dw_acc + j + i * kV;
              at::vec::fmadd(g[i], a[i] * rsv, fVec::loadu(p)).store(p);
            }
            if (db_acc != nullptr) {
              float* p = db_acc + j + i * kV;
              (fVec::loadu(p) + g[i]).store(p);
            }
          }
        }
        for (; j < H; j += kV) {
          const int64_t n = std::min(kV, H - j);
          const fVec ai = Io<T>::load1(xr + j, n);
          const fVec g0 = Io<T>::load1(dyr + j, n);
          if (dw_acc != nullptr) at::vec::fmadd(g0, ai * rsv, fVec::loadu(dw_acc + j, n)).store(dw_acc + j, n);
          if (db_acc != nullptr) (fVec::loadu(db_acc + j, n) + g0).store(db_acc + j, n);
        }
      }
      fold_into(dw_tot, dw_acc, H);
      fold_into(db_tot, db_acc, H);
    }
  });
}

// sum_j(dy_j * w_j * x_j) over one row: the row reduction dx needs before any element of it can be written.
template <typename T, bool HAS_W>
inline float row_dot_gwx(const T* dy, const T* x, const float* w, int64_t H) {
  fVec acc[4] = {fVec(0.f), fVec(0.f), fVec(0.f), fVec(0.f)};
  fVec a[4], g[4];
  int64_t j = 0;
  for (; j + kBlock <= H; j += kBlock) {
    Io<T>::load4(x + j, a);
    Io<T>::load4(dy + j, g);
    for (int i = 0; i < 4; ++i) {
      if constexpr (HAS_W) g[i] = g[i] * fVec::loadu(w + j + i * kV);
      acc[i] = at::vec::fmadd(g[i], a[i], acc[i]);
    }
  }
  for (; j < H; j += kV) {
    const int64_t n = std::min(kV, H - j);
    fVec gi = Io<T>::load1(dy + j, n);
    if constexpr (HAS_W) gi = gi * fVec::loadu(w + j, n);
    acc[0] = at::vec::fmadd(gi, Io<T>::load1(x + j, n), acc[0]);
  }
  return hsum((acc[0] + acc[1]) + (acc[2] + acc[3]));
}

// Backward when dx is wanted, tiled for the cache. Row-by-row, the write pass would touch six H-length rows at once
// (x, dy, dx, w, and the dw/db accumulators), which overflows L1 for large H (that version was up to 1.45x slower
// at H = 4096 fp32). Instead, per block of R rows (R*2 rows of input sized to sit in L2):
//   pass A, row-major: the per-row reduction c_r = rstd^3 / H * sum(dy * w * x); pulls the block into L2;
//   pass B, one column tile (kBlock elements) at a time down the block's rows: dx written, dw/db partial sums and the
//   weight tile held in registers, so the only L1 traffic is the x/dy/dx tiles themselves.
// The register partials over <= R rows are then added to the task's fp32 totals: a two-level sum, so dweight's
// rounding error grows with N/R + R rather than N.
constexpr int64_t kTileBlockBytes = 256 * 1024;
constexpr int64_t kMaxTileRows = 32;

template <typename T, bool HAS_W>
void backward_tiled(const T* dy, const T* x, const float* w, const float* rstd, T* dx, float* dw_part, float* db_part,
                    int64_t N, int64_t H, int64_t n_tasks) {
  const float inv_h = 1.0f / static_cast<float>(H);
  const int64_t rows_per_task = (N + n_tasks - 1) / n_tasks;
  const int64_t R =
      std::clamp<int64_t>(kTileBlockBytes / (2 * H * static_cast<int64_t>(sizeof(T))), 1, kMaxTileRows);
  const bool need_dw = dw_part != nullptr;
  const bool need_db = db_part != nullptr;
  at::parallel_for(0, n_tasks, 1, [&](int64_t t_begin, int64_t t_end) {
    float coef[kMaxTileRows];
    for (int64_t task = t_begin; task < t_end; ++task) {
      float* dw_tot = need_dw ? dw_part + task * 2 * H : nullptr;
      float* db_tot = need_db ? db_part + task * 2 * H : nullptr;
      const int64_t r_end = std::min(N, (task + 1) * rows_per_task);
      for (int64_t r0 = task * rows_per_task; r0 < r_end; r0 += R) {
        const int64_t nb = std::min(R, r_end - r0);
        for (int64_t i = 0; i < nb; ++i) {  // pass A
          const int64_t r = r0 + i;
          const float rs = rstd[r];
          coef[i] = row_dot_gwx<T, HAS_W>(dy + r * H, x + r * H, w, H) * rs * rs * rs * inv_h;
        }
        int64_t j = 0;
        for (; j + kBlock <= H; j += kBlock) {  // pass B, full tiles
          fVec wv[4], dwv[4], dbv[4];
          for (int k = 0; k < 4; ++k) {
            wv[k] = HAS_W ? fVec::loadu(w + j + k * kV) : fVec(1.f);
            dwv[k] = fVec(0.f);
            dbv[k] = fVec(0.f);
          }
          for (int64_t i = 0; i < nb; ++i) {
            const int64_t off = (r0 + i) * H + j;
            const fVec rsv(rstd[r0 + i]);
            const fVec cv(coef[i]);
            fVec a[4], g[4];
            Io<T>::load4(x + off, a);
            Io<T>::load4(dy + off, g);
            for (int k = 0; k < 4; ++k) {
              if (need_dw) dwv[k] = at::vec::fmadd(g[k], a[k] * rsv, dwv[k]);
              if (need_db) dbv[k] = dbv[k] + g[k];
              const fVec gw = HAS_W ? g[k] * wv[k] : g[k];
              a[k] = gw * rsv - a[k] * cv;
            }
            Io<T>::store4(dx + off, a);
          }
          for (int k = 0; k < 4; ++k) {
            if (need_dw) (fVec::loadu(dw_tot + j + k * kV) + dwv[k]).store(dw_tot + j + k * kV);
            if (need_db) (fVec::loadu(db_tot + j + k * kV) + dbv[k]).store(db_tot + j + k * kV);
          }
        }
        for (; j < H; j += kV) {  // pass B, tail tiles (odd hidden sizes)
          const int64_t n = std::min(kV, H - j);
          const fVec wv = HAS_W ? fVec::loadu(w + j, n) : fVec(1.f);
          fVec dwv(0.f), dbv(0.f);
          for (int64_t i = 0; i < nb; ++i) {
            const int64_t off = (r0 + i) * H + j;
            const fVec rsv(rstd[r0 + i]);
            const fVec a = Io<T>::load1(x + off, n);
            const fVec g = Io<T>::load1(dy + off, n);
            if (need_dw) dwv = at::vec::fmadd(g, a * rsv, dwv);
            if (need_db) dbv = dbv + g;
            Io<T>::store1(dx + off, (HAS_W ? g * wv : g) * rsv - a * fVec(coef[i]), n);
          }
          if (need_dw) (fVec::loadu(dw_tot + j, n) + dwv).store(dw_tot + j, n);
          if (need_db) (fVec::loadu(db_tot + j, n) + dbv).store(db_tot + j, n);
        }
      }
    }
  });
}

// ---- tensor plumbing --------------------------------------------------------------------------------------------

// Row stride of x seen as an [N, H] matrix, or -1 if it cannot be viewed that way without a copy. Lets a slice like
// qkv[..., :H] be normalised in place of a .contiguous() copy.
int64_t row_stride_or_neg(const at::Tensor& x) {
  const int64_t d = x.dim();
  if (d == 0 || x.stride(d - 1) != 1) return -1;
  if (d == 1) return x.size(0);
  int64_t expected = -1;  // stride the next-outer dim must have
  int64_t row = -1;
  for (int64_t i = d - 2; i >= 0; --i) {
    if (x.size(i) == 1) continue;
    if (row < 0) {
      row = x.stride(i);
      if (row < x.size(d - 1)) return -1;  // rows overlap
    } else if (x.stride(i) != expected) {
      return -1;
    }
    expected = x.stride(i) * x.size(i);
  }
  return row < 0 ? x.size(d - 1) : row;
}

// Shape/device-checked, contiguous parameter (undefined if absent), in its own dtype.
at::Tensor checked_param(const std::optional<at::Tensor>& p, int64_t H, const char* name) {
  if (!p.has_value() || !p->defined()) return at::Tensor();
  TORCH_CHECK(p->dim() == 1 && p->size(0) == H, "rms_norm: ", name, " must have shape [", H, "], got ",
              p->sizes());
  TORCH_CHECK(p->device().is_cpu(), "rms_norm: ", name, " must be on CPU");
  TORCH_CHECK(at::isFloatingType(p->scalar_type()), "rms_norm: ", name, " must be floating point");
  return p->contiguous();
}

template <typename T, typename PT>
void forward_with_params(const T* x, int64_t row_stride, T* y, const PT* w, const PT* b, float* rstd, int64_t N,
                         int64_t H, float eps) {
  if (w && b) forward_rows<T, PT, true, true>(x, row_stride, y, w, b, rstd, N, H, eps);
  else if (w) forward_rows<T, PT, true, false>(x, row_stride, y, w, b, rstd, N, H, eps);
  else if (b) forward_rows<T, PT, false, true>(x, row_stride, y, w, b, rstd, N, H, eps);
  else forward_rows<T, PT, false, false>(x, row_stride, y, w, b, rstd, N, H, eps);
}

template <typename T>
const T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

// Parameters already in the input's dtype are read as they are, widened in registers: converting a bf16 model's
// weight and bias to fp32 on every call costs two allocations and two kernels, which is most of the time at decode
// sizes (one token). Any other combination is converted to fp32 once per call.
template <typename T>
void dispatch_forward(const at::Tensor& x, int64_t row_stride, at::Tensor& y, const at::Tensor& w,
                      const at::Tensor& b, float* rstd, int64_t N, int64_t H, float eps) {
  const T* xp = x.const_data_ptr<T>();
  T* yp = y.mutable_data_ptr<T>();
  const auto in_dtype = [&](const at::Tensor& p) { return !p.defined() || p.scalar_type() == x.scalar_type(); };
  if (!std::is_same_v<T, float> && in_dtype(w) && in_dtype(b)) {
    forward_with_params<T, T>(xp, row_stride, yp, ptr_or_null<T>(w), ptr_or_null<T>(b), rstd, N, H, eps);
    return;
  }
  const auto as_float = [](const at::Tensor& p) { return p.defined() ? p.to(at::kFloat).contiguous() : p; };
  const at::Tensor wf = as_float(w);
  const at::Tensor bf = as_float(b);
  forward_with_params<T, float>(xp, row_stride, yp, ptr_or_null<float>(wf), ptr_or_null<float>(bf), rstd, N, H, eps);
}

// Returns (y, rstd); rstd ([N] fp32, one per row) is only filled when save_rstd, for the fused backward.
std::tuple<at::Tensor, at::Tensor> rms_norm_forward(const at::Tensor& x_in, const std::optional<at::Tensor>& weight,
                                                     const std::optional<at::Tensor>& bias, double eps,
                                                     bool save_rstd) {
  TORCH_CHECK(x_in.device().is_cpu(), "rms_norm_forward: CPU tensors only");
  TORCH_CHECK(x_in.dim() >= 1, "rms_norm_forward: input needs at least one dimension");
  const auto dtype = x_in.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
              "rms_norm_forward: float32/bfloat16/float16 only, got ", dtype);
  const int64_t H = x_in.size(-1);
  const int64_t N = H == 0 ? 0 : x_in.numel() / H;
  int64_t row_stride = row_stride_or_neg(x_in);
  at::Tensor x = x_in;
  if (row_stride < 0) {
    x = x_in.contiguous();
    row_stride = H;
  }
  const at::Tensor w = checked_param(weight, H, "weight");
  const at::Tensor b = checked_param(bias, H, "bias");
  at::Tensor y = at::empty_like(x_in, at::MemoryFormat::Contiguous);
  at::Tensor rstd = save_rstd ? at::empty({N}, x_in.options().dtype(at::kFloat)) : at::Tensor();
  if (N == 0) return {y, rstd};
  float* rp = save_rstd ? rstd.mutable_data_ptr<float>() : nullptr;
  const float e = static_cast<float>(eps);
  switch (dtype) {
    case at::kFloat: dispatch_forward<float>(x, row_stride, y, w, b, rp, N, H, e); break;
    case at::kBFloat16: dispatch_forward<at::BFloat16>(x, row_stride, y, w, b, rp, N, H, e); break;
    default: dispatch_forward<at::Half>(x, row_stride, y, w, b, rp, N, H, e); break;
  }
  return {y, rstd};
}

// Returns (dx, dweight, dbias); an entry is an undefined tensor (None in Python) when its need_* flag is false.
std::tuple<at::Tensor, at::Tensor, at::Tensor> rms_norm_backward(const at::Tensor& dy_in, const at::Tensor& x_in,
                                                                 const std::optional<at::Tensor>& weight,
                                                                 const at::Tensor& rstd, bool need_dx, bool need_dw,
                                                                 bool need_db) {
  const auto dtype = x_in.scalar_type();
  TORCH_CHECK(x_in.device().is_cpu() && dy_in.device().is_cpu(), "rms_norm_backward: CPU tensors only");
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
              "rms_norm_backward: float32/bfloat16/float16 only, got ", dtype);
  TORCH_CHECK(dy_in.sizes() == x_in.sizes(), "rms_norm_backward: grad shape ", dy_in.sizes(), " != input shape ",
              x_in.sizes());
  const int64_t H = x_in.size(-1);
  const int64_t N = H == 0 ? 0 : x_in.numel() / H;
  TORCH_CHECK(rstd.scalar_type() == at::kFloat && rstd.numel() == N, "rms_norm_backward: bad rstd");
  const at::Tensor x = x_in.contiguous();
  const at::Tensor dy = dy_in.to(dtype).contiguous();
  const at::Tensor rs = rstd.contiguous();
  const at::Tensor w_param = checked_param(weight, H, "weight");
  const at::Tensor w = w_param.defined() ? w_param.to(at::kFloat).contiguous() : w_param;  // once per step
  need_dw = need_dw && w.defined();

  at::Tensor dx = need_dx ? at::empty_like(x) : at::Tensor();
  const int64_t n_tasks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), N / row_grain(H)));
  at::Tensor dw_part = need_dw ? at::zeros({n_tasks, 2, H}, x.options().dtype(at::kFloat)) : at::Tensor();
  at::Tensor db_part = need_db ? at::zeros({n_tasks, 2, H}, x.options().dtype(at::kFloat)) : at::Tensor();
  if (N > 0 && (need_dx || need_dw || need_db)) {
    const float* wp = ptr_or_null<float>(w);
    float* dwp = need_dw ? dw_part.mutable_data_ptr<float>() : nullptr;
    float* dbp = need_db ? db_part.mutable_data_ptr<float>() : nullptr;
    const float* rp = rs.const_data_ptr<float>();
    auto run = [&](auto tag) {
      using T = decltype(tag);
      T* dxp = need_dx ? dx.mutable_data_ptr<T>() : nullptr;
      const T* dyp = dy.const_data_ptr<T>();
      const T* xp = x.const_data_ptr<T>();
      if (!need_dx) backward_params_only<T>(dyp, xp, rp, dwp, dbp, N, H, n_tasks);
      else if (wp) backward_tiled<T, true>(dyp, xp, wp, rp, dxp, dwp, dbp, N, H, n_tasks);
      else backward_tiled<T, false>(dyp, xp, wp, rp, dxp, dwp, dbp, N, H, n_tasks);
    };
    switch (dtype) {
      case at::kFloat: run(float{}); break;
      case at::kBFloat16: run(at::BFloat16{}); break;
      default: run(at::Half{}); break;
    }
  }
  at::Tensor dw, db;
  if (need_dw) dw = dw_part.select(1, 0).sum(0).to(weight->scalar_type());
  // The caller casts db to the bias dtype: it holds the bias, this function does not.
  if (need_db) db = db_part.select(1, 0).sum(0);
  return {dx, dw, db};
}

}  // namespace

namespace py = pybind11;

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "normswap fused RMSNorm CPU kernels";
  m.def("forward", &rms_norm_forward, "fused RMSNorm forward -> (y, rstd)", py::arg("x"), py::arg("weight"),
        py::arg("bias"), py::arg("eps"), py::arg("save_rstd") = false);
  m.def("backward", &rms_norm_backward, "fused RMSNorm backward -> (dx, dweight, dbias)", py::arg("dy"),
        py::arg("x"), py::arg("weight"), py::arg("rstd"), py::arg("need_dx"), py::arg("need_dw"),
        py::arg("need_db"));
}
