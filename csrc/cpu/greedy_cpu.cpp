// CPU implementations of the gfs operators (schemas in csrc/ops.cpp).
//
// One streaming pass over U per greedy step: every thread owns a contiguous block of rows
// (candidates); for each row it computes e_j = <r, u_j> with AVX2/FMA, and in the same pass the
// score a_j - 2 t e_j, its masked argmin (ties to the lowest index) and max_j e_j (for the
// Frank-Wolfe gap). Nothing of size N x M is written. The whole k-step loop runs inside one
// OpenMP parallel region, with barriers between the phases of a step.
//
// Determinism of ties: every row's dot product is computed by the same sequence of operations
// (same accumulators, same chunking from the row's first element, unaligned loads and no
// alignment peeling, same final reduction), whatever its address, its thread or whether it
// was processed alone or in a group of rows sharing the loads of r. Identical rows therefore
// give bit-identical e_j and identical scores, and the argmin sends exact ties to the lowest
// index, as the uniform rule's stream_loop in python/gfs/engines/uniform.py (the definition these
// kernels follow).
//
// Safety (DESIGN.md section 3): nothing inside a parallel region allocates or throws. The outputs
// (k entries each, checked) and every thread's scratch are allocated before the region; Ctrl-C is
// polled by thread 0 (the caller's thread) once per step and acted on by all threads at the same
// step boundary (see greedy_uniform_impl and csrc/cpu/interrupt.h).
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <immintrin.h>
#include <omp.h>
#include <torch/library.h>
#include <torch/types.h>

#include "interrupt.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <vector>

