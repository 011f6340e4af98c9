"""The torch-free kernel check (tests/native/stack_kernel_check.cpp) on every instruction set this CPU
runs: exp/tanh against std::exp/std::tanh over the float range, the stack against the check's own
float64 reference for every activation, block, MS and bias setting, inf/NaN inputs, and bitwise
equality across 1, 2 and 3 threads. On a CPU without AVX-512 the AVX-512 kernels run the same check with
SIMDe standing in for the AVX-512 instructions ("avx512-simde"; skipped without Debian's libsimde-dev).
(Arm NEON runs the same check under qemu: ``make test-neon``.)
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import CPU_ISAS

RUN_CHECK = Path(__file__).resolve().parent / "native" / "run_check.py"


EMULATED = () if "avx512" in CPU_ISAS else ("avx512-simde",)
"""The kernels this CPU cannot run, checked through an emulation of their instructions."""


@pytest.mark.parametrize("isa", [*CPU_ISAS, *EMULATED])
def test_kernel_check(isa: str):
    result = subprocess.run([sys.executable, str(RUN_CHECK), isa, "--require"], capture_output=True, text=True,
                            timeout=600)  # fmt: skip
    if isa in EMULATED and result.returncode == 2:
        pytest.skip(result.stdout.strip())  # the emulation's library is not installed; the line says which
    output = result.stdout + result.stderr
    summary = re.search(r"^(\d+) passed, (\d+) failed$", result.stdout, re.MULTILINE)
    assert result.returncode == 0 and summary, output
    assert int(summary.group(1)) > 1000 and summary.group(2) == "0", output
