"""Builds effkern._C: the C++ CPU kernels always, the CUDA kernels when torch is a CUDA build and nvcc exists.

Environment:
  EFFKERN_BUILD_CUDA=auto|0|1   auto (default): CUDA kernels when possible; 1: fail if they cannot be built.
  TORCH_CUDA_ARCH_LIST          GPU architectures, default "8.0;9.0" (A100, H100/H200).
  MAX_JOBS                      parallel compile jobs, default bounded so the build fits in memory
                                (an nvcc job that includes torch headers peaks near 3 GB).
Install with `pip install --no-build-isolation .` so the build uses the torch already installed.
"""

from __future__ import annotations

import os
import shutil
import sysconfig
from glob import glob
from pathlib import Path

from setuptools import setup


def _find_cuda_home() -> str | None:
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    # nvcc may be a wrapper script outside the toolkit (as /usr/local/bin/nvcc here), so prefer the usual
    # toolkit root before deriving it from nvcc's location.
    if Path("/usr/local/cuda/bin/nvcc").exists():
        return "/usr/local/cuda"
    nvcc = shutil.which("nvcc")
    return str(Path(nvcc).resolve().parent.parent) if nvcc else None


def _max_jobs() -> str:
    try:
        mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem_gib = 8.0
    return str(max(1, min(os.cpu_count() or 1, int(mem_gib // 4))))


cuda_home = _find_cuda_home()
if cuda_home:
    os.environ["CUDA_HOME"] = cuda_home  # read by torch.utils.cpp_extension at import
os.environ.setdefault("MAX_JOBS", _max_jobs())
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

ROOT = Path(__file__).parent
mode = os.environ.get("EFFKERN_BUILD_CUDA", "auto").lower()
if mode not in ("auto", "0", "1"):
    raise SystemExit(f"EFFKERN_BUILD_CUDA must be auto, 0 or 1, got {mode!r}")
cuda_possible = torch.version.cuda is not None and cuda_home is not None
if mode == "1" and not cuda_possible:
    raise SystemExit(
        f"EFFKERN_BUILD_CUDA=1 but the CUDA kernels cannot be built: torch.version.cuda={torch.version.cuda}, "
        f"CUDA_HOME={cuda_home} (install a CUDA build of torch and the CUDA toolkit)"
    )
with_cuda = cuda_possible and mode != "0"

# -fopenmp: at::parallel_for is a header template that runs serially unless the caller is built with OpenMP
# (the loader then reuses the libgomp.so.1 that torch ships, so there is one OpenMP runtime).
cxx_flags = ["-O3", "-std=c++20", "-fvisibility=hidden", "-fopenmp"]
link_flags = ["-fopenmp"]
sources = sorted(glob("csrc/bindings.cpp") + glob("csrc/cpu/*.cpp"))
if with_cuda:
    sources += sorted(glob("csrc/cuda/*.cu"))
    # cpp_extension does not add the cuBLAS/cuSPARSE headers that ATen's CUDAContextLight.h includes; the
    # nvidia wheels that come with CUDA torch ship them.
    nvidia_include = os.path.join(sysconfig.get_paths()["purelib"], "nvidia", "cu13", "include")
    ext = CUDAExtension(
        "effkern._C",
        sources,
        include_dirs=[str(ROOT / "csrc"), nvidia_include],
        define_macros=[("EFFKERN_WITH_CUDA", None)],
        extra_link_args=link_flags,
        extra_compile_args={
            "cxx": cxx_flags,
            "nvcc": ["-O3", "-std=c++20", "--expt-relaxed-constexpr", "-lineinfo"],
        },
    )
else:
    ext = CppExtension(
        "effkern._C",
        sources,
        include_dirs=[str(ROOT / "csrc")],
        extra_compile_args=cxx_flags,
        extra_link_args=link_flags,
    )

setup(
    ext_modules=[ext],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