namespace gfs_cpu {
namespace {

#define GFS_INLINE inline __attribute__((always_inline))

// ---------------------------------------------------------------------------------------------
// Vector traits: float accumulation (8 lanes) for float32/float16/bfloat16 storage, double
// accumulation (4 lanes) for float64 storage.
struct VecF {
  using V = __m256;
  using S = float;
  static constexpr int W = 8;
  static GFS_INLINE V zero() { return _mm256_setzero_ps(); }
  static GFS_INLINE V loadr(const float* p) { return _mm256_loadu_ps(p); }
  static GFS_INLINE V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static GFS_INLINE V add(V a, V b) { return _mm256_add_ps(a, b); }
  static GFS_INLINE S hsum(V v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
};

struct VecD {
  using V = __m256d;
  using S = double;
  static constexpr int W = 4;
  static GFS_INLINE V zero() { return _mm256_setzero_pd(); }
  static GFS_INLINE V loadr(const double* p) { return _mm256_loadu_pd(p); }
  static GFS_INLINE V fma(V a, V b, V c) { return _mm256_fmadd_pd(a, b, c); }
  static GFS_INLINE V add(V a, V b) { return _mm256_add_pd(a, b); }
  static GFS_INLINE S hsum(V v) {
    __m128d s = _mm_add_pd(_mm256_castpd256_pd128(v), _mm256_extractf128_pd(v, 1));
    s = _mm_add_sd(s, _mm_unpackhi_pd(s, s));
    return _mm_cvtsd_f64(s);
  }
};

template <typename T> struct Traits;
template <> struct Traits<float> {
  using Vec = VecF;
  static GFS_INLINE __m256 load(const float* p) { return _mm256_loadu_ps(p); }
  static GFS_INLINE float scalar(const float* p) { return *p; }
};
template <> struct Traits<c10::BFloat16> {
  using Vec = VecF;
  // bfloat16 is the upper half of a float32: widen to 32 bits and shift left by 16.
  static GFS_INLINE __m256 load(const c10::BFloat16* p) {
    __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
  static GFS_INLINE float scalar(const c10::BFloat16* p) {
    uint32_t bits = uint32_t(p->x) << 16;
    float f;
    __builtin_memcpy(&f, &bits, sizeof f);
    return f;
  }
};
template <> struct Traits<c10::Half> {
  using Vec = VecF;
  static GFS_INLINE __m256 load(const c10::Half* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  static GFS_INLINE float scalar(const c10::Half* p) { return _cvtsh_ss(p->x); }
};
template <> struct Traits<double> {
  using Vec = VecD;
  static GFS_INLINE __m256d load(const double* p) { return _mm256_loadu_pd(p); }
  static GFS_INLINE double scalar(const double* p) { return *p; }
};

template <typename S> GFS_INLINE S fma_s(S a, S b, S c) { return std::fma(a, b, c); }

constexpr int kAcc = 2;            // independent accumulators per row
constexpr int64_t kPrefetch = 256; // software prefetch distance, in bytes ahead of each row

// out[i] = <u_i, r> for the R consecutive rows starting at u (row stride M). The R rows share
// the loads of r. Per row, the arithmetic is identical for every R (see the file comment).
template <int R, typename T>
GFS_INLINE void dot_rows(const T* __restrict u, int64_t M, const typename Traits<T>::Vec::S* __restrict r,
                         typename Traits<T>::Vec::S* __restrict out) {
  using Vec = typename Traits<T>::Vec;
  using V = typename Vec::V;
  constexpr int W = Vec::W;
  constexpr int C = W * kAcc;  // elements per chunk
  constexpr int64_t pf = kPrefetch / int64_t(sizeof(T));
  V acc[R][kAcc];
  for (int i = 0; i < R; ++i)
    for (int a = 0; a < kAcc; ++a) acc[i][a] = Vec::zero();
  int64_t m = 0;
  for (; m + C <= M; m += C) {
    V rv[kAcc];
    for (int a = 0; a < kAcc; ++a) rv[a] = Vec::loadr(r + m + a * W);
    for (int i = 0; i < R; ++i) {
      const T* row = u + i * M + m;
      if (kPrefetch > 0) {
        for (int64_t b = 0; b < int64_t(C * sizeof(T)); b += 64)
          _mm_prefetch(reinterpret_cast<const char*>(row + pf) + b, _MM_HINT_T0);
      }
      for (int a = 0; a < kAcc; ++a) acc[i][a] = Vec::fma(Traits<T>::load(row + a * W), rv[a], acc[i][a]);
    }
  }
  for (; m + W <= M; m += W) {
    V rv = Vec::loadr(r + m);
    for (int i = 0; i < R; ++i) acc[i][0] = Vec::fma(Traits<T>::load(u + i * M + m), rv, acc[i][0]);
  }
  for (int i = 0; i < R; ++i) {
    V v = acc[i][0];
    for (int a = 1; a < kAcc; ++a) v = Vec::add(v, acc[i][a]);
    typename Vec::S s = Vec::hsum(v);
    for (int64_t mm = m; mm < M; ++mm) s = fma_s(Traits<T>::scalar(u + i * M + mm), r[mm], s);
    out[i] = s;
  }
}

// norms[i] = <u_i, u_i> and b[i] = <u_i, y> for the R consecutive rows starting at u, in the
// accumulation type; the rows share the loads of y, and per row the arithmetic is identical for
// every R (identical rows get identical norms and b).
template <int R, typename T>
GFS_INLINE void norm_and_b_rows(const T* __restrict u, int64_t M, const typename Traits<T>::Vec::S* __restrict y,
                                typename Traits<T>::Vec::S* norm, typename Traits<T>::Vec::S* b) {
  using Vec = typename Traits<T>::Vec;
  using V = typename Vec::V;
  constexpr int W = Vec::W;
  V nn[R], bb[R];
  for (int i = 0; i < R; ++i) nn[i] = bb[i] = Vec::zero();
  int64_t m = 0;
  for (; m + W <= M; m += W) {
    const V yv = Vec::loadr(y + m);
    for (int i = 0; i < R; ++i) {
      const V x = Traits<T>::load(u + i * M + m);
      nn[i] = Vec::fma(x, x, nn[i]);
      bb[i] = Vec::fma(x, yv, bb[i]);
    }
  }
  for (int i = 0; i < R; ++i) {
    typename Vec::S sn = Vec::hsum(nn[i]), sb = Vec::hsum(bb[i]);
    for (int64_t mm = m; mm < M; ++mm) {
      const auto x = Traits<T>::scalar(u + i * M + mm);
      sn = fma_s(x, x, sn);
      sb = fma_s(x, y[mm], sb);
    }
    norm[i] = sn;
    b[i] = sb;
  }
}

// Rows streamed together, sharing the loads of r. Measured on a 2-core EPYC (Zen 3, 4096 x 65536
// float32, one pass, both cores): 1 row 39 ms, 2 rows 34, 4 rows 32-34, 8 rows 32 (bfloat16: 24,
// 20, 17, 15.5); more concurrent streams keep more misses in flight. 16 rows spill and lose.
// Software prefetch (kPrefetch) and non-temporal hints changed little (within noise).
constexpr int kRows = 8;

// Calls f(j, e_j) for every row j in [lo, hi), in increasing j.
template <typename T, typename F>
GFS_INLINE void for_each_dot(const T* U, int64_t M, const typename Traits<T>::Vec::S* r, int64_t lo, int64_t hi,
                             F&& f) {
  typename Traits<T>::Vec::S e[kRows];
  int64_t j = lo;
  for (; j + kRows <= hi; j += kRows) {
    dot_rows<kRows>(U + j * M, M, r, e);
    for (int i = 0; i < kRows; ++i) f(j + i, e[i]);
  }
  for (; j < hi; ++j) {
    dot_rows<1>(U + j * M, M, r, e);
    f(j, e[0]);
  }
}

// Calls f(j, norm_j, b_j) for every row j in [lo, hi), in increasing j.
template <typename T, typename F>
GFS_INLINE void for_each_norm_and_b(const T* U, int64_t M, const typename Traits<T>::Vec::S* y, int64_t lo,
                                    int64_t hi, F&& f) {
  constexpr int R = 4;
  typename Traits<T>::Vec::S n[R], b[R];
  int64_t j = lo;
  for (; j + R <= hi; j += R) {
    norm_and_b_rows<R>(U + j * M, M, y, n, b);
    for (int i = 0; i < R; ++i) f(j + i, n[i], b[i]);
  }
  for (; j < hi; ++j) {
    norm_and_b_rows<1>(U + j * M, M, y, n, b);
    f(j, n[0], b[0]);
  }
}

// The running argmin of a score and max of e: torch.argmin/max semantics (a NaN wins, the
// first of equals wins). Padded to a cache line: one per thread.
struct alignas(64) Partial {
  double best = 0;
  int64_t best_j = -1;
  double max_e = 0;
  bool has_e = false;
  bool stop = false;  // thread 0's partial only: an interrupt was seen, every thread leaves

  GFS_INLINE void reset() {
    best_j = -1;
    has_e = false;
    stop = false;
  }
  GFS_INLINE void offer(double s, int64_t j) {
    if (best_j < 0 || (std::isnan(s) && !std::isnan(best)) || s < best) {
      best = s;
      best_j = j;
    }
  }
  GFS_INLINE void offer_e(double e) {
    if (!has_e || (std::isnan(e) && !std::isnan(max_e)) || e > max_e) {
      max_e = e;
      has_e = true;
    }
  }
};

GFS_INLINE int64_t block_start(int64_t n, int parts, int i) { return n * i / parts; }

int num_threads_for(int64_t N, int64_t M) {
  int nt = std::max(1, at::get_num_threads());
  // Below a few hundred kilo-elements per step, a second thread costs more than it gives.
  if (N * M < (1 << 15)) nt = 1;
  return int(std::min<int64_t>(nt, std::max<int64_t>(1, N)));
}

// ---------------------------------------------------------------------------------------------
// Argument checks (the Python API validates at its edge too; these keep the ops safe alone).
c10::ScalarType acc_type(c10::ScalarType s) { return s == at::kDouble ? at::kDouble : at::kFloat; }

void check_U(const at::Tensor& U, const char* op) {
  TORCH_CHECK(U.dim() == 2, "gfs::", op, ": U must be 2-D (N candidates x M values), got ", U.dim(), "-D");
  TORCH_CHECK(U.device().is_cpu(), "gfs::", op, ": U must be on the CPU for this kernel, got ", U.device());
  auto s = U.scalar_type();
  TORCH_CHECK(s == at::kFloat || s == at::kDouble || s == at::kHalf || s == at::kBFloat16, "gfs::", op,
              ": U must be float32, float64, float16 or bfloat16, got ", s);
  TORCH_CHECK(U.is_contiguous(), "gfs::", op, ": U must be contiguous (call .contiguous() first)");
  TORCH_CHECK(U.size(0) >= 1 && U.size(1) >= 1, "gfs::", op, ": U must have at least one row and one column, got ",
              U.sizes());
}

void check_vec(const at::Tensor& U, const at::Tensor& v, const char* op, const char* name) {
  auto want = acc_type(U.scalar_type());
  TORCH_CHECK(v.dim() == 1, "gfs::", op, ": ", name, " must be 1-D, got ", v.dim(), "-D");
  TORCH_CHECK(v.size(0) == U.size(1), "gfs::", op, ": ", name, " has length ", v.size(0),
              " but U has M = ", U.size(1), " columns");
  TORCH_CHECK(v.scalar_type() == want, "gfs::", op, ": ", name, " must be ", want, " for ", U.scalar_type(),
              " U (the accumulation dtype), got ", v.scalar_type());
  TORCH_CHECK(v.device().is_cpu(), "gfs::", op, ": ", name, " must be on the CPU, got ", v.device());
  TORCH_CHECK(v.is_contiguous(), "gfs::", op, ": ", name, " must be contiguous");
}

template <typename F>
void dispatch(c10::ScalarType s, F&& f) {
  switch (s) {
    case at::kFloat: return f(float{});
    case at::kDouble: return f(double{});
    case at::kHalf: return f(c10::Half{});
    case at::kBFloat16: return f(c10::BFloat16{});
    default: TORCH_CHECK(false, "gfs: unsupported dtype ", s);
  }
}

// ---------------------------------------------------------------------------------------------
std::tuple<at::Tensor, at::Tensor> prepare_cpu(const at::Tensor& U, const at::Tensor& y) {
  check_U(U, "prepare");
  check_vec(U, y, "prepare", "y");
  const int64_t N = U.size(0), M = U.size(1);
  auto norms = at::empty({N}, y.options());
  auto b = at::empty({N}, y.options());
  dispatch(U.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    using S = typename Traits<T>::Vec::S;
    const T* u = reinterpret_cast<const T*>(U.const_data_ptr());
    const S* yp = y.const_data_ptr<S>();
    S* np = norms.mutable_data_ptr<S>();
    S* bp = b.mutable_data_ptr<S>();
    const int nt = num_threads_for(N, M);
#pragma omp parallel num_threads(nt)
    {
      const int nth = omp_get_num_threads(), tid = omp_get_thread_num();
      for_each_norm_and_b(u, M, yp, block_start(N, nth, tid), block_start(N, nth, tid + 1), [&](int64_t j, S n, S bj) {
        np[j] = n;
        bp[j] = bj;
      });
    }
  });
  return {norms, b};
}

at::Tensor dots_cpu(const at::Tensor& U, const at::Tensor& r) {
  check_U(U, "dots");
  check_vec(U, r, "dots", "r");
  const int64_t N = U.size(0), M = U.size(1);
  auto e = at::empty({N}, r.options());
  dispatch(U.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    using S = typename Traits<T>::Vec::S;
    const T* u = reinterpret_cast<const T*>(U.const_data_ptr());
    const S* rp = r.const_data_ptr<S>();
    S* ep = e.mutable_data_ptr<S>();
    const int nt = num_threads_for(N, M);
#pragma omp parallel num_threads(nt)
    {
      const int nth = omp_get_num_threads(), tid = omp_get_thread_num();
      for_each_dot(u, M, rp, block_start(N, nth, tid), block_start(N, nth, tid + 1),
                   [&](int64_t j, S v) { ep[j] = v; });
    }
  });
  return e;
}

// Four consecutive storage values widened to double (exactly).
GFS_INLINE __m256d load4d(const float* p) { return _mm256_cvtps_pd(_mm_loadu_ps(p)); }
GFS_INLINE __m256d load4d(const double* p) { return _mm256_loadu_pd(p); }
GFS_INLINE __m256d load4d(const c10::BFloat16* p) {
  __m128i h = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  return _mm256_cvtps_pd(_mm_castsi128_ps(_mm_slli_epi32(_mm_cvtepu16_epi32(h), 16)));
}
GFS_INLINE __m256d load4d(const c10::Half* p) {
  return _mm256_cvtps_pd(_mm_cvtph_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
GFS_INLINE void store4(float* p, __m256d v) { _mm_storeu_ps(p, _mm256_cvtpd_ps(v)); }
GFS_INLINE void store4(double* p, __m256d v) { _mm256_storeu_pd(p, v); }

// a - c * e with two roundings, as torch computes it (written with intrinsics so that no
// compiler setting contracts it into one fused multiply-add).
GFS_INLINE double mul_sub(double a, double c, double e) {
  const __m128d p = _mm_mul_sd(_mm_set_sd(c), _mm_set_sd(e));
  return _mm_cvtsd_f64(_mm_sub_sd(_mm_set_sd(a), p));
}

// z <- (t z + u) / (t + 1) and r = y - z over all M, in float64 exactly as the uniform stream_loop
// (t * z, then + u, then / (t + 1): no fused multiply-add); stores z and rs = S(r) (r itself is
// only needed through rs and the two sums). Returns r.r and r.z, summed in a fixed order (every
// thread that calls this gets the same bits).
template <typename T, typename S>
GFS_INLINE void update_residual(const T* __restrict uj, const S* __restrict y, int64_t M, int64_t t,
                                double* __restrict z, S* __restrict rs, double* loss,
                                double* rz) {
  const __m256d td = _mm256_set1_pd(double(t)), t1 = _mm256_set1_pd(double(t + 1));
  __m256d l0 = _mm256_setzero_pd(), l1 = l0, q0 = l0, q1 = l0;
  int64_t m = 0;
  for (; m + 8 <= M; m += 8) {
    for (int h = 0; h < 2; ++h) {
      const int64_t i = m + 4 * h;
      const __m256d zv = _mm256_div_pd(_mm256_add_pd(_mm256_mul_pd(td, _mm256_loadu_pd(z + i)), load4d(uj + i)), t1);
      const __m256d rv = _mm256_sub_pd(load4d(y + i), zv);
      _mm256_storeu_pd(z + i, zv);
      store4(rs + i, rv);
      if (h == 0) {
        l0 = _mm256_fmadd_pd(rv, rv, l0);
        q0 = _mm256_fmadd_pd(rv, zv, q0);
      } else {
        l1 = _mm256_fmadd_pd(rv, rv, l1);
        q1 = _mm256_fmadd_pd(rv, zv, q1);
      }
    }
  }
  double sl = VecD::hsum(_mm256_add_pd(l0, l1)), sq = VecD::hsum(_mm256_add_pd(q0, q1));
  const __m128d ts = _mm_set_sd(double(t)), ts1 = _mm_set_sd(double(t + 1));
  for (; m < M; ++m) {
    const __m128d zs = _mm_div_sd(_mm_add_sd(_mm_mul_sd(ts, _mm_set_sd(z[m])), _mm_set_sd(double(Traits<T>::scalar(uj + m)))), ts1);
    const double zm = _mm_cvtsd_f64(zs);
    const double rm = _mm_cvtsd_f64(_mm_sub_sd(_mm_set_sd(double(y[m])), zs));
    z[m] = zm;
    rs[m] = S(rm);
    sl = std::fma(rm, rm, sl);
    sq = std::fma(rm, zm, sq);
  }
  *loss = sl;
  *rz = sq;
}

// The uniform rule, following python/gfs/engines/uniform.py's stream_loop step for step:
//   a_j = ||u_j||^2 - 2 b_j (float64 from the accumulated norms and b); step t picks the masked
//   argmin of a_j - 2 t e_j with e = U r_t (e = b at t = 0, where the term vanishes);
//   z_{t+1} = (t z_t + u_j) / (t + 1), r = y - z in float64; loss = r.r / M; the pass after each
//   step computes e = U float(r) once, giving both the next step's scores and the gap at z_{t+1}
//   (2 (max_j e_j - r.z) / M); the pass after the last step gives the last gap only.
//
// One barrier per step: each thread keeps its own copy of z and r (the O(M) update is done by
// every thread, identically, instead of being split and synchronised), and the per-thread
// partials of consecutive passes alternate between two buffers, so a thread that runs ahead
// never overwrites what a slower one is still reading. On shared (oversubscribed) cores every
// barrier is a chance to wait for a descheduled thread; fewer of them keep the loop robust.
//
// Interrupts ride on the same double buffer: before the barrier of step t, thread 0 (the caller's
// thread, the only one that can see Python's signals) writes its poll result into its partial of
// pass t + 1; after the barrier every thread reads that one flag, so all leave at the same step.
// Thread 0 rewrites that buffer only at step t + 2, after the next barrier, by which time every
// thread has read it.
//
// Nothing in the parallel region allocates or throws: the outputs (k entries, written by thread
// 0) and every thread's z, r and mask are allocated before it.
struct StepOut {
  int64_t* picks;
  double* losses;
  double* gaps;
  int64_t steps = 0;  // steps taken, written by thread 0 after the loop
};

template <typename T>
void greedy_uniform_impl(const at::Tensor& U, const at::Tensor& y, int64_t k, bool replacement, double stop_loss,
                         StepOut& out, gfs_native::Interrupt& interrupt) {
  using S = typename Traits<T>::Vec::S;
  const char* op = "greedy_uniform";
  const int64_t N = U.size(0), M = U.size(1);
  const T* u = reinterpret_cast<const T*>(U.const_data_ptr());
  const S* yp = y.const_data_ptr<S>();
  const int nt = num_threads_for(N, M);
  auto a_buf = gfs_native::checked_array<double>(N, op, "the scores a_j");
  auto part_buf = gfs_native::checked_array<Partial>(2 * int64_t(nt), op, "the per-thread partials");
  double* a = a_buf.get();
  Partial* part = part_buf.get();  // [pass parity][thread]
  // Every thread's state: z (float64) and r (accumulation type), M each, and without replacement
  // the mask of taken candidates, N each; rows padded to cache lines, first touched by their thread.
  const int64_t ldz = (M + 7) / 8 * 8, ldr = (M + 15) / 16 * 16, ldt = replacement ? 0 : (N + 63) / 64 * 64;
  auto z_buf = gfs_native::checked_array<double>(nt * ldz, op, "the per-thread z");
  auto r_buf = gfs_native::checked_array<S>(nt * ldr, op, "the per-thread residual");
  auto taken_buf = gfs_native::checked_array<uint8_t>(nt * ldt, op, "the per-thread masks");
  const double inf = std::numeric_limits<double>::infinity();

#pragma omp parallel num_threads(nt)
  {
    const int nth = omp_get_num_threads(), tid = omp_get_thread_num();
    const int64_t lo = block_start(N, nth, tid), hi = block_start(N, nth, tid + 1);
    double* z = z_buf.get() + tid * ldz;
    S* rs = r_buf.get() + tid * ldr;  // fully written by update_residual before any read
    uint8_t* taken = taken_buf.get() + tid * ldt;
    std::fill(z, z + M, 0.0);
    if (!replacement) std::fill(taken, taken + N, uint8_t(0));
    double rz = 0;  // r.z at the current z

    // Pass 0: norms and b, a_j, and step 0's argmin (score a_j, nothing taken yet).
    Partial* mine = &part[tid];
    mine->reset();
    for_each_norm_and_b(u, M, yp, lo, hi, [&](int64_t j, S nj, S bj) {
      a[j] = mul_sub(double(nj), 2.0, double(bj));
      mine->offer(a[j], j);
    });
#pragma omp barrier

    int64_t t = 0;
    bool interrupted = false;
    for (;; ++t) {
      // Combine the partials of pass t in thread order (every thread identically): the pick of
      // step t, and for t > 0 the max of e = U r_t for the gap at z_t.
      const Partial* last_pass = &part[(t & 1) * nt];
      Partial all;
      for (int i = 0; i < nth; ++i) {
        if (last_pass[i].best_j >= 0) all.offer(last_pass[i].best, last_pass[i].best_j);
        if (t > 0 && last_pass[i].has_e) all.offer_e(last_pass[i].max_e);
      }
      const int64_t j = all.best_j;
      if (tid == 0) {
        if (t > 0) out.gaps[t - 1] = 2.0 * (all.max_e - rz) / double(M);
        out.picks[t] = j;
      }
      if (!replacement) taken[j] = 1;

      double sl;
      update_residual(u + j * M, yp, M, t, z, rs, &sl, &rz);
      const double loss = sl / double(M);
      if (tid == 0) out.losses[t] = loss;
      const bool last = loss <= stop_loss || t + 1 == k;

      // The pass: e = U r_{t+1}; max e always, the scores of step t + 1 unless this was the last.
      mine = &part[((t + 1) & 1) * nt + tid];
      mine->reset();
      if (tid == 0 && !last) mine->stop = interrupt.poll();
      const S* rp = rs;
      if (last) {
        for_each_dot(u, M, rp, lo, hi, [&](int64_t, S e) { mine->offer_e(double(e)); });
      } else {
        const double two_t = 2.0 * double(t + 1);
        if (replacement) {
          for_each_dot(u, M, rp, lo, hi, [&](int64_t jj, S e) {
            mine->offer_e(double(e));
            mine->offer(mul_sub(a[jj], two_t, double(e)), jj);
          });
        } else {
          const uint8_t* tk = taken;
          for_each_dot(u, M, rp, lo, hi, [&](int64_t jj, S e) {
            mine->offer_e(double(e));
            mine->offer(tk[jj] ? inf : mul_sub(a[jj], two_t, double(e)), jj);
          });
        }
      }
#pragma omp barrier
      if (last) break;
      if (part[((t + 1) & 1) * nt].stop) {  // thread 0's flag, the same for every thread
        interrupted = true;
        break;
      }
    }

    if (tid == 0) {
      if (!interrupted) {
        const Partial* last_pass = &part[((t + 1) & 1) * nt];
        Partial all;
        for (int i = 0; i < nth; ++i)
          if (last_pass[i].has_e) all.offer_e(last_pass[i].max_e);
        out.gaps[t] = 2.0 * (all.max_e - rz) / double(M);
      }
      out.steps = t + 1;
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> greedy_uniform_cpu(const at::Tensor& U, const at::Tensor& y,
                                                                    int64_t k, bool replacement, double stop_loss) {
  check_U(U, "greedy_uniform");
  check_vec(U, y, "greedy_uniform", "y");
  TORCH_CHECK(k >= 1, "gfs::greedy_uniform: k must be >= 1, got ", k);
  TORCH_CHECK(replacement || k <= U.size(0), "gfs::greedy_uniform: k = ", k, " exceeds the N = ", U.size(0),
              " candidates, impossible without replacement (pass replacement=True or k <= N)");
  // The outputs, k entries each, before the loop (a k that cannot fit is refused here).
  auto outs = gfs_native::allocate_steps("greedy_uniform", k, {at::kLong, at::kDouble, at::kDouble},
                                         at::TensorOptions().device(at::kCPU));
  StepOut out{outs[0].mutable_data_ptr<int64_t>(), outs[1].mutable_data_ptr<double>(),
              outs[2].mutable_data_ptr<double>()};
  gfs_native::Interrupt interrupt(U.size(0) * U.size(1));
  dispatch(U.scalar_type(), [&](auto tag) {
    greedy_uniform_impl<decltype(tag)>(U, y, k, replacement, stop_loss, out, interrupt);
  });
  if (interrupt.pending()) interrupt.raise("greedy_uniform");
  const int64_t s = out.steps;
  return {gfs_native::shrink_steps(outs[0], s), gfs_native::shrink_steps(outs[1], s),
          gfs_native::shrink_steps(outs[2], s)};
}

}  // namespace
}  // namespace gfs_cpu

TORCH_LIBRARY_IMPL(gfs, CPU, m) {
  m.impl("prepare", &gfs_cpu::prepare_cpu);
  m.impl("dots", &gfs_cpu::dots_cpu);
  m.impl("greedy_uniform", &gfs_cpu::greedy_uniform_cpu);
}
