// The Gram engine's whole k-step loop on CPU, in one native call (op gfs::gram_greedy).
//
// Inputs are sufficient statistics (docs/design.md section 2): G = U U^T (N x N, float64), b = U y,
// yy = ||y||^2, count = M. Nothing of size M exists here: a step reads at most one row of G and
// does O(N) work ("uniform", "line_search") or O(N * |set|) work ("refit"). Every quantity is
// float64. Semantics (the gram_loop of python/gfs/engines/{uniform,line_search,refit}.py is the
// readable statement of each rule):
//
// uniform      z_{t+1} = (t z_t + u_j) / (t+1). With ct = G * counts (counts of the picks so far)
//              the step-t score is G_jj - 2 (t+1) b_j + 2 ct_j; argmin, ties to the lowest index.
// line_search  z <- z + gamma (u_j - z). With c = G w, zz = ||z||^2, zb = <z, y>:
//              rd_j = <y - z, u_j - z> = (b_j - c_j) - (zb - zz), dd_j = ||u_j - z||^2 = G_jj - 2 c_j + zz,
//              gamma_j = clip(rd_j / dd_j, 0, 1) (0 when rd_j or dd_j is at rounding level,
//              rd_j <= tol (|b_j| + |c_j| + |zb| + zz) or dd_j <= tol (G_jj + zz)),
//              loss decrease rho_j = gamma_j (2 rd_j - gamma_j dd_j); argmax rho (lowest index).
//              Step 0 takes the single best candidate with gamma = 1.
// refit        the chosen set S = {s0, s1, ...} is re-fit by affine least squares (weights sum to
//              1) after every addition. Directions d_i = u_{s_i} - u_{s0}; their Gram has the
//              Cholesky factor L, built one row a step: the new row is the candidate's projections
//              p_q = <q_q, u_j - u_{s0}> on the orthonormal directions q found so far. With
//              kappa_j = <y - u_s0, u_j - u_s0>, nu_j = ||u_j - u_s0||^2, sigma_j = sum_q t_q p_qj,
//              pi_j = sum_q p_qj^2 (t_q = <q_q, y - u_s0>), adding j lowers the loss by
//              rho_j = (kappa_j - sigma_j)^2 / (nu_j - pi_j); argmax rho (lowest index). A candidate
//              whose new direction is degenerate (nu_j - pi_j <= tol nu_j, e.g. a duplicate or a
//              member) has rho = 0 and, if picked, leaves the fit unchanged (gamma = 0).
// Frank-Wolfe gap after each step: max_j <2 (y - z), u_j - z> / count.
// Stops after the first step whose loss <= stop_loss. Losses are returned unclamped (the Python
// wrapper turns a clearly negative loss into a "not positive semi-definite" error).
//
// Safety (docs/design.md section 3): the outputs (k entries each) and every buffer whose size grows
// with the steps (refit's factor) are allocated, with checked sizes, before the loop; nothing
// inside a parallel region (run_pass) allocates or throws; the loop polls for Ctrl-C once per
// step (csrc/cpu/interrupt.h) and raises KeyboardInterrupt after leaving it.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "interrupt.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();
// Threads only when a step is worth milliseconds: a parallel region per step costs a fork/join,
// and far more when another process holds a core (the thread waits for a time slice).
constexpr int64_t kParallelWork = int64_t(1) << 21;

// Result of one pass over the candidates: the minimiser of a score (ties to the lowest index)
// and the maximum of a second quantity (for the gap).
struct Pass {
  double best = kInf;
  int64_t idx = -1;
  double gmax = -kInf;
};

inline void combine(Pass& acc, const Pass& p) {
  if (p.idx >= 0 && (acc.idx < 0 || p.best < acc.best || (p.best == acc.best && p.idx < acc.idx))) {
    acc.best = p.best;
    acc.idx = p.idx;
  }
  if (p.gmax > acc.gmax) acc.gmax = p.gmax;
}

inline void consider(Pass& p, double score, int64_t i) {
  if (score < p.best) {  // strict: the first (lowest) index keeps a tie
    p.best = score;
    p.idx = i;
  }
}

