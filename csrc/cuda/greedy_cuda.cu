// CUDA implementations of the gfs operators (schemas in csrc/ops.cpp).
//
// The greedy step in its nearest-neighbour form (docs/design.md section 2): with S_t the sum of the t
// rows picked so far and q_t = (t+1) y - S_t, the pick of step t is
//     argmin_j  norms_j - 2 d_j,   d = U q_t        (ties to the lowest index),
// and <r_t, u_j> = (d_j - b_j) / t (b = U y) gives the Frank-Wolfe gap at z_t = S_t / t from the
// same pass. For integer-valued data q_t is an integer vector, so exact ties stay exact.
//
// One step is four launches on the current stream; each reads the step number t, the pick j*
// and the stop flag from a small device state, so the host launches the k steps without any
// synchronisation and reads the number of steps taken once, at the end:
//   dots_partial   grid (row tiles, M splits), 256 threads: 16-byte streaming loads of ROWS rows
//                  (UNROLL vectors each, all in flight before the first FMA), one read of q per
//                  ROWS rows, warp-shuffle + shared-memory block reduction, one partial per
//                  (split, row). No atomics: deterministic.
//   select         one block of 1024: sums the splits in a fixed order, scores in float64, the
//                  no-replacement mask, the argmin (value, then lowest index), max(d_j - b_j).
//   update         fixed grid over M: S += u_{j*} (float64), q <- (t+2) y - S, block partials of
//                  ||r||^2 and <r, z>.
//   loss           one block: the float64 loss ||r_{t+1}||^2 / M (fixed-order sum), t += 1,
//                  and the stop flag, after which every kernel of the later steps exits at once.
// Storage float32 / float16 / bfloat16 accumulates in float32, float64 in float64.
// Safety (docs/design.md section 3): the k-sized outputs are allocated once, checked, before the
// launches (csrc/cpu/interrupt.h: a k that cannot fit is a clean error naming k and the bytes);
// the host polls for Ctrl-C between steps, stops launching and raises KeyboardInterrupt.
// Only c10/cuda headers: ATen/cuda/CUDAContext.h pulls in cuBLAS/cuSPARSE headers, which a
// minimal CUDA toolkit (nvcc + cudart, as in CI) does not have.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include "../cpu/interrupt.h"

#include <algorithm>
#include <cstdint>
#include <limits>
#include <tuple>
#include <type_traits>

namespace gfs_cuda {
namespace {

constexpr int kThreads = 256;        // dots_partial / update block size
constexpr int kRows = 4;             // rows of U per dots_partial block (q reused kRows times)
constexpr int kUnroll = 2;           // 16-byte vectors per row per thread in flight
constexpr int kSelectThreads = 1024;
constexpr int kLossThreads = 256;
constexpr int kUpdateBlocksMax = 1024;

// state (int64): DONE, STEP (picks so far), JSTAR (last pick); fstate (double): STOP, RZ, M.
enum { kDone = 0, kStep = 1, kJstar = 2 };
enum { kStop = 0, kRz = 1, kMf = 2 };

template <typename T> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };

__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

// One vector of V elements of U: a streaming (evict-first) 16-byte load when V fills 16 bytes,
// so that the U stream does not push q out of L2.
template <typename T, int V>
__device__ __forceinline__ Pack<T, V> load_u(const T* p) {
  Pack<T, V> out;
  if constexpr (sizeof(Pack<T, V>) == 16) {
    int4 raw = __ldcs(reinterpret_cast<const int4*>(p));
    out = *reinterpret_cast<Pack<T, V>*>(&raw);
  } else {
    out = *reinterpret_cast<const Pack<T, V>*>(p);
  }
  return out;
}

template <typename A>
__device__ __forceinline__ A warp_sum(A x) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) x += __shfl_down_sync(0xffffffffu, x, off);
  return x;
}

