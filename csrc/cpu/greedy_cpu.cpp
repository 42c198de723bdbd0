// CPU implementations of the gfs operators (schemas in csrc/ops.cpp).
//
// One streaming pass over U per greedy step: the threads share out blocks of rows (candidates);
// for each row a thread computes e_j = <r, u_j> with AVX2/FMA, and in the same pass the
// score a_j - 2 t e_j, its masked argmin (ties to the lowest index) and max_j e_j (for the
// Frank-Wolfe gap). Nothing of size N x M is written. The whole k-step loop runs inside one
// OpenMP parallel region with no barrier per step: threads claim chunks of rows, and one that
// waits too long on another's chunk computes it itself (see greedy_uniform_impl).
//
// Determinism of ties: every row's dot product is computed by the same sequence of operations
// (same accumulators, same chunking from the row's first element, unaligned loads and no
// alignment peeling, same final reduction), whatever its address, its thread or whether it
// was processed alone or in a group of rows sharing the loads of r. Identical rows therefore
// give bit-identical e_j and identical scores, and the argmin sends exact ties to the lowest
// index, as the uniform rule's stream_loop in python/gfs/engines/uniform.py (the definition these
// kernels follow).
//
// Safety (docs/design.md section 3): nothing inside a parallel region allocates or throws. The outputs
// (k entries each, checked) and every thread's scratch are allocated before the region; Ctrl-C is
// polled by thread 0 (the caller's thread) once per step, and every thread leaves the loop at
// its next check (see greedy_uniform_impl and csrc/cpu/interrupt.h).
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <immintrin.h>
#include <x86intrin.h>
#include <omp.h>
#include <torch/library.h>
#include <torch/types.h>

#include "interrupt.h"

#include <algorithm>
#include <atomic>
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
// No barrier per step (a thread that the OS deschedules must not stall the others: on a machine
// where another process holds a core, a per-step barrier made 2 threads 2x-6x slower than 1):
// - Pass p (p = 0: norms, b and a_j; p >= 1: e = U r_p) is cut into C chunks of rows. Threads
//   claim chunks from one shared counter, compute each chunk's partial (argmin, max e) and
//   publish it in their own slot for that chunk, tagged with p (a seqlock).
// - A thread that finds every chunk of pass p claimed waits for the others' chunks; when one is
//   not published within about two chunk times (its owner was descheduled), the thread computes
//   that chunk itself. Every row's arithmetic is the same whoever computes it (see the file
//   comment), so the copies are bit-identical and either one may be combined.
// - Every thread combines the chunk partials of pass p in chunk order (the pick: ties to the
//   lowest index, as a sequential scan) and updates its own copy of z, r (and without
//   replacement its mask), identically. The pick of step t, its loss and the gap it closes are
//   written to the outputs (identical values from any thread), then `progress` (picks known)
//   is raised.
// - A thread that was descheduled and comes back behind (progress > its step) does not
//   recompute passes: it reads the picks it missed from the outputs and replays the O(M) update
//   of z and r for each, then joins the current pass.
// The only waits left are on chunks of the pass at hand, bounded by the helping, and the join at
// the end of the parallel region (once per call).
//
// Interrupts: thread 0 (the caller's thread, the only one that can see Python's signals) polls
// once per step it takes and raises `stop`; every thread checks it at each step and while it
// waits, and leaves; the caller then raises (the outputs are dropped).
//
// Nothing in the parallel region allocates or throws: the outputs (k entries), every thread's z,
// r and mask, the slots and a_j are allocated before it.
struct StepOut {
  int64_t* picks;
  double* losses;
  double* gaps;
  int64_t steps = 0;  // steps taken, set after the loop
};

// A chunk's partial of one pass, as one thread published it. seq = 2 p + 2: holds pass p's
// partial; odd: being rewritten. Only its owner thread writes a slot.
struct alignas(64) Slot {
  std::atomic<int64_t> seq{0};
  std::atomic<double> best{0.0};
  std::atomic<int64_t> best_j{-1};
  std::atomic<double> max_e{0.0};
  std::atomic<bool> has_e{false};