// Runs f(i0, i1) -> Pass over [0, N), split across threads when the step's work is large.
template <class F>
Pass run_pass(int64_t N, int64_t work, F&& f) {
#ifdef _OPENMP
  if (work >= kParallelWork && omp_get_max_threads() > 1) {
    Pass acc;
#pragma omp parallel
    {
      const int64_t nt = omp_get_num_threads(), tid = omp_get_thread_num();
      const int64_t per = (N + nt - 1) / nt;
      const int64_t i0 = std::min(N, tid * per), i1 = std::min(N, i0 + per);
      Pass p;
      if (i0 < i1) p = f(i0, i1);
#pragma omp critical
      combine(acc, p);
    }
    return acc;
  }
#endif
  return f(int64_t(0), N);
}

// First index allowed by the mask (a fallback when every score is +inf or NaN).
int64_t first_allowed(const std::vector<uint8_t>& blocked, bool replacement) {
  for (int64_t i = 0; i < (int64_t)blocked.size(); ++i)
    if (replacement || !blocked[i]) return i;
  return 0;
}

// The per-step outputs: k entries each, allocated (and checked) before the loop.
struct Out {
  int64_t* picks;
  double* losses;
  double* gaps;
  double* gammas;
  int64_t size = 0;  // steps taken
  void push(int64_t j, double loss, double gap, double gamma) noexcept {
    picks[size] = j;
    losses[size] = loss;
    gaps[size] = gap;
    gammas[size] = gamma;
    ++size;
  }
};

// v.reserve(n), or a clean c10::Error naming what would not fit.
template <class V>
void reserve_checked(V& v, int64_t n, const char* what) {
  using E = typename V::value_type;
  if (n < 0 || uint64_t(n) > uint64_t(v.max_size()))
    gfs_native::fail_allocation("gram_greedy", what, n, int64_t(sizeof(E)), "the size overflows");
  try {
    v.reserve(size_t(n));
  } catch (const std::exception&) {
    gfs_native::fail_allocation("gram_greedy", what, n, int64_t(sizeof(E)), "out of memory");
  }
}

// ---------------------------------------------------------------------------------------------
void uniform(const double* G, const double* d, const double* b, int64_t N, double yy, double M, int64_t k,
             bool replacement, double stop_loss, Out& out, std::vector<double>& w, gfs_native::Interrupt& interrupt) {
  std::vector<double> ct(N, 0.0);
  std::vector<uint8_t> taken(N, 0);
  Pass p = run_pass(N, N, [&](int64_t i0, int64_t i1) {
    Pass q;
    for (int64_t i = i0; i < i1; ++i) consider(q, d[i] - 2.0 * b[i], i);
    return q;
  });
  double Q = 0.0, B = 0.0;
  for (int64_t t = 0; t < k; ++t) {
    int64_t j = p.idx >= 0 ? p.idx : first_allowed(taken, replacement);
    taken[j] = 1;
    const double n = double(t + 1);
    Q += 2.0 * ct[j] + d[j];
    B += b[j];
    const double* row = G + j * N;
    const double next = 2.0 * (n + 1.0);
    double* c = ct.data();
    const uint8_t* tk = taken.data();
    p = run_pass(N, N, [&](int64_t i0, int64_t i1) {
      Pass q;
      for (int64_t i = i0; i < i1; ++i) {
        const double ci = c[i] + row[i];
        c[i] = ci;
        const double e = b[i] - ci / n;
        if (e > q.gmax) q.gmax = e;
        if (replacement || !tk[i]) consider(q, d[i] - next * b[i] + 2.0 * ci, i);
      }
      return q;
    });
    const double zb = B / n, zz = Q / (n * n);
    const double loss = (yy - 2.0 * zb + zz) / M;
    out.push(j, loss, 2.0 * (p.gmax - (zb - zz)) / M, 1.0 / n);
    if (loss <= stop_loss) break;
    if (interrupt.poll()) return;
  }
  for (int64_t t = 0; t < out.size; ++t) w[out.picks[t]] += 1.0;
  for (auto& x : w) x /= double(out.size);
}

// ---------------------------------------------------------------------------------------------
struct LineEval {
  double rho, gamma;
};

inline LineEval line_eval(double di, double bi, double ci, double zb, double zz, double tol) {
  const double rd = (bi - ci) - (zb - zz);
  const double dd = di - 2.0 * ci + zz;
  // rd and dd must exceed the rounding level of their computation, else no move (gamma = 0), so
  // that candidates which cannot help tie exactly and the lowest index wins
  if (!(rd > tol * (std::fabs(bi) + std::fabs(ci) + std::fabs(zb) + std::fabs(zz))) || !(dd > tol * (di + zz)))
    return {0.0, 0.0};
  const double g = std::min(1.0, rd / dd);
  return {g * (2.0 * rd - g * dd), g};
}

