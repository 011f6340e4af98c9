"""Builds tests/native/stack_kernel_check.cpp for one instruction set and runs it.

    python3 tests/native/run_check.py avx512|avx2|portable|neon|avx512-simde [--require]

x86 instruction sets build with the host's c++ and run natively; neon cross-compiles with
aarch64-linux-gnu-g++ (statically, with OpenMP) and runs under qemu-aarch64; avx512-simde builds the
AVX-512 kernels for AVX2 with SIMDe standing in for the AVX-512 intrinsics (avx512_on_simde.h), so that
they are checked on a CPU without AVX-512. Where a tool or header is missing it says so in one line and
exits 0, or 2 with --require. The harness prints "N passed, M failed" and exits non-zero on any failure;
so does this script.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
SOURCE = HERE / "stack_kernel_check.cpp"
BUILD = ROOT / "build" / "native"


class Target(NamedTuple):
    kernels: str  # the traits the check instantiates: avx512, avx2, neon or portable
    compiler: str
    flags: list[str]
    runner: list[str]  # prefix of the command that runs the binary
    header: str | None  # a header the build needs beside the compiler's own
    install: str  # what provides the compiler, runner and header


TARGETS: dict[str, Target] = {
    "avx512": Target("avx512", "c++", ["-mavx512f", "-mavx512bw", "-mavx512dq", "-mavx512vl", "-mfma"], [], None, ""),
    "avx2": Target("avx2", "c++", ["-mavx2", "-mfma"], [], None, ""),
    "portable": Target("portable", "c++", [], [], None, ""),
    "neon": Target(
        "neon", "aarch64-linux-gnu-g++", ["-static"], ["qemu-aarch64"], None,
        "apt-get install g++-aarch64-linux-gnu qemu-user",
    ),
    "avx512-simde": Target(
        "avx512", "c++", ["-mavx2", "-mfma", "-Wno-psabi", "-include", str(HERE / "avx512_on_simde.h")], [],
        "simde/x86/avx512.h", "apt-get install libsimde-dev",
    ),
}  # fmt: skip


def has_header(compiler: str, header: str) -> bool:
    """Whether ``compiler`` finds ``header`` on its include path."""
    probe = subprocess.run([compiler, "-E", "-x", "c++", "-", "-o", os.devnull], input=f"#include <{header}>\n",
                           capture_output=True, text=True)  # fmt: skip
    return probe.returncode == 0


def missing_tools(isa: str) -> list[str]:
    target = TARGETS[isa]
    missing = [tool for tool in [target.compiler, *target.runner[:1]] if shutil.which(tool) is None]
    if not missing and target.header and not has_header(target.compiler, target.header):
        missing.append(target.header)
    return missing


def build(isa: str) -> Path:
    target = TARGETS[isa]
    BUILD.mkdir(parents=True, exist_ok=True)
    binary = BUILD / f"stack_kernel_check_{isa}"
    command = [target.compiler, "-O2", "-std=c++17", "-fopenmp", "-Wall", "-Wno-unknown-pragmas", *target.flags,
               f"-DDMUP_CHECK_{target.kernels.upper()}", f"-DDMUP_CHECK_ISA={isa}", f"-I{ROOT / 'csrc'}",
               str(SOURCE), "-o", str(binary)]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True)
    # A static libgomp warns that its dlopen needs the build's glibc at run time; nothing else may.
    noise = "requires at runtime the shared libraries from the glibc version used for linking"
    output = "\n".join(line for line in result.stderr.splitlines() if noise not in line and "libgomp.a" not in line)
    if result.returncode != 0 or output.strip():
        raise SystemExit(f"building the {isa} check failed:\n{' '.join(command)}\n{result.stderr}")
    return binary


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in TARGETS:
        raise SystemExit(__doc__)
    isa, require = argv[0], "--require" in argv[1:]
    missing = missing_tools(isa)
    if missing:
        print(f"{isa} kernel check NOT RUN: {', '.join(missing)} not installed ({TARGETS[isa].install})")
        return 2 if require else 0
    binary = build(isa)
    return subprocess.run([*TARGETS[isa].runner, str(binary)]).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
