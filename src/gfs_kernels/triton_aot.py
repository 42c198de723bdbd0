"""Compile every Triton kernel of the "triton" backend for sm_90 without a GPU, and read each
kernel's registers and spills.

`triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))` runs the whole pipeline
(TTIR -> TTGIR -> LLVM -> PTX -> cubin through ptxas) with no device. A compiled kernel's
`n_regs` / `n_spills` attributes are only filled when the cubin is loaded onto a device
(`CompiledKernel._init_handles`, triton 3.6 and 3.8 alike), so without one we run the same
ptxas on the kernel's PTX with `-v` and read its report. When a device is present,
`kernel_resources` prefers the driver's numbers.

    python -m gfs_kernels.triton_aot      # table of every kernel variant
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

SM90 = GPUTarget("cuda", 90, 32)


def ptxas_path() -> str:
    """The ptxas that triton itself uses for sm_90."""
    try:
        return triton.knobs.nvidia.ptxas.path  # triton >= 3.4
    except Exception:  # pragma: no cover - older layouts
        here = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
        if os.path.isfile(here):
            return here
        return os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "ptxas")


def compile_spec(spec: dict, target: GPUTarget = SM90):
    src = ASTSource(spec["fn"], spec["signature"], spec["constexprs"], spec["attrs"])
    return triton.compile(src, target=target, options=dict(spec["options"]))


_USED = re.compile(r"Used (\d+) registers")
_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


_TARGET = re.compile(r"^\s*\.target\s+(sm_\w+)", re.M)


def ptxas_stats(ptx: str) -> dict:
    """registers / stack frame / spill bytes of the (single) kernel in `ptx`, from `ptxas -v`
    (for the PTX's own target, sm_90a for triton's Hopper code)."""
    arch = _TARGET.search(ptx).group(1)
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        cmd = [ptxas_path(), "-v", "--regAllocOptLevel=2", f"--gpu-name={arch}", src, "-o", os.path.join(tmp, "k.o")]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"ptxas failed: {res.stderr}")
        log = res.stderr + res.stdout
    used, spill = _USED.search(log), _SPILL.search(log)
    if not used or not spill:
        raise RuntimeError(f"unexpected ptxas report:\n{log}")
    return dict(
        registers=int(used.group(1)),
        stack_frame=int(spill.group(1)),
        spill_stores=int(spill.group(2)),
        spill_loads=int(spill.group(3)),
    )


def kernel_resources(compiled) -> dict:
    """registers and spills of a compiled kernel: the driver's numbers when a GPU can load it,
    else ptxas's report on its PTX (same ptxas, same flags as triton's own cubin step)."""
    stats = ptxas_stats(compiled.asm["ptx"])
    stats["spills"] = stats["spill_stores"] + stats["spill_loads"]
    stats["source"] = "ptxas -v"
    try:
        import torch

        if (
            torch.cuda.is_available()
            and 10 * torch.cuda.get_device_capability()[0] + torch.cuda.get_device_capability()[1]
            == compiled.metadata.target.arch
        ):
            compiled._init_handles()
            stats.update(registers=compiled.n_regs, spills=compiled.n_spills, source="driver")
    except Exception:  # no driver: keep ptxas's numbers
        pass
    return stats


def count_16byte_loads(ptx: str) -> int:
    """Global loads 16 bytes wide in the PTX (ld.global.v4.b32 / .v2.b64 and variants)."""
    return sum(
        1
        for line in ptx.splitlines()
        if "ld.global" in line and (".v4.b32" in line or ".v4.f32" in line or ".v2.b64" in line or ".v2.f64" in line)
    )


def compile_all(dtypes=None):
    """[(name, resources dict)] for every kernel variant the GPU path launches."""
    from . import triton_step

    kw = {} if dtypes is None else {"dtypes": dtypes}
    out = []
    for spec in triton_step.sm90_compile_specs(**kw):
        compiled = compile_spec(spec)
        res = kernel_resources(compiled)
        res["shared"] = compiled.metadata.shared
        res["loads16"] = count_16byte_loads(compiled.asm["ptx"])
        out.append((spec["name"], res))
    return out


if __name__ == "__main__":
    for name, res in compile_all():
        print(
            f"{name:60s} regs {res['registers']:4d}  spills {res['spills']:3d}  "
            f"stack {res.get('stack_frame', 0):4d}  smem {res['shared']:6d}  16B loads {res['loads16']}"
        )
