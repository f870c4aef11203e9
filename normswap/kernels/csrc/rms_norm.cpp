// Fused RMSNorm for CPU: y = x * rsqrt(mean(x^2) + eps) * weight + bias over the last dimension.
//
// Why this exists: on CPU F.rms_norm is a composite of ~7 ATen ops (pow, mean, add, rsqrt, mul, mul, cast), each a
// full pass over the tensor plus a temporary, so it runs ~3x slower than F.layer_norm. Here each row is read once
// for the sum of squares and a second time, while still hot in L1/L2, for the write pass, so the tensor makes one
// trip through memory, like a copy. Low-precision inputs are widened to fp32 in registers and rounded back once.
//
// The file is compiled by torch.utils.cpp_extension.load with -DCPU_CAPABILITY=<AVX512|AVX2|DEFAULT> chosen at
// load time from torch's own CPU capability check; the capability is part of the extension name, so a build cache
// shared between machines never loads AVX512 code on a CPU without it.

#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <vector>

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
struct Io<at::BFloat16> : IoReduced<at::BFloat16> {};
template <>
struct Io<at::Half> : IoReduced<at::Half> {};

inline float hsum(const fVec& v) {
  return at::vec::vec_reduce_all<float>([](fVec& a, fVec& b) { return a + b; }, v);
}

// Rows per parallel task: at least ~16K elements so a tiny input is not split across threads for nothing.
inline int64_t row_grain(int64_t H) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(H, 1)); }

// ---- forward ----------------------------------------------------------------------------------------------------

template <typename T>
inline float row_sum_squares(const T* x, int64_t H) {
  fVec acc[4] = {fVec(0.f), fVec(0.f), fVec(0.f), fVec(0.f)};
  fVec v[4];
  int64_t j = 0;
  for (; j + kBlock <= H; j += kBlock) {
    Io<T>::load4(x + j, v);
    for (int i = 0; i < 4; ++i) acc[i] = at::vec::fmadd(v[i], v[i], acc[i]);
  }
  for (; j < H; j += kV) {
    const int64_t n = std::min(kV, H - j);
    const fVec a = Io<T>::load1(x + j, n);
    acc[0] = at::vec::fmadd(a, a, acc[0]);
  }
  return hsum((acc[0] + acc[1]) + (acc[2] + acc[3]));
}