// part[s * N + i] = sum over split s of U[i, m] v[m]; with NORMS also part2[s * N + i] = sum U^2.
// Split s covers [s * chunk, min(M, (s+1) * chunk)); chunk is a multiple of V.
template <typename T, int V, bool NORMS>
__global__ void __launch_bounds__(kThreads) dots_partial_kernel(
    const T* __restrict__ U, const typename AccOf<T>::type* __restrict__ v,
    typename AccOf<T>::type* __restrict__ part, typename AccOf<T>::type* __restrict__ part2,
    const int64_t* __restrict__ state, int64_t N, int64_t M, int64_t ld, int64_t chunk) {
  using A = typename AccOf<T>::type;
  if (state != nullptr && state[kDone] != 0) return;
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * kRows;
  const int64_t lo = static_cast<int64_t>(blockIdx.y) * chunk;
  const int64_t hi = std::min<int64_t>(M, lo + chunk);
  const T* rowp[kRows];
#pragma unroll
  for (int r = 0; r < kRows; ++r) rowp[r] = U + std::min<int64_t>(r0 + r, N - 1) * ld;  // clamped: always valid
  A acc[kRows], acc2[kRows];
#pragma unroll
  for (int r = 0; r < kRows; ++r) acc[r] = acc2[r] = A(0);

  constexpr int64_t kStride = static_cast<int64_t>(kThreads) * V;
  for (int64_t c0 = lo + static_cast<int64_t>(threadIdx.x) * V; c0 < hi; c0 += kStride * kUnroll) {
    Pack<T, V> u[kUnroll][kRows];
    Pack<A, V> q[kUnroll];
    bool ok[kUnroll];
#pragma unroll
    for (int k = 0; k < kUnroll; ++k) {  // every load of this iteration issued before any use
      const int64_t c = c0 + k * kStride;
      ok[k] = c < hi;
      const int64_t cc = ok[k] ? c : c0;  // c0 < hi: a valid address, result discarded
      q[k] = *reinterpret_cast<const Pack<A, V>*>(v + cc);
#pragma unroll
      for (int r = 0; r < kRows; ++r) u[k][r] = load_u<T, V>(rowp[r] + cc);
    }
#pragma unroll
    for (int k = 0; k < kUnroll; ++k) {
      if (!ok[k]) continue;
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
#pragma unroll
        for (int e = 0; e < V; ++e) {
          const A x = to_acc(u[k][r].v[e]);
          acc[r] = fma(x, q[k].v[e], acc[r]);
          if constexpr (NORMS) acc2[r] = fma(x, x, acc2[r]);
        }
      }
    }
  }

  constexpr int kWarps = kThreads / 32;
  __shared__ A red[NORMS ? 2 : 1][kRows][kWarps];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    A s = warp_sum(acc[r]);
    if (lane == 0) red[0][r][warp] = s;
    if constexpr (NORMS) {
      A s2 = warp_sum(acc2[r]);
      if (lane == 0) red[NORMS ? 1 : 0][r][warp] = s2;
    }
  }
  __syncthreads();
  if (threadIdx.x < kRows * (NORMS ? 2 : 1)) {
    const int which = threadIdx.x / kRows, r = threadIdx.x % kRows;
    if (r0 + r < N) {
      A s = A(0);
#pragma unroll
      for (int w = 0; w < kWarps; ++w) s += red[which][r][w];  // fixed order
      A* out = which == 0 ? part : part2;
      out[static_cast<int64_t>(blockIdx.y) * N + r0 + r] = s;
    }
  }
}

template <typename A>
__global__ void reduce_splits_kernel(const A* __restrict__ part, A* __restrict__ out, int64_t splits, int64_t N) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= N) return;
  A s = part[i];
  for (int64_t p = 1; p < splits; ++p) s += part[p * N + i];
  out[i] = s;
}

struct Best {
  double v;
  int64_t j;
};
__device__ __forceinline__ bool better(double v, int64_t j, const Best& b) {
  return v < b.v || (v == b.v && j < b.j);  // the lowest index wins a tie
}