void line_search(const double* G, const double* d, const double* b, int64_t N, double yy, double M, int64_t k,
                 bool replacement, double stop_loss, double tol, Out& out, std::vector<double>& w,
                 gfs_native::Interrupt& interrupt) {
  std::vector<double> c(N, 0.0);
  std::vector<uint8_t> taken(N, 0);
  double zz = 0.0, zb = 0.0;
  Pass p = run_pass(N, N, [&](int64_t i0, int64_t i1) {
    Pass q;
    for (int64_t i = i0; i < i1; ++i) consider(q, d[i] - 2.0 * b[i], i);
    return q;
  });
  for (int64_t t = 0; t < k; ++t) {
    int64_t j = p.idx >= 0 ? p.idx : first_allowed(taken, replacement);
    const double gamma = t == 0 ? 1.0 : line_eval(d[j], b[j], c[j], zb, zz, tol).gamma;
    taken[j] = 1;
    const double h = 1.0 - gamma;
    const double cj = c[j];
    zz = h * h * zz + 2.0 * gamma * h * cj + gamma * gamma * d[j];
    zb = h * zb + gamma * b[j];
    const double* row = G + j * N;
    double* cp = c.data();
    const uint8_t* tk = taken.data();
    const double zb_ = zb, zz_ = zz;
    p = run_pass(N, N, [&](int64_t i0, int64_t i1) {
      Pass q;
      for (int64_t i = i0; i < i1; ++i) {
        double ci = cp[i];
        if (gamma > 0.0) {
          ci = h * ci + gamma * row[i];
          cp[i] = ci;
        }
        const double rd = (b[i] - ci) - (zb_ - zz_);
        if (rd > q.gmax) q.gmax = rd;
        if (replacement || !tk[i]) consider(q, -line_eval(d[i], b[i], ci, zb_, zz_, tol).rho, i);
      }
      return q;
    });
    const double loss = (yy - 2.0 * zb + zz) / M;
    out.push(j, loss, 2.0 * p.gmax / M, gamma);
    if (loss <= stop_loss) break;
    if (interrupt.poll()) return;
  }
  double scale = 1.0;  // w = sum_t gamma_t prod_{s > t} (1 - gamma_s) e_{j_t}
  for (int64_t t = out.size - 1; t >= 0 && scale != 0.0; --t) {
    w[out.picks[t]] += scale * out.gammas[t];
    scale *= 1.0 - out.gammas[t];
  }
}

