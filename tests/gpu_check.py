"""make gpu-check: the checks only a GPU can run, on one H100/H200 in at most GPU_CHECK_SECONDS (540).

It runs with the Python that holds a CUDA build of torch (make's GPU_PYTHON, default python3: on a GPU
machine the system's torch, not the CPU build pinned in .venv) and builds the extension in place first.
Steps, most important first; each prints its line as soon as it ends, so a run cut short still reports:

0. build: ``setup.py build_ext --inplace --force``, with the CUDA kernels (MAX_JOBS = the CPU count), then a
   check that the extension has them and that Triton imports, and that an error the C++ code raises with
   shapes in its message reaches Python whole, as a ValueError (on one GPU image, whose compiler linked a
   copy of libstdc++ into the extension, formatting a number crashed the process until setup.py kept that
   copy's symbols local);
1. the CUDA C++ tests: tests/test_cuda_kernels.py;
2. the Triton tests on CUDA tensors, compiled (TRITON_INTERPRET=0; tests/conftest.py otherwise turns the
   interpreter on): tests/test_triton_kernels.py;
3. the op tests' Triton and CUDA cases (parity with the reference, checkpoints against saving every
   layer, the modules): tests/test_scaled_residual.py, test_residual_stack.py, test_residual_mlp_stack.py,
   test_checkpoint.py, test_modules.py with -k "triton or cuda";
4. the non-finite, torch.compile and torch.func tests, their Triton and CUDA cases;
5. a quick benchmark (python -m benchmarks.run --device cuda --quick --no-compile): its parity checks, and
   the bandwidth the traffic model implies against the measured copy bandwidth;
6. the routing rule ``fills_the_gpu``: the fused stack and a GEMM per layer timed on shapes either side of
   its threshold, beside the rule's choice (timings inform, they do not fail the check);
7. autotuning, if 150 s are left: one stack problem forward and backward with DMUP_AUTOTUNE on (each
   shape compiles dozens of configs, so steps 1-6 launch the pinned configs, DMUP_AUTOTUNE=0).

The pytest steps run on 8 workers where pytest-xdist is installed (the kernels compile in parallel); one
fails when a test fails or none passed, and its line gives pytest's counts. With GPU_CHECK_LOGS set to a
folder, each step's whole output goes to <step>.log there, and the quick benchmark's JSON to bench.json
(a lent GPU is held for minutes: one run must bring back every traceback). A step that raises or runs out
of time fails with the reason. Exits 1 when a step fails. On a machine without an NVIDIA device it says
so in one line and exits 0; on one whose torch cannot use the device (a CPU build), it exits 1.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

try:
    import torch
except ImportError:  # this Python has no torch: main() says which Python to run with
    torch = None

ROOT = Path(__file__).resolve().parent.parent
DEADLINE_S = float(os.environ.get("GPU_CHECK_SECONDS", "540"))
AUTOTUNE_MIN_S = 150
PYTEST = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
if importlib.util.find_spec("xdist") is not None:
    PYTEST += ["-n", "8"]
# The steps import the package built in place from the repository (GPU_PYTHON does not have it installed).
STEP_ENV = {
    "TRITON_INTERPRET": "0",
    "DMUP_AUTOTUNE": "0",
    "PYTHONUNBUFFERED": "1",
    "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
}
LOGS = Path(os.environ["GPU_CHECK_LOGS"]) if os.environ.get("GPU_CHECK_LOGS") else None
START = time.monotonic()


def seconds_left() -> float:
    return DEADLINE_S - (time.monotonic() - START)


def report(name: str, result: str, seconds: float, detail: str) -> bool:
    print(f"{name:<26} {result:<6} {seconds:>7.0f}  {detail}", flush=True)
    return result != "FAIL"


def last_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[-1] if lines else ""


def run(name: str, command: list[str], budget_s: float, env: dict[str, str] | None = None, judge=None) -> bool:
    """Runs ``command`` in the repository with at most ``budget_s`` seconds (and what the deadline leaves);
    ``judge(returncode, stdout, stderr)`` gives (ok, detail), by default the exit status and the last line of
    stdout (of stderr when it failed). On timeout the step's whole process group is killed (pytest's workers,
    the compilers of a build), so that nothing of it runs into the next step."""
    limit = min(budget_s, seconds_left())
    if limit < 10:
        return report(name, "FAIL", 0, "no time left before the deadline")
    start = time.monotonic()
    try:
        with subprocess.Popen(
            command, cwd=ROOT, env={**os.environ, **STEP_ENV, **(env or {})}, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True, start_new_session=True,
        ) as process:  # fmt: skip
            try:
                out, err = process.communicate(timeout=limit)
                ok, detail = (judge or default_judge)(process.returncode, out, err)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                out, err = process.communicate()
                ok, detail = False, f"timed out after {limit:.0f} s"
    except Exception as error:  # a step that cannot even start is a failure with its reason, not a crash
        ok, detail, out, err = False, f"{type(error).__name__}: {error}", "", ""
    if LOGS is not None:
        LOGS.mkdir(parents=True, exist_ok=True)
        text = f"$ {' '.join(command)}\n{detail}\n--- stdout\n{out}\n--- stderr\n{err}"
        (LOGS / f"{re.sub('[^A-Za-z0-9]+', '-', name).strip('-')}.log").write_text(text)
    return report(name, "ok" if ok else "FAIL", time.monotonic() - start, detail)


def default_judge(code: int, out: str, err: str) -> tuple[bool, str]:
    """Ok on exit status 0, with the last line of stdout (of stderr when it failed). When a signal killed the
    process, it names the signal, the compiler, and how many of libstdc++'s locale symbols the extension
    defines itself (a private copy of that code, as on the image where C++ errors crashed)."""
    if code >= 0:
        return code == 0, last_line(out) if code == 0 else last_line(err) or last_line(out)
    compiler = os.environ.get("CXX") or sysconfig.get_config_var("CXX")
    detail = f"killed by {signal.Signals(-code).name}; the extension was built with {compiler}"
    extension = ROOT / "dmup_kernels" / f"_C{sysconfig.get_config_var('EXT_SUFFIX')}"
    if extension.exists() and shutil.which("nm"):
        symbols = subprocess.run(["nm", "-C", "--defined-only", extension], capture_output=True, text=True).stdout
        detail += f" and defines {symbols.count('std::locale')} std::locale symbols itself"
    return False, detail


def pytest_judge(code: int, out: str, err: str) -> tuple[bool, str]:
    """pytest's summary line: ok when it exited 0 and something passed."""
    summary = last_line(out) or last_line(err)
    return code == 0 and " passed" in summary, summary


