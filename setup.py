"""Build gfs: the Python packages `gfs` and `gfs_kernels` and the compiled extension
`gfs_kernels._C` (C++ CPU kernels, plus CUDA kernels when a CUDA toolkit and a CUDA build of
torch are both present).

The sources are every *.cpp under csrc/ (and every *.cu under csrc/cuda/ when CUDA is built):
CMakeLists.txt globs the same folders, so there is one list of sources, the file tree.

Environment switches:
  GFS_BUILD_CUDA=auto|0|1   compile csrc/cuda (default auto: when nvcc and torch.version.cuda exist)
  CUDA_HOME                 the toolkit root whose bin/ holds the real nvcc (default /usr/local/cuda)
  TORCH_CUDA_ARCH_LIST      GPU architectures (default "9.0": Hopper, H100/H200)
Build with `pip install --no-build-isolation -e .` so the extension is compiled against the
torch already installed.
"""

import glob
import os

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _cuda_home():
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if not home and os.path.isfile("/usr/local/cuda/bin/nvcc"):
        home = "/usr/local/cuda"
    if home and os.path.isfile(os.path.join(home, "bin", "nvcc")):
        os.environ["CUDA_HOME"] = home  # read by torch.utils.cpp_extension at import
        return home
    return None


def _extensions():
    cuda_home = _cuda_home()  # before torch.utils.cpp_extension reads CUDA_HOME at import
    import torch
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    want = os.environ.get("GFS_BUILD_CUDA", "auto").lower()
    build_cuda = want in ("1", "true", "yes") or (
        want == "auto" and cuda_home is not None and torch.version.cuda is not None
    )
    if build_cuda and (cuda_home is None or torch.version.cuda is None):
        raise RuntimeError("GFS_BUILD_CUDA=1 needs a CUDA toolkit (set CUDA_HOME) and a CUDA build of torch")
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")

    rel = lambda p: os.path.relpath(p, ROOT)  # noqa: E731
    sources = sorted(rel(p) for p in glob.glob(os.path.join(ROOT, "csrc", "**", "*.cpp"), recursive=True))
    # torch >= 2.10 headers need C++20
    cxx = ["-O3", "-std=c++20", "-fopenmp", "-mavx2", "-mfma", "-mf16c", "-fno-math-errno"]
    if build_cuda:
        sources += sorted(rel(p) for p in glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
        nvcc = ["-O3", "-std=c++20", "--use_fast_math", "-lineinfo", "-DGFS_WITH_CUDA"]
        return [
            CUDAExtension(
                "gfs_kernels._C",
                sources,
                extra_compile_args={"cxx": cxx + ["-DGFS_WITH_CUDA"], "nvcc": nvcc},
                extra_link_args=["-fopenmp"],
            )
        ]
    return [CppExtension("gfs_kernels._C", sources, extra_compile_args=cxx, extra_link_args=["-fopenmp"])]


def _build_ext():
    from torch.utils.cpp_extension import BuildExtension

    return BuildExtension.with_options(use_ninja=True)


setup(
    ext_modules=_extensions(),
    cmdclass={"build_ext": _build_ext()},
)