template <typename A>
__global__ void __launch_bounds__(kSelectThreads) select_kernel(
    const A* __restrict__ part, int64_t splits, int64_t N, const A* __restrict__ norms, const A* __restrict__ b,
    int8_t* __restrict__ taken, int64_t* __restrict__ state, const double* __restrict__ fstate,
    int64_t* __restrict__ picks, double* __restrict__ gaps, bool replacement, bool final_pass) {
  if (!final_pass && state[kDone] != 0) return;
  const int64_t t = state[kStep];
  const double inf = std::numeric_limits<double>::infinity();
  Best best{inf, std::numeric_limits<int64_t>::max()};
  double emax = -inf;
  for (int64_t j = threadIdx.x; j < N; j += blockDim.x) {
    A d = part[j];
    for (int64_t p = 1; p < splits; ++p) d += part[p * N + j];  // fixed order
    const double dd = static_cast<double>(d);
    emax = fmax(emax, t > 0 ? dd - static_cast<double>(b[j]) : dd);
    if (!final_pass) {
      double score = static_cast<double>(norms[j]) - 2.0 * dd;
      if (!replacement && taken[j]) score = inf;
      if (better(score, j, best)) best = Best{score, j};
    }
  }
  // block reduction: warps by shuffles, then warp 0 over the per-warp results
  __shared__ double sv[32], se[32];
  __shared__ int64_t sj[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const double ov = __shfl_down_sync(0xffffffffu, best.v, off);
    const int64_t oj = __shfl_down_sync(0xffffffffu, best.j, off);
    if (better(ov, oj, best)) best = Best{ov, oj};
    emax = fmax(emax, __shfl_down_sync(0xffffffffu, emax, off));
  }
  if (lane == 0) {
    sv[warp] = best.v;
    sj[warp] = best.j;
    se[warp] = emax;
  }
  __syncthreads();
  if (warp != 0) return;
  const int nwarps = blockDim.x / 32;
  best = lane < nwarps ? Best{sv[lane], sj[lane]} : Best{inf, std::numeric_limits<int64_t>::max()};
  emax = lane < nwarps ? se[lane] : -inf;
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const double ov = __shfl_down_sync(0xffffffffu, best.v, off);
    const int64_t oj = __shfl_down_sync(0xffffffffu, best.j, off);
    if (better(ov, oj, best)) best = Best{ov, oj};
    emax = fmax(emax, __shfl_down_sync(0xffffffffu, emax, off));
  }
  if (lane != 0) return;
  const double gap = 2.0 * (emax / static_cast<double>(t > 0 ? t : 1) - fstate[kRz]) / fstate[kMf];
  if (final_pass) {
    gaps[t > 0 ? t - 1 : 0] = gap;
    return;
  }
  if (t > 0) gaps[t - 1] = gap;
  const int64_t j = best.j < N ? best.j : 0;  // all masked (k > N without replacement): 0, like argmin
  picks[t] = j;
  taken[j] = 1;
  state[kJstar] = j;
}