def bench_judge(path: Path):
    def judge(code: int, out: str, err: str) -> tuple[bool, str]:
        if code != 0 or not path.exists():
            return False, last_line(err) or last_line(out)
        document = json.loads(path.read_text())
        copy = document.get("machine", {}).get("copy_gbps")
        best: dict[str, float] = {}
        for record in document.get("records", []):
            if record.get("model_gbps") and record.get("variant") in ("triton", "cuda"):
                best[record["variant"]] = max(best.get(record["variant"], 0.0), record["model_gbps"])
        if not copy:
            return True, last_line(out)
        parts = [f"{name} up to {gbps:.0f} GB/s ({gbps / copy:.0%} of copy)" for name, gbps in best.items()]
        return True, f"pinned configs; copy {copy:.0f} GB/s; " + "; ".join(parts)

    return judge


def routing() -> str:
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
    return "; ".join(notes)


def autotuned_stack() -> str:
    """One stack problem, forward and backward, on the autotuned Triton kernels against the float64 reference."""
    from benchmarks.measure import TOLERANCE, rel_err
    from dmup_kernels import residual_stack

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(256, 64, generator=generator, dtype=torch.float64)
    weight = torch.randn(8, 64, 64, generator=generator, dtype=torch.float64) / 8
    grad_out = torch.randn(256, 64, generator=generator, dtype=torch.float64)
    results = {}
    for backend, dtype, device in (("reference", torch.float64, "cpu"), ("triton", torch.float32, "cuda")):
        leaves = [t.detach().to(device, dtype).requires_grad_() for t in (x, weight)]
        out = residual_stack(*leaves, scale=0.35, backend=backend)
        out.backward(grad_out.to(device, dtype))
        results[backend] = [out.detach(), *(leaf.grad for leaf in leaves)]
    names = ("out", "grad_x", "grad_weight")
    errors = {name: rel_err(got, want) for name, got, want in zip(names, results["triton"], results["reference"])}
    if max(errors.values()) > TOLERANCE[torch.float32]:
        raise AssertionError(f"autotuned kernels off the reference: {errors}")
    return "rel. errors " + ", ".join(f"{name} {error:.1e}" for name, error in errors.items())


def in_subprocess(function: str) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), function]


def has_nvidia_device() -> bool:
    return Path("/dev/nvidiactl").exists() or shutil.which("nvidia-smi") is not None