  void publish(int64_t pass, const Partial& p) {
    seq.store(2 * pass + 1, std::memory_order_relaxed);
    std::atomic_thread_fence(std::memory_order_release);
    best.store(p.best, std::memory_order_relaxed);
    best_j.store(p.best_j, std::memory_order_relaxed);
    max_e.store(p.max_e, std::memory_order_relaxed);
    has_e.store(p.has_e, std::memory_order_relaxed);
    seq.store(2 * pass + 2, std::memory_order_release);
  }
  bool holds(int64_t pass) const { return seq.load(std::memory_order_acquire) == 2 * pass + 2; }
  // Copies pass `pass`'s partial into p; false if the slot holds another pass (or is being
  // rewritten, which only happens once its owner has moved past `pass`).
  bool read(int64_t pass, Partial& p) const {
    const int64_t s = seq.load(std::memory_order_acquire);
    if (s != 2 * pass + 2) return false;
    p.best = best.load(std::memory_order_relaxed);
    p.best_j = best_j.load(std::memory_order_relaxed);
    p.max_e = max_e.load(std::memory_order_relaxed);
    p.has_e = has_e.load(std::memory_order_relaxed);
    std::atomic_thread_fence(std::memory_order_acquire);
    return seq.load(std::memory_order_relaxed) == s;
  }
};

struct alignas(64) SharedCounter {
  std::atomic<int64_t> v{0};
};

// Rows per chunk: a multiple of kRows, at least one chunk per thread, about kChunksPerThread
// chunks per thread on large passes, and between kMinChunkBytes (a chunk's claim, publication
// and combination cost ~0.1-0.5 us; small passes get one chunk per thread, like a static split)
// and kMaxChunkBytes of U (the end of a pass waits for at most one chunk of another thread).
constexpr int64_t kChunksPerThread = 16;
constexpr int64_t kMinChunkBytes = int64_t(1) << 19;
constexpr int64_t kMaxChunkBytes = int64_t(1) << 22;

int64_t rows_per_chunk(int64_t N, int64_t row_bytes, int nt) {
  if (nt <= 1) return N;
  const int64_t total = N * row_bytes;
  const int64_t target = std::clamp(total / (nt * kChunksPerThread), kMinChunkBytes, kMaxChunkBytes);
  const auto round_up = [](int64_t r) { return (r + kRows - 1) / kRows * kRows; };
  const int64_t r = round_up(std::max<int64_t>(1, (target + row_bytes - 1) / row_bytes));
  return std::min({r, round_up((N + nt - 1) / nt), N});
}

GFS_INLINE uint64_t ticks() { return __rdtsc(); }

