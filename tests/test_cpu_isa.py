"""The instruction set of the float32 CPU kernels: the best this CPU runs by default, DMUP_CPU_ISA pins
another when the package is imported, and a name that is unknown or that this CPU cannot run stops
the import with an error that says what is possible."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

import dmup_kernels

from conftest import CPU_ISAS

pytestmark = pytest.mark.skipif(not dmup_kernels.HAS_CPP, reason="C++ extension not built")


def import_with(isa: str) -> subprocess.CompletedProcess:
    """A fresh interpreter importing dmup_kernels with DMUP_CPU_ISA=isa; prints cpu_isa()."""
    env = dict(os.environ, DMUP_CPU_ISA=isa)
    script = "import dmup_kernels; print(dmup_kernels.cpu_isa())"
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)


def test_default_is_the_best_runnable():
    if os.environ.get("DMUP_CPU_ISA"):
        pytest.skip("DMUP_CPU_ISA is set for this run")
    assert dmup_kernels.cpu_isa() == CPU_ISAS[0]
    assert CPU_ISAS[-1] == ("neon" if platform.machine() in ("aarch64", "arm64") else "portable")


@pytest.mark.parametrize("isa", CPU_ISAS)
def test_pinned_at_import(isa):
    result = import_with(isa)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[-1] == isa


def test_unknown_name_is_rejected():
    result = import_with("sse9")
    assert result.returncode != 0
    assert "ValueError: DMUP_CPU_ISA must be one of 'avx512', 'avx2', 'neon', 'portable'; got 'sse9'" in result.stderr


def test_isa_this_cpu_cannot_run_is_rejected():
    foreign = "avx2" if platform.machine() in ("aarch64", "arm64") else "neon"
    result = import_with(foreign)
    assert result.returncode != 0
    expected = (
        f"RuntimeError: DMUP_CPU_ISA='{foreign}': this CPU cannot run {foreign} code; it runs {', '.join(CPU_ISAS)}"
    )
    assert expected in result.stderr