// ---------------------------------------------------------------------------------------------
void refit(const double* G, const double* d, const double* b, int64_t N, double yy, double M, int64_t k,
           bool replacement, double stop_loss, double tol, Out& out, std::vector<double>& w,
           gfs_native::Interrupt& interrupt) {
  std::vector<uint8_t> picked(N, 0), inset(N, 0);
  Pass p0 = run_pass(N, N, [&](int64_t i0, int64_t i1) {
    Pass q;
    for (int64_t i = i0; i < i1; ++i) consider(q, d[i] - 2.0 * b[i], i);
    return q;
  });
  const int64_t s0 = p0.idx >= 0 ? p0.idx : 0;
  const double* g0 = G + s0 * N;
  const double g00 = g0[s0], bs0 = b[s0];
  std::vector<double> kappa(N), nu(N), sigma(N, 0.0), pi(N, 0.0);
  std::vector<int64_t> members{s0};
  std::vector<double> P;       // row q (length N): projections of every u_i - u_s0 on direction q
  std::vector<double> L;       // lower-triangular factor, packed by rows: row q at q (q + 1) / 2
  std::vector<double> tq;      // <q_q, y - u_s0>
  std::vector<double> pnew(N);
  std::vector<double> l;       // the new row of L (its first m entries), at most D
  // At most D = min(k - 1, N - 1) directions (a member never enters twice): everything that grows
  // with them is reserved here, checked, so that nothing allocates inside the loop.
  const int64_t D = std::min(k, N) - 1;
  reserve_checked(members, D + 1, "refit's member list");
  reserve_checked(P, D * N, "refit's projections (directions x N)");
  reserve_checked(L, D * (D + 1) / 2, "refit's Cholesky factor");
  reserve_checked(tq, D, "refit's coefficients");
  reserve_checked(l, D, "refit's factor row");
  picked[s0] = inset[s0] = 1;
  double loss_abs = yy - 2.0 * bs0 + g00;

  auto score_pass = [&](bool update, double tnew) {
    const uint8_t* pk = picked.data();
    const uint8_t* in = inset.data();
    return run_pass(N, N * (int64_t)(members.size()), [&](int64_t i0, int64_t i1) {
      Pass q;
      for (int64_t i = i0; i < i1; ++i) {
        if (update) {
          sigma[i] += tnew * pnew[i];
          pi[i] += pnew[i] * pnew[i];
        }
        const double num = kappa[i] - sigma[i];
        const double den = nu[i] - pi[i];
        if (num > q.gmax) q.gmax = num;
        if (!replacement && pk[i]) continue;
        const double rho = (!in[i] && nu[i] > 0.0 && den > tol * nu[i]) ? num * num / den : 0.0;
        consider(q, -rho, i);
      }
      return q;
    });
  };

  Pass p = run_pass(N, N, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      kappa[i] = (b[i] - g0[i]) - (bs0 - g00);
      nu[i] = (d[i] - g0[i]) - (g0[i] - g00);
    }
    return Pass{};
  });
  p = score_pass(false, 0.0);
  out.push(s0, loss_abs / M, 2.0 * p.gmax / M, 1.0);
  if (loss_abs / M <= stop_loss) k = 1;

  for (int64_t t = 1; t < k; ++t) {
    const int64_t j = p.idx >= 0 ? p.idx : first_allowed(picked, replacement);
    const double num = kappa[j] - sigma[j], den = nu[j] - pi[j];
    const bool ok = !inset[j] && nu[j] > 0.0 && den > tol * nu[j];
    picked[j] = 1;
    double gamma = 0.0, tnew = 0.0;
    if (ok) {
      const int64_t m = (int64_t)tq.size();  // directions so far
      const double Ljj = std::sqrt(den);
      tnew = num / Ljj;
      l.resize(m);  // within the reserved capacity: no allocation
      for (int64_t q = 0; q < m; ++q) l[q] = P[q * N + j];
      const double* gj = G + j * N;
      const double cst = gj[s0] - g00;
      const double* Pp = P.data();
      double* __restrict pn = pnew.data();
      run_pass(N, N * (m + 1), [&](int64_t i0, int64_t i1) {
        // pnew = (g - P^T l) / Ljj over this range, four directions per sweep (a quarter of the
        // traffic on pnew), in cache-sized column blocks
        constexpr int64_t kCols = 512;
        for (int64_t c0 = i0; c0 < i1; c0 += kCols) {
          const int64_t c1 = std::min(i1, c0 + kCols);
          for (int64_t i = c0; i < c1; ++i) pn[i] = (gj[i] - g0[i]) - cst;
          int64_t q = 0;
          for (; q + 4 <= m; q += 4) {
            const double l0 = l[q], l1 = l[q + 1], l2 = l[q + 2], l3 = l[q + 3];
            const double* __restrict r0 = Pp + q * N;
            const double* __restrict r1 = r0 + N;
            const double* __restrict r2 = r1 + N;
            const double* __restrict r3 = r2 + N;
            for (int64_t i = c0; i < c1; ++i) pn[i] -= (l0 * r0[i] + l1 * r1[i]) + (l2 * r2[i] + l3 * r3[i]);
          }
          for (; q < m; ++q) {
            const double lq = l[q];
            const double* __restrict r0 = Pp + q * N;
            for (int64_t i = c0; i < c1; ++i) pn[i] -= lq * r0[i];
          }
          const double inv = 1.0 / Ljj;
          for (int64_t i = c0; i < c1; ++i) pn[i] *= inv;
        }
        return Pass{};
      });
      pnew[s0] = 0.0;  // exact: u_s0 - u_s0 = 0
      P.insert(P.end(), pnew.begin(), pnew.end());
      L.insert(L.end(), l.begin(), l.end());  // packed lower-triangular: row m is (l, Ljj)
      L.push_back(Ljj);
      tq.push_back(tnew);
      members.push_back(j);
      inset[j] = 1;
      loss_abs -= tnew * tnew;
      gamma = 1.0;
    }
    p = score_pass(ok, tnew);
    const double loss = loss_abs / M;
    out.push(j, loss, 2.0 * p.gmax / M, gamma);
    if (loss <= stop_loss) break;
    if (interrupt.poll()) return;
  }
  // weights: beta = L^{-T} t, w[s_q] = beta_q (q >= 1), w[s0] = 1 - sum(beta)
  const int64_t m = (int64_t)tq.size();
  auto Lat = [&](int64_t r, int64_t c) { return L[r * (r + 1) / 2 + c]; };
  std::vector<double> beta(m, 0.0);
  for (int64_t q = m - 1; q >= 0; --q) {
    double s = tq[q];
    for (int64_t r = q + 1; r < m; ++r) s -= Lat(r, q) * beta[r];
    beta[q] = s / Lat(q, q);
  }
  double total = 0.0;
  for (int64_t q = 0; q < m; ++q) {
    w[members[q + 1]] = beta[q];
    total += beta[q];
  }
  w[s0] = 1.0 - total;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> gram_greedy_cpu(
    const at::Tensor& G_in, const at::Tensor& b_in, double yy, int64_t count, int64_t k, c10::string_view step,
    bool replacement, double stop_loss, double tol) {
  TORCH_CHECK(G_in.dim() == 2 && G_in.size(0) == G_in.size(1), "gram_greedy: G must be square (N, N), got ",
              G_in.sizes());
  TORCH_CHECK(G_in.scalar_type() == at::kDouble && b_in.scalar_type() == at::kDouble,
              "gram_greedy: G and b must be float64");
  const int64_t N = G_in.size(0);
  TORCH_CHECK(b_in.dim() == 1 && b_in.size(0) == N, "gram_greedy: b must have shape (", N, ",), got ", b_in.sizes());
  TORCH_CHECK(N >= 1 && k >= 1 && count >= 1, "gram_greedy: need N >= 1, k >= 1, count >= 1");
  TORCH_CHECK(replacement || k <= N, "gram_greedy: k > N without replacement");
  const std::string rule(step.data(), step.size());
  TORCH_CHECK(rule == "uniform" || rule == "line_search" || rule == "refit", "gram_greedy: unknown step '", rule,
              "' (uniform, line_search, refit)");
  const at::Tensor G = G_in.contiguous(), b = b_in.contiguous();
  const at::Tensor diag = G.diagonal().contiguous();
  const double* Gp = G.data_ptr<double>();
  const double* dp = diag.data_ptr<double>();
  const double* bp = b.data_ptr<double>();
  const double M = double(count);
  // The outputs, k entries each, before the loop (a k that cannot fit is refused here).
  auto outs = gfs_native::allocate_steps("gram_greedy", k, {at::kLong, at::kDouble, at::kDouble, at::kDouble},
                                         at::TensorOptions().device(at::kCPU));
  Out out{outs[0].data_ptr<int64_t>(), outs[1].data_ptr<double>(), outs[2].data_ptr<double>(),
          outs[3].data_ptr<double>()};
  at::Tensor weights = at::empty({N}, at::TensorOptions().dtype(at::kDouble));
  std::vector<double> w(N, 0.0);
  gfs_native::Interrupt interrupt(N);
  {
    at::NoGradGuard no_grad;
    if (rule == "uniform")
      uniform(Gp, dp, bp, N, yy, M, k, replacement, stop_loss, out, w, interrupt);
    else if (rule == "line_search")
      line_search(Gp, dp, bp, N, yy, M, k, replacement, stop_loss, tol, out, w, interrupt);
    else
      refit(Gp, dp, bp, N, yy, M, k, replacement, stop_loss, tol, out, w, interrupt);
  }
  if (interrupt.pending()) interrupt.raise("gram_greedy");
  const int64_t s = out.size;
  std::copy(w.begin(), w.end(), weights.data_ptr<double>());
  return {gfs_native::shrink_steps(outs[0], s), gfs_native::shrink_steps(outs[1], s),
          gfs_native::shrink_steps(outs[2], s), gfs_native::shrink_steps(outs[3], s), weights};
}

}  // namespace

TORCH_LIBRARY_IMPL(gfs, CPU, m) { m.impl("gram_greedy", &gram_greedy_cpu); }