template <typename T>
void greedy_uniform_impl(const at::Tensor& U, const at::Tensor& y, int64_t k, bool replacement, double stop_loss,
                         StepOut& out, gfs_native::Interrupt& interrupt) {
  using S = typename Traits<T>::Vec::S;
  const char* op = "greedy_uniform";
  const int64_t N = U.size(0), M = U.size(1);
  const T* u = reinterpret_cast<const T*>(U.const_data_ptr());
  const S* yp = y.const_data_ptr<S>();
  int nt = num_threads_for(N, M);
  const int64_t R = rows_per_chunk(N, M * int64_t(sizeof(T)), nt);
  const int64_t C = (N + R - 1) / R;  // chunks per pass
  nt = int(std::min<int64_t>(nt, C));
  auto a_buf = gfs_native::checked_array<double>(N, op, "the scores a_j");
  auto slot_buf = gfs_native::checked_array<Slot>(C * nt, op, "the per-chunk partials");
  double* a = a_buf.get();
  Slot* slots = slot_buf.get();  // [chunk][thread]
  // Every thread's state: z (float64) and r (accumulation type), M each, and without replacement
  // the mask of taken candidates, N each; rows padded to cache lines, first touched by their thread.
  const int64_t ldz = (M + 7) / 8 * 8, ldr = (M + 15) / 16 * 16, ldt = replacement ? 0 : (N + 63) / 64 * 64;
  auto z_buf = gfs_native::checked_array<double>(nt * ldz, op, "the per-thread z");
  auto r_buf = gfs_native::checked_array<S>(nt * ldr, op, "the per-thread residual");
  auto taken_buf = gfs_native::checked_array<uint8_t>(nt * ldt, op, "the per-thread masks");
  const double inf = std::numeric_limits<double>::infinity();
  // claim = (pass + 1) * 2^24 + the next unclaimed chunk of that pass; progress = picks known;
  // finished = steps taken, once the last gap is written (0 before); stop: interrupted.
  constexpr int64_t kClaimBits = 24;
  SharedCounter claim, progress, finished, stop;
  const int64_t cmax = int64_t(1) << kClaimBits;
  if (C >= cmax) {  // unreachable for any N that fits in memory with >= 8 rows a chunk; be safe
    nt = 1;
  }

#pragma omp parallel num_threads(nt)
  {
    const int nth = omp_get_num_threads(), tid = omp_get_thread_num();
    double* z = z_buf.get() + tid * ldz;
    S* rs = r_buf.get() + tid * ldr;  // fully written by update_residual before any read
    uint8_t* taken = taken_buf.get() + tid * ldt;
    std::fill(z, z + M, 0.0);
    if (!replacement) std::fill(taken, taken + N, uint8_t(0));
    double rz = 0;       // r.z at the current z
    int64_t t = 0;       // the step this thread is at (its z is z_t)
    bool last = false;   // step t - 1 was the last: the pass at hand gives the last gap only
    double chunk_ticks = 0;  // this thread's recent time for one chunk (for the grace period)

    auto picks_ref = [&](int64_t i) { return std::atomic_ref<int64_t>(out.picks[i]); };
    auto behind = [&](int64_t pass) {
      return stop.v.load(std::memory_order_relaxed) != 0 || finished.v.load(std::memory_order_acquire) != 0 ||
             (!last && progress.v.load(std::memory_order_acquire) > pass);
    };
    auto published = [&](int64_t c, int64_t pass) {
      for (int i = 0; i < nth; ++i)
        if (slots[c * nth + i].holds(pass)) return true;
      return false;
    };
    // Chunk c of pass `pass` into this thread's slot; `helping`: give up as soon as another
    // thread publishes it (or this thread is behind). Returns whether it published.
    auto compute_chunk = [&](int64_t c, int64_t pass, bool helping) -> bool {
      const int64_t lo = c * R, hi = std::min(N, lo + R);
      const uint64_t t0 = ticks();
      Partial mine;
      mine.reset();
      bool ok = true;
      // the scan, row group by row group; between groups a helper checks whether to give up
      auto scan = [&](auto&& each_group) {
        for (int64_t g = lo; g < hi; g += kRows) {
          if (helping && (published(c, pass) || behind(pass))) {
            ok = false;
            return;
          }
          each_group(g, std::min(hi, g + kRows));
        }
      };
      if (pass == 0) {
        scan([&](int64_t g0, int64_t g1) {
          for_each_norm_and_b(u, M, yp, g0, g1, [&](int64_t j, S nj, S bj) {
            const double aj = mul_sub(double(nj), 2.0, double(bj));
            std::atomic_ref<double>(a[j]).store(aj, std::memory_order_relaxed);
            mine.offer(aj, j);
          });
        });
      } else if (last) {
        scan([&](int64_t g0, int64_t g1) {
          for_each_dot(u, M, rs, g0, g1, [&](int64_t, S e) { mine.offer_e(double(e)); });
        });
      } else {
        const double two_t = 2.0 * double(pass);
        auto aj = [&](int64_t jj) { return std::atomic_ref<double>(a[jj]).load(std::memory_order_relaxed); };
        if (replacement) {
          scan([&](int64_t g0, int64_t g1) {
            for_each_dot(u, M, rs, g0, g1, [&](int64_t jj, S e) {
              mine.offer_e(double(e));
              mine.offer(mul_sub(aj(jj), two_t, double(e)), jj);
            });
          });
        } else {
          scan([&](int64_t g0, int64_t g1) {
            for_each_dot(u, M, rs, g0, g1, [&](int64_t jj, S e) {
              mine.offer_e(double(e));
              mine.offer(taken[jj] ? inf : mul_sub(aj(jj), two_t, double(e)), jj);
            });
          });
        }
      }
      if (!ok) return false;
      slots[c * nth + tid].publish(pass, mine);
      // a running estimate that a descheduled spell (milliseconds) cannot inflate at once
      const double dt = double(ticks() - t0);
      chunk_ticks = chunk_ticks == 0 ? dt : 0.75 * chunk_ticks + 0.25 * std::min(dt, 2.0 * chunk_ticks);
      return true;
    };
    // Pass `pass`: claim and compute chunks, then make sure every chunk is published (waiting
    // about two chunk times for another thread's, then computing it). False when this thread
    // should stop working on it (interrupted, finished, or behind the others).
    auto run_pass = [&](int64_t pass) -> bool {
      int64_t v = claim.v.load(std::memory_order_acquire);
      for (;;) {
        const int64_t vp = (v >> kClaimBits) - 1, next = v & (cmax - 1);
        if (vp > pass) return false;  // another thread started a later pass: this one is behind
        int64_t c, nv;
        if (vp < pass) {
          c = 0;
          nv = ((pass + 1) << kClaimBits) | 1;
        } else {
          if (next >= C) break;
          c = next;
          nv = v + 1;
        }
        if (!claim.v.compare_exchange_weak(v, nv, std::memory_order_acq_rel, std::memory_order_acquire)) continue;
        compute_chunk(c, pass, false);
        v = claim.v.load(std::memory_order_acquire);
      }
      for (int64_t c = 0; c < C; ++c) {
        if (published(c, pass)) continue;
        const uint64_t t0 = ticks();
        const double grace = 2.0 * chunk_ticks + 2000.0;
        while (!published(c, pass)) {
          if (behind(pass)) return false;
          if (double(ticks() - t0) > grace) {
            compute_chunk(c, pass, true);
            continue;  // published by this thread or the other; or behind, checked above
          }
          _mm_pause();
        }
      }
      return true;
    };
    // The chunk partials of pass `pass`, combined in chunk order.
    auto combine = [&](int64_t pass, Partial& all) -> bool {
      all.reset();
      for (int64_t c = 0; c < C; ++c) {
        Partial p;
        bool got = slots[c * nth + tid].read(pass, p);
        for (int i = 0; i < nth && !got; ++i) got = i != tid && slots[c * nth + i].read(pass, p);
        if (!got) return false;
        if (p.best_j >= 0) all.offer(p.best, p.best_j);
        if (pass > 0 && p.has_e) all.offer_e(p.max_e);
      }
      return true;
    };

    for (;;) {
      if (stop.v.load(std::memory_order_relaxed) != 0 || finished.v.load(std::memory_order_acquire) != 0) break;
      if (last) {  // the pass after the last step: the last gap
        Partial all;
        if (!run_pass(t) || !combine(t, all)) continue;
        std::atomic_ref<double>(out.gaps[t - 1]).store(2.0 * (all.max_e - rz) / double(M), std::memory_order_relaxed);
        finished.v.store(t, std::memory_order_release);
        break;
      }
      // The pick of step t: published already (this thread is behind), or from pass t.
      int64_t j;
      bool mine = false;
      if (progress.v.load(std::memory_order_acquire) > t) {
        j = picks_ref(t).load(std::memory_order_relaxed);
      } else {
        Partial all;
        if (!run_pass(t) || !combine(t, all)) continue;
        j = all.best_j;
        mine = true;
        picks_ref(t).store(j, std::memory_order_relaxed);
        if (t > 0)
          std::atomic_ref<double>(out.gaps[t - 1]).store(2.0 * (all.max_e - rz) / double(M), std::memory_order_relaxed);
      }
      if (!replacement) taken[j] = 1;
      double sl;
      update_residual(u + j * M, yp, M, t, z, rs, &sl, &rz);
      const double loss = sl / double(M);
      if (mine) {
        std::atomic_ref<double>(out.losses[t]).store(loss, std::memory_order_relaxed);
        int64_t p = progress.v.load(std::memory_order_relaxed);
        while (p < t + 1 && !progress.v.compare_exchange_weak(p, t + 1, std::memory_order_release,
                                                              std::memory_order_relaxed)) {
        }
      }
      last = loss <= stop_loss || t + 1 == k;
      if (tid == 0 && !last && interrupt.poll()) stop.v.store(1, std::memory_order_relaxed);
      ++t;
    }
  }
  out.steps = finished.v.load(std::memory_order_acquire);
  TORCH_CHECK(out.steps >= 1 || interrupt.pending(), "gfs::greedy_uniform: internal error, the loop took no step");
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
