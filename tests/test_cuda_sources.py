"""The CUDA kernels compile with nvcc on their own (no torch headers), for sm_80 and sm_90, with no
warning. CI has no GPU and a CPU-only torch, so this is how it checks csrc/cuda on every run; the
torch glue (csrc/cuda/ops_cuda.cpp) is built only by a CUDA torch (setup.py)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

CSRC = Path(__file__).resolve().parents[1] / "csrc"
CUDA_SOURCES = sorted((CSRC / "cuda").glob("*.cu"))
NVCC = shutil.which("nvcc")
ARCHITECTURES = ("80", "90")


def test_there_are_cuda_sources():
    assert CUDA_SOURCES, f"no .cu files under {CSRC / 'cuda'}"


@pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH, so the CUDA sources cannot be compile-checked")
@pytest.mark.parametrize("source", CUDA_SOURCES, ids=[s.name for s in CUDA_SOURCES])
def test_nvcc_compiles_without_warnings(source: Path, tmp_path: Path):
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in ARCHITECTURES]
    command = [NVCC, "-c", str(source), "-o", str(tmp_path / "out.o"), "-std=c++17", f"-I{CSRC}", *gencode,
               "-Werror", "all-warnings", "-Xcompiler", "-Wall,-Wextra,-Werror"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    output = (result.stdout + result.stderr).strip()
    assert result.returncode == 0 and not output, f"{' '.join(command)}\n{output}"


def test_cuda_sources_do_not_include_torch():
    for source in CUDA_SOURCES + [CSRC / "cuda" / "launchers.h", CSRC / "activations.h"]:
        includes = [line for line in source.read_text().splitlines() if line.startswith("#include")]
        assert not [i for i in includes if "torch" in i or "ATen" in i or "c10" in i], (source, includes)
