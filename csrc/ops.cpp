// The custom operators of gfs, one schema each, implemented per device in csrc/cpu and
// csrc/cuda (TORCH_LIBRARY_IMPL). Python calls them as torch.ops.gfs.<name>; the wrappers and
// fake (meta) implementations live in src/gfs_kernels/_ops.py.
//
// Notation (docs/design.md section 2): U is (N, M), row j is candidate u_j; y is the target (M);
// r = y - z is the residual of the current subnetwork z. Scores use
//   a_j = ||u_j||^2 - 2 <y, u_j>,   e_j = <r, u_j>,
//   step t (z = z_t, t candidates chosen so far):  score_j = a_j - 2 t e_j,
// whose argmin (ties to the lowest index) is the greedy pick.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// `import gfs_kernels._C` loads this shared object, which runs the registrations below.
PyObject* PyInit__C(void) {
  static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C", "gfs compiled kernels", -1, nullptr};
  return PyModule_Create(&def);
}
}

TORCH_LIBRARY(gfs, m) {
  // norms_j = ||u_j||^2 and b_j = <y, u_j>, accumulated in float32 (float64 for float64 U).
  m.def("prepare(Tensor U, Tensor y) -> (Tensor norms, Tensor b)");
  // e = U r: one streaming pass over U, accumulation as in prepare.
  m.def("dots(Tensor U, Tensor r) -> Tensor");
  // The whole uniform-step greedy loop (docs/design.md section 1) in one native call.
  //   indices: int64 (s,), s <= k steps taken; losses: float64 (s,), ||y - z_{t+1}||^2 / M;
  //   gaps: float64 (s,), Frank-Wolfe gap at z_{t+1}, max_j <2 (y - z), u_j - z> / M.
  // Stops after the first step whose loss <= stop_loss (pass a negative value for "never").
  m.def("greedy_uniform(Tensor U, Tensor y, int k, bool replacement, float stop_loss) -> (Tensor indices, Tensor losses, Tensor gaps)");
  // The Gram engine: the whole k-step loop of one step rule ("uniform", "line_search" or
  // "refit") from sufficient statistics G = U U^T (N x N, float64), b = U y (N, float64),
  // yy = ||y||^2 and count = M; per step one row of G and O(N) work (refit: O(N * |set|)).
  //   indices, losses, gaps as in greedy_uniform (losses unclamped); gammas: float64 (s,), the
  //   step size of each step (uniform 1/(t+1); line_search the chosen gamma; refit 1 where the
  //   pick entered the fit, 0 where it changed nothing); weights: float64 (N,), the final
  //   weights (sum to 1). tol: relative pivot tolerance for degenerate directions.
  m.def("gram_greedy(Tensor G, Tensor b, float yy, int count, int k, str step, bool replacement, float stop_loss, float tol) -> (Tensor indices, Tensor losses, Tensor gaps, Tensor gammas, Tensor weights)");
}

// None of the operators is differentiable (they pick indices and score candidates; gfs.select
// detaches its inputs). Autograd passes them by, so outputs from inputs that require grad do not
// claim requires_grad: backward through them is an error, not a gradient silently left at zero
// (without this, PyTorch's autograd fallback marks the outputs and only warns at backward, and
// torch.compile tries to differentiate the int64 indices; torch.library.opcheck in
// tests/test_opcheck.py with inputs that require grad).
TORCH_LIBRARY_IMPL(gfs, Autograd, m) {
  m.impl("prepare", torch::CppFunction::makeFallthrough());
  m.impl("dots", torch::CppFunction::makeFallthrough());
  m.impl("greedy_uniform", torch::CppFunction::makeFallthrough());
  m.impl("gram_greedy", torch::CppFunction::makeFallthrough());
}
