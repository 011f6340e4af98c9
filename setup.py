"""Builds dmup_kernels and its C++ extension dmup_kernels._C from csrc/.

CPU kernels are always built; the CUDA kernels (csrc/cuda) too when torch has CUDA and CUDA_HOME is
set. The build is portable: it targets the architecture's baseline, and each instruction set's stack
kernel (csrc/cpu/residual_stack_<isa>.cpp) sets its own target flags, so one build runs on any CPU of
its architecture and picks the kernel at run time. DMUP_NATIVE=1 builds everything for the host CPU
(-march=native) instead.
"""

import glob
import os
import sys

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))
WITH_CUDA = torch.version.cuda is not None and CUDA_HOME is not None


def cxx_flags() -> list[str]:
    flags = ["-O3", "-fopenmp", "-fno-math-errno", "-Wall", "-Wno-unknown-pragmas"]
    if os.environ.get("DMUP_NATIVE", "0") == "1":
        flags.append("-march=native")
    return flags


def link_flags() -> list[str]:
    # A compiler that links libstdc++ statically puts a private copy of it in the extension; exported, that
    # copy's symbols mix with the process's shared libstdc++, and a C++ error message that formats a number
    # comes out cut short or crashes the process. Keeping the copy's symbols local prevents that; with the
    # usual shared libstdc++ the flag changes nothing.
    return ["-fopenmp", "-Wl,--exclude-libs,ALL"] if sys.platform.startswith("linux") else ["-fopenmp"]


def extension():
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    kwargs = dict(
        name="dmup_kernels._C",
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_link_args=link_flags(),
    )
    if WITH_CUDA:
        # Per op, <op>.cu (kernels) and <op>_ops.cpp (torch glue): the build names each object file
        # by its source's stem, so a .cu and a .cpp of the same stem would overwrite one object.
        sources += sorted(glob.glob("csrc/cuda/*.cpp") + glob.glob("csrc/cuda/*.cu"))
        flags = {"cxx": cxx_flags(), "nvcc": ["-O3", "-std=c++17"]}
        return CUDAExtension(sources=sources, extra_compile_args=flags, **kwargs)
    return CppExtension(sources=sources, extra_compile_args={"cxx": cxx_flags()}, **kwargs)


setup(
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
