// Safety of the native selection loops (docs/design.md section 3, "Rules of the house": native code
// never throws across an OpenMP region, checks for interrupts, and allocates nothing whose size
// it has not checked first). Shared by csrc/cpu/greedy_cpu.cpp, csrc/cpu/gram_cpu.cpp and
// csrc/cuda/greedy_cuda.cu; implemented in csrc/cpu/interrupt.cpp (the only file that includes
// Python.h and pybind11 for this, so that nvcc never sees them).
//
// Interrupts. The ops are called through torch.ops, which releases the GIL, so a Ctrl-C only
// sets Python's "signal tripped" flag and nothing runs its handler until the op returns. A loop
// therefore calls Interrupt::poll() once per step on the thread that called the op (OpenMP
// thread 0 is that thread). poll() costs a decrement; every `stride` steps (set from the work of
// a step, so that a few tens of microseconds of work pass between two) it reads a steady clock,
// and every kInterval of wall time it takes the GIL and calls PyErr_CheckSignals(). When that
// reports an exception (KeyboardInterrupt for Ctrl-C, or whatever a user's handler raised) the
// exception is taken out of the interpreter, kept, and poll() returns true from then on. The loop
// leaves at its next step boundary (every thread at the same step) and, outside any parallel
// region, calls raise(), which puts the exception back and throws pybind11::error_already_set:
// Python sees the original KeyboardInterrupt, with its traceback. Signals are delivered to
// Python's main thread only: called from another thread, the check is a no-op.
//
// Checked allocation. allocate_steps() allocates the per-step outputs of a loop (k entries each)
// before the loop starts: a k whose outputs do not fit (or overflow a size) is a clean c10 error
// naming the op, k and the bytes, raised before any parallel region, instead of std::bad_alloc /
// std::length_error thrown from inside one (which aborts the process) or a loop that grows its
// memory until the OOM killer ends it. checked_array() does the same for scratch buffers.
#pragma once

#include <ATen/ATen.h>

#include <chrono>
#include <cstdint>
#include <initializer_list>
#include <memory>
#include <new>
#include <vector>

struct _object;  // PyObject, without Python.h

namespace gfs_native {

class Interrupt {
 public:
  // How often the GIL is taken to look for a pending signal.
  static constexpr std::chrono::milliseconds kInterval{50};

  // work_per_step: about how many elements one step touches (sets how many steps pass between
  // two reads of the clock). Never throws.
  explicit Interrupt(int64_t work_per_step) noexcept;
  ~Interrupt();
  Interrupt(const Interrupt&) = delete;
  Interrupt& operator=(const Interrupt&) = delete;

  // Once per step, on the thread that called the op. True once a signal handler raised (and from
  // then on). Never throws, never allocates.
  inline bool poll() noexcept {
    if (--countdown_ > 0) return false;
    return poll_clock();
  }
  // True when poll() saw an exception: the caller must raise() (after its parallel region).
  bool pending() const noexcept { return hit_; }
  // Outside any parallel region: throws the exception the signal handler raised, as
  // pybind11::error_already_set (Python gets the original exception, e.g. KeyboardInterrupt).
  [[noreturn]] void raise(const char* op);

 private:
  bool poll_clock() noexcept;
  bool check_signals() noexcept;

  int64_t stride_;
  int64_t countdown_;
  std::chrono::steady_clock::time_point next_;
  bool hit_ = false;
  _object* type_ = nullptr;
  _object* value_ = nullptr;
  _object* traceback_ = nullptr;
};

// Uninitialised per-step outputs, one tensor of k elements per dtype, on `options`' device.
// Refuses (a c10::Error naming op, k and the bytes) a size that overflows, that exceeds the
// machine's physical memory (CPU), or that the allocator cannot provide.
std::vector<at::Tensor> allocate_steps(const char* op, int64_t k, std::initializer_list<at::ScalarType> dtypes,
                                       const at::TensorOptions& options);

// The first s entries of a per-step output allocated for k: itself when s == k, else a copy, so
// that the k-sized buffer is freed.
at::Tensor shrink_steps(const at::Tensor& t, int64_t s);

// Throws a c10::Error saying that `what` of op needed `count` elements of `elem_bytes` bytes.
[[noreturn]] void fail_allocation(const char* op, const char* what, int64_t count, int64_t elem_bytes,
                                  const char* reason);

// An uninitialised array of n elements of T (first touch is up to the caller, e.g. by the thread
// that uses it), or a clean c10::Error naming op and `what`. Call it outside parallel regions.
template <typename T>
std::unique_ptr<T[]> checked_array(int64_t n, const char* op, const char* what) {
  if (n < 0 || uint64_t(n) > uint64_t(INT64_MAX) / sizeof(T))
    fail_allocation(op, what, n, int64_t(sizeof(T)), "the size overflows");
  try {
    return std::unique_ptr<T[]>(new T[size_t(n)]);
  } catch (const std::bad_alloc&) {
    fail_allocation(op, what, n, int64_t(sizeof(T)), "out of memory");
  }
}

}  // namespace gfs_native