template <typename A, int NT>
__device__ __forceinline__ void block_sum2(double& a, double& b, double* sa, double* sb) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  a = warp_sum(a);
  b = warp_sum(b);
  if (lane == 0) {
    sa[warp] = a;
    sb[warp] = b;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    a = 0.0;
    b = 0.0;
    for (int w = 0; w < NT / 32; ++w) {  // fixed order
      a += sa[w];
      b += sb[w];
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) update_kernel(
    const T* __restrict__ U, int64_t ld, const typename AccOf<T>::type* __restrict__ y, double* __restrict__ S,
    typename AccOf<T>::type* __restrict__ q, double* __restrict__ lpart, const int64_t* __restrict__ state,
    int64_t M) {
  using A = typename AccOf<T>::type;
  if (state[kDone] != 0) return;
  const int64_t t = state[kStep];
  const T* u = U + state[kJstar] * ld;
  const double tp1 = static_cast<double>(t + 1);
  double rr = 0.0, rz = 0.0;
  for (int64_t m = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; m < M;
       m += static_cast<int64_t>(gridDim.x) * kThreads) {
    const double s = S[m] + static_cast<double>(to_acc(u[m]));
    S[m] = s;
    const double yv = static_cast<double>(y[m]);
    const double z = s / tp1;
    const double r = yv - z;
    q[m] = static_cast<A>((tp1 + 1.0) * yv - s);
    rr += r * r;
    rz += r * z;
  }
  __shared__ double sa[kThreads / 32], sb[kThreads / 32];
  block_sum2<A, kThreads>(rr, rz, sa, sb);
  if (threadIdx.x == 0) {
    lpart[blockIdx.x] = rr;
    lpart[gridDim.x + blockIdx.x] = rz;
  }
}

__global__ void __launch_bounds__(kLossThreads) loss_kernel(
    const double* __restrict__ lpart, int64_t parts, int64_t* __restrict__ state, double* __restrict__ fstate,
    double* __restrict__ losses) {
  if (state[kDone] != 0) return;
  double rr = 0.0, rz = 0.0;
  for (int64_t p = threadIdx.x; p < parts; p += kLossThreads) {
    rr += lpart[p];
    rz += lpart[parts + p];
  }
  __shared__ double sa[kLossThreads / 32], sb[kLossThreads / 32];
  block_sum2<double, kLossThreads>(rr, rz, sa, sb);
  if (threadIdx.x != 0) return;
  const int64_t t = state[kStep];
  const double loss = rr / fstate[kMf];
  losses[t] = loss;
  fstate[kRz] = rz;
  state[kStep] = t + 1;
  if (loss <= fstate[kStop]) state[kDone] = 1;
}

// ---------------------------------------------------------------------------------------------
// host side
// ---------------------------------------------------------------------------------------------
template <typename S> struct Storage { using type = S; };
template <> struct Storage<at::Half> { using type = __half; };
template <> struct Storage<at::BFloat16> { using type = __nv_bfloat16; };

int sm_count() {
  int dev = 0, sms = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  return sms;
}

struct Split {
  int64_t splits, chunk;
};

// Split M so that row tiles x splits give every SM about 16 blocks (8 resident x 2 waves);
// chunk is a multiple of one block-iteration's columns (and so of the vector width).
Split split_plan(int64_t N, int64_t M, int V) {
  const int sms = sm_count();
  const int64_t tiles = (N + kRows - 1) / kRows;
  const int64_t granule = static_cast<int64_t>(kThreads) * V * kUnroll;
  const int64_t want = (16LL * sms + tiles - 1) / tiles;
  int64_t splits = std::max<int64_t>(1, std::min<int64_t>({want, (M + granule - 1) / granule, 65535}));
  int64_t chunk = ((M + splits - 1) / splits + granule - 1) / granule * granule;
  return {(M + chunk - 1) / chunk, chunk};
}

template <typename T>
bool vector_ok(const at::Tensor& U) {
  constexpr int V = 16 / sizeof(T);
  return reinterpret_cast<uintptr_t>(U.data_ptr()) % 16 == 0 && U.stride(0) % V == 0 && U.size(1) % V == 0;
}

template <typename T>
Split plan_for(const at::Tensor& U) {
  return split_plan(U.size(0), U.size(1), vector_ok<T>(U) ? 16 / sizeof(T) : 1);
}

template <typename T, bool NORMS>
void launch_dots(const at::Tensor& U, const at::Tensor& v, at::Tensor& part, at::Tensor* part2,
                 const int64_t* state, const Split& sp, cudaStream_t stream) {
  using A = typename AccOf<T>::type;
  const int64_t N = U.size(0), M = U.size(1), ld = U.stride(0);
  const T* u = reinterpret_cast<const T*>(U.data_ptr());
  A* p2 = part2 ? part2->data_ptr<A>() : nullptr;
  dim3 grid(static_cast<unsigned>((N + kRows - 1) / kRows), static_cast<unsigned>(sp.splits));
  if (vector_ok<T>(U)) {
    dots_partial_kernel<T, 16 / sizeof(T), NORMS><<<grid, kThreads, 0, stream>>>(
        u, v.data_ptr<A>(), part.data_ptr<A>(), p2, state, N, M, ld, sp.chunk);
  } else {
    dots_partial_kernel<T, 1, NORMS><<<grid, kThreads, 0, stream>>>(
        u, v.data_ptr<A>(), part.data_ptr<A>(), p2, state, N, M, ld, sp.chunk);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename A>
void launch_reduce(const at::Tensor& part, at::Tensor& out, int64_t splits, cudaStream_t stream) {
  const int64_t N = out.size(0);
  reduce_splits_kernel<A><<<static_cast<unsigned>((N + 255) / 256), 256, 0, stream>>>(
      part.data_ptr<A>(), out.data_ptr<A>(), splits, N);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void check_inputs(const at::Tensor& U, const at::Tensor& v, const char* what) {
  TORCH_CHECK(U.is_cuda() && v.is_cuda(), "gfs::", what, " (CUDA): U and the vector must be CUDA tensors");
  TORCH_CHECK(U.device() == v.device(), "gfs::", what, ": U and the vector are on different devices");
  TORCH_CHECK(U.dim() == 2, "gfs::", what, ": U must be 2-D (N, M), got ", U.dim(), "-D");
  TORCH_CHECK(U.size(0) >= 1 && U.size(1) >= 1, "gfs::", what, ": U must be non-empty");
  TORCH_CHECK(v.dim() == 1 && v.size(0) == U.size(1), "gfs::", what, ": vector of length ", U.size(1),
              " expected, got shape ", v.sizes());
  const auto st = U.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16, "gfs::", what,
              ": U must be float32/float64/float16/bfloat16, got ", st);
}

at::ScalarType acc_type(at::ScalarType st) { return st == at::kDouble ? at::kDouble : at::kFloat; }

// U row-major with unit column stride; the vector contiguous in the accumulation dtype.
std::pair<at::Tensor, at::Tensor> normalise(const at::Tensor& U, const at::Tensor& v) {
  at::Tensor Uc = U.stride(1) == 1 && U.stride(0) >= U.size(1) ? U : U.contiguous();
  at::Tensor vc = v.to(acc_type(U.scalar_type())).contiguous();
  return {Uc, vc};
}

#define GFS_DISPATCH(ST, ...)                                                              \
  switch (ST) {                                                                            \
    case at::kFloat: { using scalar_t = float; __VA_ARGS__(); break; }                     \
    case at::kDouble: { using scalar_t = double; __VA_ARGS__(); break; }                   \
    case at::kHalf: { using scalar_t = __half; __VA_ARGS__(); break; }                     \
    case at::kBFloat16: { using scalar_t = __nv_bfloat16; __VA_ARGS__(); break; }          \
    default: TORCH_CHECK(false, "gfs: unsupported dtype ", ST);                             \
  }

std::tuple<at::Tensor, at::Tensor> prepare_cuda(const at::Tensor& U_in, const at::Tensor& y_in) {
  check_inputs(U_in, y_in, "prepare");
  c10::cuda::CUDAGuard guard(U_in.device());
  auto [U, y] = normalise(U_in, y_in);
  const int64_t N = U.size(0);
  auto opts = y.options();
  at::Tensor norms = at::empty({N}, opts), b = at::empty({N}, opts);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  GFS_DISPATCH(U.scalar_type(), [&] {
    using A = typename AccOf<scalar_t>::type;
    const Split sp = plan_for<scalar_t>(U);
    at::Tensor part = at::empty({sp.splits, N}, opts), part2 = at::empty({sp.splits, N}, opts);
    launch_dots<scalar_t, true>(U, y, part, &part2, nullptr, sp, stream);
    launch_reduce<A>(part2, norms, sp.splits, stream);
    launch_reduce<A>(part, b, sp.splits, stream);
  });
  return {norms, b};
}

at::Tensor dots_cuda(const at::Tensor& U_in, const at::Tensor& r_in) {
  check_inputs(U_in, r_in, "dots");
  c10::cuda::CUDAGuard guard(U_in.device());
  auto [U, r] = normalise(U_in, r_in);
  const int64_t N = U.size(0);
  at::Tensor out = at::empty({N}, r.options());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  GFS_DISPATCH(U.scalar_type(), [&] {
    using A = typename AccOf<scalar_t>::type;
    const Split sp = plan_for<scalar_t>(U);
    at::Tensor part = at::empty({sp.splits, N}, r.options());
    launch_dots<scalar_t, false>(U, r, part, nullptr, nullptr, sp, stream);
    launch_reduce<A>(part, out, sp.splits, stream);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> greedy_uniform_cuda(const at::Tensor& U_in, const at::Tensor& y_in,
                                                                   int64_t k, bool replacement, double stop_loss) {
  check_inputs(U_in, y_in, "greedy_uniform");
  TORCH_CHECK(k >= 0, "gfs::greedy_uniform: k must be >= 0, got ", k);
  c10::cuda::CUDAGuard guard(U_in.device());
  auto [U, y] = normalise(U_in, y_in);
  const int64_t N = U.size(0), M = U.size(1);
  auto dev = U.device();
  auto f64 = at::TensorOptions().dtype(at::kDouble).device(dev);
  auto i64 = at::TensorOptions().dtype(at::kLong).device(dev);
  const int64_t kk = std::max<int64_t>(k, 1);
  auto outs = gfs_native::allocate_steps("greedy_uniform", kk, {at::kLong, at::kDouble, at::kDouble}, i64);
  at::Tensor picks = outs[0].fill_(-1);
  at::Tensor losses = outs[1].fill_(std::numeric_limits<double>::quiet_NaN());
  at::Tensor gaps = outs[2].fill_(std::numeric_limits<double>::quiet_NaN());
  at::Tensor state = at::zeros({4}, i64);
  at::Tensor fstate = at::zeros({4}, f64);  // filled on the device: a host tensor copied here would sync
  fstate.select(0, kStop).fill_(stop_loss);
  fstate.select(0, kMf).fill_(static_cast<double>(M));
  at::Tensor taken = at::zeros({N}, at::TensorOptions().dtype(at::kChar).device(dev));
  at::Tensor S = at::zeros({M}, f64);
  at::Tensor q = y.clone();
  const int sms = sm_count();
  const int64_t n_update = std::max<int64_t>(
      1, std::min<int64_t>({(M + kThreads - 1) / kThreads, static_cast<int64_t>(4) * sms, kUpdateBlocksMax}));
  at::Tensor lpart = at::empty({2 * n_update}, f64);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  // Without a stop loss every step runs; with one, the host peeks at the stop flag without
  // waiting (an async copy to pinned memory and an event it only queries), so that it stops
  // launching no-op steps soon after the device has stopped.
  const bool may_stop = stop_loss >= 0.0;
  at::Tensor flag_host = at::zeros({1}, at::TensorOptions().dtype(at::kLong).pinned_memory(may_stop));
  struct EventGuard {  // destroys the event on every way out, an exception included
    cudaEvent_t e = nullptr;
    ~EventGuard() {
      if (e) cudaEventDestroy(e);
    }
  } peek_guard;
  bool peek_pending = false;
  if (may_stop) C10_CUDA_CHECK(cudaEventCreateWithFlags(&peek_guard.e, cudaEventDisableTiming));
  cudaEvent_t peek = peek_guard.e;
  // Ctrl-C between launches (a step is at least four launches, microseconds: check the clock
  // every step). The launches already queued still run; nothing more is queued.
  gfs_native::Interrupt interrupt(int64_t(1) << 16);

  GFS_DISPATCH(U.scalar_type(), [&] {
    using A = typename AccOf<scalar_t>::type;
    auto [norms, b] = prepare_cuda(U, y);
    const Split sp = plan_for<scalar_t>(U);
    at::Tensor part = at::empty({sp.splits, N}, y.options());
    const scalar_t* u = reinterpret_cast<const scalar_t*>(U.data_ptr());
    int64_t* st = state.data_ptr<int64_t>();
    double* fst = fstate.data_ptr<double>();
    auto select = [&](bool final_pass) {
      select_kernel<A><<<1, kSelectThreads, 0, stream>>>(
          part.data_ptr<A>(), sp.splits, N, norms.data_ptr<A>(), b.data_ptr<A>(), taken.data_ptr<int8_t>(), st, fst,
          picks.data_ptr<int64_t>(), gaps.data_ptr<double>(), replacement, final_pass);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    for (int64_t step = 0; step < k; ++step) {
      if (interrupt.poll()) return;
      if (may_stop && step % 16 == 0) {
        if (peek_pending && cudaEventQuery(peek) == cudaSuccess) {
          peek_pending = false;
          if (flag_host.data_ptr<int64_t>()[0] != 0) break;
        }
        if (!peek_pending) {
          C10_CUDA_CHECK(cudaMemcpyAsync(flag_host.data_ptr<int64_t>(), st + kDone, sizeof(int64_t),
                                         cudaMemcpyDeviceToHost, stream));
          C10_CUDA_CHECK(cudaEventRecord(peek, stream));
          peek_pending = true;
        }
      }
      launch_dots<scalar_t, false>(U, q, part, nullptr, st, sp, stream);
      select(false);
      update_kernel<scalar_t><<<static_cast<unsigned>(n_update), kThreads, 0, stream>>>(
          u, U.stride(0), y.data_ptr<A>(), S.data_ptr<double>(), q.data_ptr<A>(), lpart.data_ptr<double>(), st, M);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      loss_kernel<<<1, kLossThreads, 0, stream>>>(lpart.data_ptr<double>(), n_update, st, fst,
                                                   losses.data_ptr<double>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    launch_dots<scalar_t, false>(U, q, part, nullptr, nullptr, sp, stream);  // the final gap pass
    select(true);
  });
  if (interrupt.pending()) {
    // The pinned flag may still be the target of a queued peek copy: let it land before the flag
    // is freed (the queued steps themselves only touch stream-ordered device memory).
    if (peek_pending) C10_CUDA_CHECK(cudaEventSynchronize(peek));
    interrupt.raise("greedy_uniform");
  }
  // The one synchronisation of the call: the number of steps taken (the copy the peek event
  // tracked finished before this read; the guard destroys the event).
  const int64_t T = state[kStep].item<int64_t>();
  return {picks.slice(0, 0, T), losses.slice(0, 0, T), gaps.slice(0, 0, std::max<int64_t>(T, 1))};
}

}  // namespace
}  // namespace gfs_cuda

TORCH_LIBRARY_IMPL(gfs, CUDA, m) {
  m.impl("prepare", &gfs_cuda::prepare_cuda);
  m.impl("dots", &gfs_cuda::dots_cuda);
  m.impl("greedy_uniform", &gfs_cuda::greedy_uniform_cuda);
}
