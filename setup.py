"""Builds dmup_kernels and its C++ extension dmup_kernels._C from csrc/.

CPU kernels are always built. Set DMUP_PORTABLE=1 to build for baseline x86-64 instead of the
host CPU (-march=native); the AVX-512 stack kernel is chosen at run time either way.
"""

import glob
import os

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def cxx_flags() -> list[str]:
    flags = ["-O3", "-fopenmp", "-fno-math-errno", "-Wall", "-Wno-unknown-pragmas"]
    if os.environ.get("DMUP_PORTABLE", "0") != "1":
        flags.append("-march=native")
    return flags


def extension() -> CppExtension:
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    return CppExtension(
        name="dmup_kernels._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={"cxx": cxx_flags()},
        extra_link_args=["-fopenmp"],
    )


setup(
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