def errors_reach_python() -> str:
    """An op's input error from C++ raised as a ValueError, the shapes in its message formatted whole."""
    import dmup_kernels  # noqa: F401 (registers the ops)

    x = torch.randn(4, 6, device="cuda")
    try:
        torch.ops.dmup.scaled_residual(x, x[:, :5].contiguous(), 0.5, "relu", False)
    except ValueError as error:
        message = str(error).splitlines()[0]
        if "[4, 6]" not in message or "[4, 5]" not in message:
            raise AssertionError(f"the shapes are missing from the message: {message!r}") from error
        return f"ValueError: {message[:80]}"
    raise AssertionError("scaled_residual accepted tensors of two shapes")


def has_cuda_kernels() -> str:
    from dmup_kernels.ops._backend import HAS_CUDA_KERNELS
    from dmup_kernels.triton import HAS_TRITON

    if not (HAS_CUDA_KERNELS and HAS_TRITON):
        raise RuntimeError(f"HAS_CUDA_KERNELS={HAS_CUDA_KERNELS}, HAS_TRITON={HAS_TRITON}")
    return "CUDA kernels and Triton present"


# The steps that run in a subprocess of their own (``in_subprocess``): each prints its detail, or raises.
SUBPROCESS_STEPS = {
    "has_cuda_kernels": has_cuda_kernels,
    "errors_reach_python": errors_reach_python,
    "routing": routing,
    "autotuned_stack": autotuned_stack,
}


def main() -> int:
    if torch is None or not torch.cuda.is_available():
        if has_nvidia_device():
            what = "has no torch" if torch is None else f"has torch {torch.__version__}, which cannot use it"
            print(f"gpu-check: FAIL: this machine has an NVIDIA device, but {sys.executable} {what}; "
                  "run it with the Python of a CUDA build of torch: make gpu-check GPU_PYTHON=...")  # fmt: skip
            return 1
        print("gpu-check: no CUDA device here, nothing to check (run make gpu-check on a GPU)")
        return 0
    print(f"gpu-check on {torch.cuda.get_device_name()}, torch {torch.__version__}, deadline {DEADLINE_S:.0f} s")
    print(f"{'step':<26} {'result':<6} {'seconds':>7}  detail", flush=True)
    results = [
        run(
            "build (CUDA kernels)",
            [sys.executable, "setup.py", "build_ext", "--inplace", "--force"],  # not a CPU torch's build left here
            240,
            env={"MAX_JOBS": str(os.cpu_count() or 1)},
            judge=lambda code, out, err: (code == 0, "built" if code == 0 else last_line(err) or last_line(out)),
        ),
        run("extension has CUDA kernels", in_subprocess("has_cuda_kernels"), 60),
        run("C++ errors reach Python", in_subprocess("errors_reach_python"), 60),
    ]
    for name, files, budget in (
        ("CUDA C++ tests", ["tests/test_cuda_kernels.py"], 60),
        ("Triton tests on CUDA", ["tests/test_triton_kernels.py"], 90),
        ("op tests: triton, cuda", [f"tests/test_{op}.py" for op in ("scaled_residual", "residual_stack",
                                                                      "residual_mlp_stack", "checkpoint",
                                                                      "modules")], 150),
        ("non-finite/compile/func", ["tests/test_nonfinite.py", "tests/test_compile.py",
                                     "tests/test_func_transforms.py"], 90),
    ):  # fmt: skip
        results.append(run(name, [*PYTEST, "-k", "triton or cuda", *files], budget, judge=pytest_judge))
    with tempfile.TemporaryDirectory() as folder:
        out = (LOGS or Path(folder)) / "bench.json"
        command = [
            sys.executable,
            "-m",
            "benchmarks.run",
            "--device",
            "cuda",
            "--quick",
            "--no-compile",
            "--out",
            str(out),
        ]
        results.append(run("quick benchmark", command, 90, judge=bench_judge(out)))
    results.append(run("routing rule", in_subprocess("routing"), 45))
    if seconds_left() >= AUTOTUNE_MIN_S:
        results.append(run("autotuned stack", in_subprocess("autotuned_stack"), AUTOTUNE_MIN_S, {"DMUP_AUTOTUNE": "1"}))
    else:
        report("autotuned stack", "skip", 0, f"less than {AUTOTUNE_MIN_S} s left before the deadline")
    print(f"gpu-check: {sum(results)} of {len(results)} steps ok in {time.monotonic() - START:.0f} s "
          f"(a step cut short by the deadline of {DEADLINE_S:.0f} s counts as failed)")  # fmt: skip
    return 0 if all(results) else 1


if __name__ == "__main__":
    if len(sys.argv) > 1:  # one of SUBPROCESS_STEPS, run by in_subprocess
        print(SUBPROCESS_STEPS[sys.argv[1]]())
        sys.exit(0)
    sys.exit(main())
