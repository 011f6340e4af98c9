"""Builds tests/native/stack_kernel_check.cpp for one instruction set and runs it.

    python3 tests/native/run_check.py avx512|avx2|portable|neon [--require]

x86 instruction sets build with the host's c++ and run natively; neon cross-compiles with
aarch64-linux-gnu-g++ (statically, with OpenMP) and runs under qemu-aarch64. Where the compiler or
the emulator is missing it says so in one line and exits 0, or 2 with --require. The harness prints
"N passed, M failed" and exits non-zero on any failure; so does this script.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
SOURCE = HERE / "stack_kernel_check.cpp"
BUILD = ROOT / "build" / "native"

# instruction set -> (compiler, target flags, runner prefix)
TARGETS: dict[str, tuple[str, list[str], list[str]]] = {
    "avx512": ("c++", ["-mavx512f", "-mavx512bw", "-mavx512dq", "-mavx512vl", "-mfma"], []),
    "avx2": ("c++", ["-mavx2", "-mfma"], []),
    "portable": ("c++", [], []),
    "neon": ("aarch64-linux-gnu-g++", ["-static"], ["qemu-aarch64"]),
}
INSTALL_HINT = "apt-get install g++-aarch64-linux-gnu qemu-user"


def missing_tools(isa: str) -> list[str]:
    compiler, _, runner = TARGETS[isa]
    return [tool for tool in [compiler, *runner[:1]] if shutil.which(tool) is None]


def build(isa: str) -> Path:
    compiler, flags, _ = TARGETS[isa]
    BUILD.mkdir(parents=True, exist_ok=True)
    binary = BUILD / f"stack_kernel_check_{isa}"
    command = [compiler, "-O2", "-std=c++17", "-fopenmp", "-Wall", "-Wno-unknown-pragmas", *flags,
               f"-DDMUP_CHECK_{isa.upper()}", f"-DDMUP_CHECK_ISA={isa}", f"-I{ROOT / 'csrc'}",
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
        print(f"{isa} kernel check NOT RUN: {', '.join(missing)} not installed ({INSTALL_HINT})")
        return 2 if require else 0
    binary = build(isa)
    return subprocess.run([*TARGETS[isa][2], str(binary)]).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
