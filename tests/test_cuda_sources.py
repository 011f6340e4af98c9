"""The CUDA sources build without a GPU or a CUDA torch. CI has neither, so this is how it checks
csrc/cuda on every run:

- each op's kernels are csrc/cuda/<op>.cu and its torch glue csrc/cuda/<op>_ops.cpp;
- every .cu file compiles with nvcc on its own (no torch headers), for sm_80 and sm_90, with the
  defines a CUDAExtension build adds, and with no warning;
- the torch glue (csrc/cuda/*.cpp, built for real only by a CUDA torch, see setup.py) passes a
  syntax check against the headers of the installed torch and the CUDA toolkit next to nvcc.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest
from torch.utils import cpp_extension

from conftest import REPO

CSRC = REPO / "csrc"
CUDA_SOURCES = sorted((CSRC / "cuda").glob("*.cu"))
GLUE_SOURCES = sorted((CSRC / "cuda").glob("*.cpp"))
NVCC = shutil.which("nvcc")
CXX = shutil.which("c++") or shutil.which("g++")
ARCHITECTURES = ("80", "90")
TORCH_INCLUDES = cpp_extension.include_paths()


def test_there_are_cuda_sources():
    assert CUDA_SOURCES, f"no .cu files under {CSRC / 'cuda'}"
    assert GLUE_SOURCES, f"no .cpp files under {CSRC / 'cuda'}"


def test_each_op_has_its_kernels_and_glue():
    """<op>.cu beside <op>_ops.cpp: which op lives where, and no two sources share an object file name."""
    kernels = {s.stem for s in CUDA_SOURCES}
    glue = {s.stem.removesuffix("_ops") for s in GLUE_SOURCES if s.stem.endswith("_ops")}
    assert kernels == glue and len(glue) == len(GLUE_SOURCES), (sorted(kernels), [s.name for s in GLUE_SOURCES])


def nvcc_command(source: Path, output: Path) -> list[str]:
    """The compile-check command of one .cu file (also quoted in the README)."""
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in ARCHITECTURES]
    return [NVCC, "-c", str(source), "-o", str(output), "-std=c++17", f"-I{CSRC}", *cpp_extension.COMMON_NVCC_FLAGS,
            *gencode, "-Werror", "all-warnings", "-Xcompiler", "-Wall,-Wextra,-Werror"]  # fmt: skip


@pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH, so the CUDA sources cannot be compile-checked")
@pytest.mark.parametrize("source", CUDA_SOURCES, ids=[s.name for s in CUDA_SOURCES])
def test_nvcc_compiles_without_warnings(source: Path, tmp_path: Path):
    command = nvcc_command(source, tmp_path / "out.o")
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    output = (result.stdout + result.stderr).strip()
    assert result.returncode == 0 and not output, f"{' '.join(command)}\n{output}"


def test_cuda_sources_do_not_include_torch():
    headers = [*(CSRC / "cuda").glob("*.cuh"), CSRC / "cuda" / "launchers.h", CSRC / "activations.h"]
    for source in CUDA_SOURCES + headers:
        includes = [line for line in source.read_text().splitlines() if line.startswith("#include")]
        assert not [i for i in includes if "torch" in i or "ATen" in i or "c10" in i], (source, includes)


def nvcc_include_dirs() -> list[str]:
    """The CUDA toolkit's include directories, as nvcc itself passes them (INCLUDES, SYSTEM_INCLUDES)."""
    result = subprocess.run([NVCC, "--dryrun", "-c", "-x", "cu", "-", "-o", "-"], capture_output=True, text=True,
                            input="", timeout=60)  # fmt: skip
    lines = [line for line in result.stderr.splitlines() if "INCLUDES=" in line]
    dirs = [d for line in lines for d in re.findall(r'(?:-I|"-isystem" ")([^"\s]+)', line)]
    return [d for d in dirs if Path(d).is_dir()]


def glue_skip_reason() -> str | None:
    if NVCC is None or CXX is None:
        return "nvcc (to locate the CUDA headers) or a C++ compiler is not on PATH"
    if not any((Path(d) / "c10" / "cuda" / "CUDAStream.h").exists() for d in TORCH_INCLUDES):
        return "the installed torch ships no c10/cuda headers"
    if not any((Path(d) / "cuda_runtime.h").exists() for d in nvcc_include_dirs()):
        return "nvcc's include directories hold no cuda_runtime.h"
    return None


GLUE_SKIP_REASON = glue_skip_reason()


@pytest.mark.skipif(GLUE_SKIP_REASON is not None, reason=str(GLUE_SKIP_REASON))
@pytest.mark.parametrize("source", GLUE_SOURCES, ids=[s.name for s in GLUE_SOURCES])
def test_glue_passes_syntax_check(source: Path, tmp_path: Path):
    # A CPU wheel ships the c10/cuda headers but not the one its CUDA build generates; an empty one
    # stands in for it (it only defines build options the glue does not use).
    stub = tmp_path / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
    stub.parent.mkdir(parents=True)
    stub.write_text("#pragma once\n")
    system = [*TORCH_INCLUDES, *nvcc_include_dirs(), sysconfig.get_paths()["include"], str(tmp_path)]
    command = [CXX, "-std=c++20", "-fsyntax-only", "-Wall", "-Wextra", "-Werror", f"-I{CSRC}",
               *[arg for d in system for arg in ("-isystem", d)], str(source)]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    output = (result.stdout + result.stderr).strip()
    assert result.returncode == 0 and not output, f"{' '.join(command)}\n{output}"
