"""The torch-free kernel check (tests/native/stack_kernel_check.cpp) on every instruction set this CPU
runs: exp/tanh against std::exp/std::tanh over the float range, the stack against the check's own
float64 reference for every activation, block, MS and bias setting, inf/NaN inputs, and bitwise
equality across 1, 2 and 3 threads. (Arm NEON runs the same check under qemu: ``make test-neon``.)
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import CPU_ISAS

RUN_CHECK = Path(__file__).resolve().parent / "native" / "run_check.py"


@pytest.mark.parametrize("isa", CPU_ISAS)
def test_kernel_check(isa: str):
    result = subprocess.run([sys.executable, str(RUN_CHECK), isa, "--require"], capture_output=True, text=True,
                            timeout=600)  # fmt: skip
    output = result.stdout + result.stderr
    summary = re.search(r"^(\d+) passed, (\d+) failed$", result.stdout, re.MULTILINE)
    assert result.returncode == 0 and summary, output
    assert int(summary.group(1)) > 1000 and summary.group(2) == "0", output