template <typename T, bool HAS_W, bool HAS_B>
void forward_rows(const T* x, int64_t x_row_stride, T* y, const float* w, const float* b, float* rstd_out, int64_t N,
                  int64_t H, float eps) {
  const float inv_h = 1.0f / static_cast<float>(H);
  at::parallel_for(0, N, row_grain(H), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* xr = x + r * x_row_stride;
      T* yr = y + r * H;
      const float rs = 1.0f / std::sqrt(row_sum_squares(xr, H) * inv_h + eps);
      if (rstd_out != nullptr) rstd_out[r] = rs;
      const fVec rsv(rs);
      fVec v[4];
      int64_t j = 0;
      // Write pass: the row was just read, so it comes from L1/L2 rather than memory.
      for (; j + kBlock <= H; j += kBlock) {
        Io<T>::load4(xr + j, v);
        for (int i = 0; i < 4; ++i) {
          fVec t = v[i] * rsv;
          if constexpr (HAS_W) t = t * fVec::loadu(w + j + i * kV);
          if constexpr (HAS_B) t = t + fVec::loadu(b + j + i * kV);
          v[i] = t;
        }
        Io<T>::store4(yr + j, v);
      }
      for (; j < H; j += kV) {
        const int64_t n = std::min(kV, H - j);
        fVec t = Io<T>::load1(xr + j, n) * rsv;
        if constexpr (HAS_W) t = t * fVec::loadu(w + j, n);
        if constexpr (HAS_B) t = t + fVec::loadu(b + j, n);
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

template <typename T, bool HAS_W>
void backward_rows(const T* dy, const T* x, const float* w, const float* rstd, T* dx, float* dw_part, float* db_part,
                   int64_t N, int64_t H, int64_t n_tasks) {
  const float inv_h = 1.0f / static_cast<float>(H);
  const int64_t rows_per_task = (N + n_tasks - 1) / n_tasks;
  at::parallel_for(0, n_tasks, 1, [&](int64_t t_begin, int64_t t_end) {
    for (int64_t task = t_begin; task < t_end; ++task) {
      float* dw_acc = dw_part != nullptr ? dw_part + task * H : nullptr;
      float* db_acc = db_part != nullptr ? db_part + task * H : nullptr;
      const int64_t r_end = std::min(N, (task + 1) * rows_per_task);
      for (int64_t r = task * rows_per_task; r < r_end; ++r) {
        const T* dyr = dy + r * H;
        const T* xr = x + r * H;
        const float rs = rstd[r];
        const fVec rsv(rs);
        if (dx != nullptr) {
          fVec acc[4] = {fVec(0.f), fVec(0.f), fVec(0.f), fVec(0.f)};
          fVec a[4], g[4];
          int64_t j = 0;
          for (; j + kBlock <= H; j += kBlock) {
            Io<T>::load4(xr + j, a);
            Io<T>::load4(dyr + j, g);
            for (int i = 0; i < 4; ++i) {
              if constexpr (HAS_W) g[i] = g[i] * fVec::loadu(w + j + i * kV);
              acc[i] = at::vec::fmadd(g[i], a[i], acc[i]);
            }
          }
          for (; j < H; j += kV) {
            const int64_t n = std::min(kV, H - j);
            fVec gi = Io<T>::load1(dyr + j, n);
            if constexpr (HAS_W) gi = gi * fVec::loadu(w + j, n);
            acc[0] = at::vec::fmadd(gi, Io<T>::load1(xr + j, n), acc[0]);
          }
          const float c = hsum((acc[0] + acc[1]) + (acc[2] + acc[3])) * rs * rs * rs * inv_h;
          const fVec cv(c);
          T* dxr = dx + r * H;
          for (j = 0; j + kBlock <= H; j += kBlock) {
            Io<T>::load4(xr + j, a);
            Io<T>::load4(dyr + j, g);
            for (int i = 0; i < 4; ++i) {
              fVec gi = g[i];
              if constexpr (HAS_W) gi = gi * fVec::loadu(w + j + i * kV);
              if (dw_acc != nullptr) {
                float* p = dw_acc + j + i * kV;
                at::vec::fmadd(g[i], a[i] * rsv, fVec::loadu(p)).store(p);
              }
              if (db_acc != nullptr) {
                float* p = db_acc + j + i * kV;
                (fVec::loadu(p) + g[i]).store(p);
              }
              a[i] = gi * rsv - a[i] * cv;
            }
            Io<T>::store4(dxr + j, a);
          }
          for (; j < H; j += kV) {
            const int64_t n = std::min(kV, H - j);
            const fVec ai = Io<T>::load1(xr + j, n);
            const fVec g0 = Io<T>::load1(dyr + j, n);
            fVec gi = g0;
            if constexpr (HAS_W) gi = gi * fVec::loadu(w + j, n);
            if (dw_acc != nullptr) at::vec::fmadd(g0, ai * rsv, fVec::loadu(dw_acc + j, n)).store(dw_acc + j, n);
            if (db_acc != nullptr) (fVec::loadu(db_acc + j, n) + g0).store(db_acc + j, n);
            Io<T>::store1(dxr + j, gi * rsv - ai * cv, n);
          }
        } else {
          // Only parameter gradients wanted (frozen input path): one pass, no row reduction needed.
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

c10::optional<at::Tensor> as_float_param(const c10::optional<at::Tensor>& p, int64_t H, const char* name) {
  if (!p.has_value() || !p->defined()) return c10::nullopt;
  TORCH_CHECK(p->dim() == 1 && p->size(0) == H, "rms_norm: ", name, " must have shape [", H, "], got ",
              p->sizes());
  TORCH_CHECK(p->device().is_cpu(), "rms_norm: ", name, " must be on CPU");
  return p->to(at::kFloat).contiguous();
}

template <typename T>
void dispatch_forward(const at::Tensor& x, int64_t row_stride, at::Tensor& y, const float* w, const float* b,
                      float* rstd, int64_t N, int64_t H, float eps) {
  const T* xp = x.const_data_ptr<T>();
  T* yp = y.mutable_data_ptr<T>();
  if (w && b) forward_rows<T, true, true>(xp, row_stride, yp, w, b, rstd, N, H, eps);
  else if (w) forward_rows<T, true, false>(xp, row_stride, yp, w, b, rstd, N, H, eps);
  else if (b) forward_rows<T, false, true>(xp, row_stride, yp, w, b, rstd, N, H, eps);
  else forward_rows<T, false, false>(xp, row_stride, yp, w, b, rstd, N, H, eps);
}

// Returns (y, rstd); rstd ([N] fp32, one per row) is only filled when save_rstd, for the fused backward.
std::tuple<at::Tensor, at::Tensor> rms_norm_forward(const at::Tensor& x_in, const c10::optional<at::Tensor>& weight,
                                                     const c10::optional<at::Tensor>& bias, double eps,
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
  auto w = as_float_param(weight, H, "weight");
  auto b = as_float_param(bias, H, "bias");
  at::Tensor y = at::empty_like(x_in, at::MemoryFormat::Contiguous);
  at::Tensor rstd = at::empty({save_rstd ? N : 0}, x_in.options().dtype(at::kFloat));
  if (N == 0) return {y, rstd};
  const float* wp = w ? w->const_data_ptr<float>() : nullptr;
  const float* bp = b ? b->const_data_ptr<float>() : nullptr;
  float* rp = save_rstd ? rstd.mutable_data_ptr<float>() : nullptr;
  const float e = static_cast<float>(eps);
  switch (dtype) {
    case at::kFloat: dispatch_forward<float>(x, row_stride, y, wp, bp, rp, N, H, e); break;
    case at::kBFloat16: dispatch_forward<at::BFloat16>(x, row_stride, y, wp, bp, rp, N, H, e); break;
    default: dispatch_forward<at::Half>(x, row_stride, y, wp, bp, rp, N, H, e); break;
  }
  return {y, rstd};
}

// Returns (dx, dweight, dbias); an entry is an undefined tensor (None in Python) when its need_* flag is false.
std::tuple<at::Tensor, at::Tensor, at::Tensor> rms_norm_backward(const at::Tensor& dy_in, const at::Tensor& x_in,
                                                                 const c10::optional<at::Tensor>& weight,
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
  auto w = as_float_param(weight, H, "weight");
  need_dw = need_dw && w.has_value();

  at::Tensor dx = need_dx ? at::empty_like(x) : at::Tensor();
  const int64_t n_tasks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), N / row_grain(H)));
  at::Tensor dw_part = need_dw ? at::zeros({n_tasks, H}, x.options().dtype(at::kFloat)) : at::Tensor();
  at::Tensor db_part = need_db ? at::zeros({n_tasks, H}, x.options().dtype(at::kFloat)) : at::Tensor();
  if (N > 0 && (need_dx || need_dw || need_db)) {
    const float* wp = w ? w->const_data_ptr<float>() : nullptr;
    float* dwp = need_dw ? dw_part.mutable_data_ptr<float>() : nullptr;
    float* dbp = need_db ? db_part.mutable_data_ptr<float>() : nullptr;
    const float* rp = rs.const_data_ptr<float>();
    auto run = [&](auto tag) {
      using T = decltype(tag);
      T* dxp = need_dx ? dx.mutable_data_ptr<T>() : nullptr;
      if (wp) backward_rows<T, true>(dy.const_data_ptr<T>(), x.const_data_ptr<T>(), wp, rp, dxp, dwp, dbp, N, H, n_tasks);
      else backward_rows<T, false>(dy.const_data_ptr<T>(), x.const_data_ptr<T>(), wp, rp, dxp, dwp, dbp, N, H, n_tasks);
    };
    switch (dtype) {
      case at::kFloat: run(float{}); break;
      case at::kBFloat16: run(at::BFloat16{}); break;
      default: run(at::Half{}); break;
    }
  }
  at::Tensor dw, db;
  if (need_dw) dw = dw_part.sum(0).to(weight->scalar_type());
  if (need_db) db = db_part.sum(0);  // caller casts to the bias dtype (it holds the bias, this function does not)
  if (need_dx) dx = dx.view(x_in.sizes());
  return {dx, dw, db};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "normswap fused RMSNorm CPU kernels";
  m.def("forward", &rms_norm_forward, "fused RMSNorm forward -> (y, rstd)", py::arg("x"), py::arg("weight"),
        py::arg("bias"), py::arg("eps"), py::arg("save_rstd") = false);
  m.def("backward", &rms_norm_backward, "fused RMSNorm backward -> (dx, dweight, dbias)", py::arg("dy"),
        py::arg("x"), py::arg("weight"), py::arg("rstd"), py::arg("need_dx"), py::arg("need_dw"),
        py::arg("need_db"));
}
