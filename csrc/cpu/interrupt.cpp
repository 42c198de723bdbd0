// Interrupt checks and checked allocation for the native loops: see csrc/cpu/interrupt.h.
#include <Python.h>
#include <pybind11/pybind11.h>

#include "interrupt.h"

#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <string>

namespace gfs_native {

namespace {

// Steps between two reads of the clock: about 2^16 elements of work, at most 4096 steps (a step
// costs at least tens of nanoseconds), at least 1. A clock read costs ~20 ns.
int64_t stride_for(int64_t work) {
  constexpr int64_t kWork = int64_t(1) << 16;
  if (work <= 0) return 4096;
  return std::clamp<int64_t>(kWork / work, 1, 4096);
}

bool python_usable() {
  if (!Py_IsInitialized()) return false;
#if PY_VERSION_HEX >= 0x030D0000
  return !Py_IsFinalizing();
#else
  return !_Py_IsFinalizing();
#endif
}

std::string human_bytes(double bytes) {
  const char* unit[] = {"bytes", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"};
  int u = 0;
  while (bytes >= 1024.0 && u < 6) {
    bytes /= 1024.0;
    ++u;
  }
  char buf[64];
  if (u == 0)
    std::snprintf(buf, sizeof buf, "%.0f bytes", bytes);
  else
    std::snprintf(buf, sizeof buf, "%.3g %s", bytes, unit[u]);
  return buf;
}

double physical_memory_bytes() {
  const long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGE_SIZE);
  if (pages <= 0 || page <= 0) return 0.0;
  return double(pages) * double(page);
}

}  // namespace

Interrupt::Interrupt(int64_t work_per_step) noexcept
    : stride_(stride_for(work_per_step)),
      countdown_(stride_),
      next_(std::chrono::steady_clock::now() + kInterval) {}

Interrupt::~Interrupt() {
  if ((type_ || value_ || traceback_) && python_usable()) {
    PyGILState_STATE g = PyGILState_Ensure();
    Py_XDECREF(type_);
    Py_XDECREF(value_);
    Py_XDECREF(traceback_);
    PyGILState_Release(g);
  }
}

bool Interrupt::poll_clock() noexcept {
  countdown_ = stride_;
  if (hit_) return true;
  const auto now = std::chrono::steady_clock::now();
  if (now < next_) return false;
  next_ = now + kInterval;
  return check_signals();
}

bool Interrupt::check_signals() noexcept {
  if (!python_usable()) return false;
  // Reentrant: a no-op when this thread already holds the GIL (an op called without releasing
  // it); otherwise waits for it like any Python thread (at most a switch interval, 5 ms, when
  // another thread runs Python code).
  PyGILState_STATE g = PyGILState_Ensure();
  if (PyErr_CheckSignals() != 0) {  // the handler raised (KeyboardInterrupt for Ctrl-C)
    PyErr_Fetch(&type_, &value_, &traceback_);
    hit_ = true;
  }
  PyGILState_Release(g);
  return hit_;
}

void Interrupt::raise(const char* op) {
  if (!hit_ || !python_usable()) {
    TORCH_CHECK(false, "gfs::", op, ": interrupted");
  }
  pybind11::gil_scoped_acquire gil;
  if (type_ == nullptr) {  // a handler that raised nothing recognisable: say so
    PyErr_SetString(PyExc_KeyboardInterrupt, "");
  } else {
    PyErr_Restore(type_, value_, traceback_);  // steals the references
  }
  type_ = value_ = traceback_ = nullptr;
  // Takes the error back out of the interpreter; the pybind11 function that called the op
  // (torch.ops) restores it, so Python raises the original exception.
  throw pybind11::error_already_set();
}

void fail_allocation(const char* op, const char* what, int64_t count, int64_t elem_bytes, const char* reason) {
  const double bytes = double(count) * double(elem_bytes);
  TORCH_CHECK(false, "gfs::", op, ": ", what, " of ", count, " entries would take ", human_bytes(bytes), " (",
              elem_bytes, " bytes each): ", reason);
}

std::vector<at::Tensor> allocate_steps(const char* op, int64_t k, std::initializer_list<at::ScalarType> dtypes,
                                       const at::TensorOptions& options) {
  int64_t per_step = 0;
  for (auto d : dtypes) per_step += int64_t(c10::elementSize(d));
  const double bytes = double(k) * double(per_step);
  auto refuse = [&](const std::string& why) {
    TORCH_CHECK(false, "gfs::", op, ": k = ", k, " steps need ", human_bytes(bytes), " for the per-step outputs (",
                per_step, " bytes a step), ", why, "; pass a smaller k");
  };
  if (k < 0 || k > INT64_MAX / std::max<int64_t>(per_step, 1)) refuse("which overflows a size");
  if (options.device().is_cpu()) {
    const double phys = physical_memory_bytes();
    if (phys > 0.0 && bytes > phys) refuse("more than this machine's " + human_bytes(phys) + " of memory");
  }
  std::vector<at::Tensor> out;
  out.reserve(dtypes.size());
  try {
    for (auto d : dtypes) out.push_back(at::empty({k}, options.dtype(d)));
  } catch (const std::exception& e) {  // c10::OutOfMemoryError, std::bad_alloc
    out.clear();
    std::string msg = e.what();
    if (auto nl = msg.find('\n'); nl != std::string::npos) msg.resize(nl);
    refuse("which cannot be allocated (" + msg + ")");
  }
  return out;
}

at::Tensor shrink_steps(const at::Tensor& t, int64_t s) {
  if (s == t.size(0)) return t;
  return t.narrow(0, 0, s).clone();
}

}  // namespace gfs_native
