"""make gpu-check: the checks only a GPU can run, in about 8 minutes on one H100/H200.

1. the Triton tests on CUDA tensors, compiled (TRITON_INTERPRET=0; tests/conftest.py otherwise turns
   the interpreter on): tests/test_triton_kernels.py;
2. the CUDA C++ tests: tests/test_cuda_kernels.py;
   the op tests' Triton and CUDA cases (their parity with the reference, and checkpoints against saving
   every layer): tests/test_scaled_residual.py, tests/test_residual_stack.py, tests/test_residual_mlp_stack.py,
   tests/test_checkpoint.py with -k "triton or cuda";
3. the non-finite, torch.compile and torch.func tests: tests/test_nonfinite.py, tests/test_compile.py,
   tests/test_func_transforms.py;
4. a quick benchmark (python -m benchmarks.run --device cuda --quick --no-compile): its parity checks,
   and the bandwidth the traffic model implies against the measured copy bandwidth;
5. the routing rule ``fills_the_gpu``: the fused stack and a GEMM per layer timed on shapes either side
   of its threshold, reported beside the rule's choice (timings inform, they do not fail the check).

Prints one summary table; exits 1 when a step fails. Without a GPU it says so in one line and exits 0.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
STEP_TIMEOUT_S = 150
PYTEST = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]


def run_step(name: str, command: list[str]) -> dict:
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    start = time.perf_counter()
    try:
        result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=STEP_TIMEOUT_S)
        ok, tail = result.returncode == 0, (result.stdout + result.stderr).strip().splitlines()[-1:]
    except subprocess.TimeoutExpired:
        ok, tail = False, [f"timed out after {STEP_TIMEOUT_S} s"]
    return {"step": name, "ok": ok, "seconds": time.perf_counter() - start, "detail": tail[0] if tail else ""}


def benchmark_step() -> dict:
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "bench.json"
        step = run_step("quick benchmark", [sys.executable, "-m", "benchmarks.run", "--device", "cuda", "--quick",
                                            "--no-compile", "--out", str(out)])  # fmt: skip
        if out.exists():
            document = json.loads(out.read_text())
            copy = document["machine"].get("copy_gbps")
            best = {}
            for record in document["records"]:
                if record.get("model_gbps") and record["variant"] in ("triton", "cuda"):
                    best[record["variant"]] = max(best.get(record["variant"], 0.0), record["model_gbps"])
            parts = [f"{name} up to {gbps:.0f} GB/s ({gbps / copy:.0%} of copy)" for name, gbps in best.items() if copy]
            step["detail"] = f"copy {copy:.0f} GB/s; " + "; ".join(parts) if copy else step["detail"]
    return step


def routing_step() -> dict:
    """Median times of the fused stack and of a GEMM per layer + epilogue, against the rule's choice."""
    from dmup_kernels import reference
    from dmup_kernels.triton.residual_stack import fills_the_gpu, sm_count

    sms = sm_count(torch.device("cuda"))
    notes = []
    for rows, width in ((64, 1024), (4096, 1024), (64, 256), (4096, 256)):
        x = torch.randn(rows, width, device="cuda")
        weight = torch.randn(32, width, width, device="cuda") / width**0.5
        runs = {
            "fused": lambda x=x, weight=weight: torch.ops.dmup.triton_residual_stack(
                x, weight, None, 0.2, "relu", "post", True, False
            ),
            "per-layer": lambda x=x, weight=weight: reference.residual_stream(
                x, weight, None, scale=0.2, activation="relu", epilogue=torch.ops.dmup.triton_scaled_residual
            ),
        }
        times = {}
        for name, fn in runs.items():
            fn()
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(5):
                fn()
            torch.cuda.synchronize()
            times[name] = (time.perf_counter() - start) / 5
        chosen = "fused" if fills_the_gpu(rows, width, 4, sms) else "per-layer"
        faster = min(times, key=times.get)
        notes.append(f"B={rows} n={width}: rule {chosen}, faster {faster}" + ("" if chosen == faster else " (!)"))
    return {"step": "routing rule", "ok": True, "seconds": 0.0, "detail": "; ".join(notes)}


def main() -> int:
    if not torch.cuda.is_available():
        print("gpu-check: no CUDA device here, nothing to check (run make gpu-check on a GPU)")
        return 0
    steps = [
        run_step("Triton tests on CUDA", [*PYTEST, "tests/test_triton_kernels.py"]),
        run_step("CUDA C++ tests", [*PYTEST, "tests/test_cuda_kernels.py"]),
        run_step(
            "op tests: triton, cuda",
            [
                *PYTEST,
                "-k",
                "triton or cuda",
                "tests/test_scaled_residual.py",
                "tests/test_residual_stack.py",
                "tests/test_residual_mlp_stack.py",
                "tests/test_checkpoint.py",
            ],
        ),  # fmt: skip
        run_step(
            "non-finite/compile/func",
            [*PYTEST, "tests/test_nonfinite.py", "tests/test_compile.py", "tests/test_func_transforms.py"],
        ),  # fmt: skip
        benchmark_step(),
    ]
    os.environ["TRITON_INTERPRET"] = "0"  # before dmup_kernels defines its kernels in this process
    steps.append(routing_step())
    print(f"\n{'step':<26} {'result':<6} {'seconds':>7}  detail")
    for step in steps:
        print(f"{step['step']:<26} {'ok' if step['ok'] else 'FAIL':<6} {step['seconds']:>7.0f}  {step['detail']}")
    return 0 if all(step["ok"] for step in steps) else 1


if __name__ == "__main__":
    sys.exit(main())
