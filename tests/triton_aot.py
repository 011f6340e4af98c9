"""Compiles the Triton kernels ahead of time for NVIDIA GPUs (no GPU or driver needed): the compile
path the interpreter skips (constexpr rules, tl.dot shapes and dtypes, layouts, register allocation).

Run without TRITON_INTERPRET and with DMUP_AUTOTUNE=0 (the launchers then pass the pinned configs):

    DMUP_AUTOTUNE=0 python tests/triton_aot.py sm_90 sm_80

Each launch the Python launchers make for a set of sample problems is recorded instead of run, turned
into a signature (tensor dtypes, int and float arguments) plus its constexprs, and compiled to a cubin
for every target. Prints one JSON object per compiled kernel: name, target, constexprs, registers,
shared memory,
stack (spill) and local bytes, and whether the PTX has 16-byte global loads and stores.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from dmup_kernels.triton import residual_mlp_stack, residual_stack, scaled_residual

# 16-byte global accesses: 4 x 32-bit or 2 x 64-bit vectors, or 16-byte asynchronous copies to shared memory
WIDE_LOAD = r"ld\.global[\w.:]*\.(v4\.[bf]32|v2\.[bf]64)|cp\.async\.[\w.]*shared\.global \[[^]]*\], \[[^]]*\], 0x10"
WIDE_STORE = r"st\.global[\w.:]*\.(v4\.[bf]32|v2\.[bf]64)"
POINTER_TYPES = {
    torch.float32: "*fp32", torch.float64: "*fp64", torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.uint8: "*u8",
}  # fmt: skip
ACTIVATIONS = ("relu", "abs", "gelu", "silu", "identity")
HALF_DTYPES = (torch.bfloat16, torch.float16)


def recorded_launches() -> list[tuple[object, dict, dict]]:
    """(kernel, signature, constexprs, attrs, num_warps, num_stages) of every launch the sample problems make."""
    launches = []

    def record(kernel, grid, pinned, *args, **kwargs):
        constexprs = {**kwargs, **pinned.kwargs}
        signature, attrs = {}, {}
        for index, (param, value) in enumerate(zip(kernel.params, args)):
            # what the JIT specializes on: an annotated type, integers equal to 1 (constants), 16-byte
            # aligned pointers and integers divisible by 16
            name = param.name
            if isinstance(value, torch.Tensor):
                signature[name] = POINTER_TYPES[value.dtype]
                aligned = value.data_ptr() % 16 == 0
            elif isinstance(value, float):
                signature[name], aligned = param.annotation_type or "fp32", False
            elif value == 1 and not param.do_not_specialize:
                constexprs[name] = 1
                continue
            else:
                signature[name] = "i64" if abs(value) >= 2**31 else "i32"
                aligned = value % 16 == 0 and not param.do_not_specialize
            if aligned:
                attrs[(index,)] = [["tt.divisibility", 16]]
        signature.update({name: "constexpr" for name in constexprs})
        launches.append((kernel, signature, constexprs, attrs, pinned.num_warps, pinned.num_stages))

    residual_stack.launch = scaled_residual.launch = residual_mlp_stack.launch = record
    for dtype in (torch.float32, torch.float64, *HALF_DTYPES):
        for activation in ("relu", "gelu") if dtype == torch.float64 else ACTIVATIONS:
            x = torch.randn(37, 48, dtype=dtype)
            scaled_residual.scaled_residual_forward(x, x, 0.5, activation, True)
            scaled_residual.scaled_residual_backward(x, x, 0.5, activation, True)
    for dtype in (torch.float32, *HALF_DTYPES):
        wide = torch.randn(2, 9000, dtype=dtype)
        scaled_residual.scaled_residual_forward(wide, wide, 0.5, "gelu", True)  # two passes
    # Half precision: every activation through every stack kernel (post block: sign bits or h saved;
    # pre block: phi on the GEMM operand), depth-fused and one fused-block width.
    half_stacks = [
        (64, dtype, activation, "post", activation != "identity") for dtype in HALF_DTYPES for activation in ACTIVATIONS
    ]
    half_stacks += [(64, dtype, activation, "pre", True) for dtype in HALF_DTYPES for activation in ("gelu", "silu")]
    half_stacks += [(512, dtype, "silu", "post", True) for dtype in HALF_DTYPES]
    for width, dtype, activation, block, bias in [
        (48, torch.float32, "relu", "post", True),
        (128, torch.float32, "abs", "post", False),
        (256, torch.float32, "gelu", "post", True),
        (64, torch.float32, "silu", "pre", True),
        (512, torch.float32, "relu", "post", False),  # one launch per layer (fused block)
        (1024, torch.float32, "identity", "pre", False),
        (64, torch.float64, "abs", "post", True),
        (512, torch.float64, "gelu", "post", True),
        *half_stacks,
    ]:
        x = torch.randn(40, width, dtype=dtype)
        weight = torch.randn(2, width, width, dtype=dtype)
        b = torch.randn(2, width, dtype=dtype) if bias else None
        out, states, signs, pre = residual_stack.stack_forward(x, weight, b, 0.5, activation, block, True, True)
        residual_stack.stack_backward(out, x, states, signs, pre, weight, b, 0.5, activation, block, True)
    one = torch.randn(1, 32)  # B = 1 and L = 1: arguments equal to 1 become constants
    out, states, signs, pre = residual_stack.stack_forward(
        one, torch.randn(1, 32, 32), None, 0.5, "relu", "post", True, True
    )
    residual_stack.stack_backward(out, one, states, signs, pre, torch.randn(1, 32, 32), None, 0.5, "relu", "post", True)
    # The depth-fused MLP stack: every activation in half precision, the widest stream in float32 and float64
    # (the smallest pinned config), a partial hidden chunk.
    half_mlp = [(64, 96, dtype, activation, True) for dtype in HALF_DTYPES for activation in ACTIVATIONS]
    for width, hidden, dtype, activation, bias in [
        (32, 128, torch.float32, "relu", True),
        (64, 300, torch.float32, "abs", False),
        (64, 256, torch.float32, "gelu", True),
        (128, 256, torch.float32, "silu", True),
        (128, 100, torch.float32, "abs", False),
        (48, 64, torch.float32, "identity", False),
        (64, 256, torch.float64, "silu", True),
        (128, 100, torch.float64, "relu", False),
        (16, 64, torch.float64, "abs", True),
        *half_mlp,
    ]:
        x = torch.randn(40, width, dtype=dtype)
        weights = [torch.randn(2, hidden, width, dtype=dtype), torch.randn(2, width, hidden, dtype=dtype)]
        biases = [torch.randn(2, hidden, dtype=dtype), torch.randn(2, width, dtype=dtype)] if bias else [None, None]
        out, states, signs = residual_mlp_stack.mlp_stack_forward(x, *weights, *biases, 0.5, activation, True, True)
        residual_mlp_stack.mlp_stack_backward(out, x, states, signs, *weights, *biases, 0.5, activation, True)
    return launches


def resource_usage(cubin: bytes) -> dict[str, int]:
    """Registers per thread, stack frame and local memory bytes (spills) of a cubin, from cuobjdump
    (bundled with triton)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as binary:
        binary.write(cubin)
        binary.flush()
        report = subprocess.run(
            [triton.knobs.nvidia.cuobjdump.path, "-res-usage", binary.name], capture_output=True, text=True, check=True
        ).stdout
    usage = dict(re.findall(r"(REG|STACK|LOCAL|SHARED):(\d+)", report))
    return {"registers": int(usage["REG"]), "stack_bytes": int(usage["STACK"]), "local_bytes": int(usage["LOCAL"]),
            "shared_bytes": int(usage["SHARED"])}  # fmt: skip


def compile_one(job: tuple) -> str:
    """One kernel compiled for one target, as a JSON line."""
    (kernel, signature, constexprs, attrs, num_warps, num_stages), target = job
    compiled = triton.compile(
        ASTSource(kernel, signature, constexprs, attrs),
        target=GPUTarget("cuda", int(target.removeprefix("sm_")), 32),
        options={"num_warps": num_warps, "num_stages": num_stages},
    )
    ptx = compiled.asm["ptx"]
    return json.dumps(
        {
            "kernel": kernel.fn.__name__,
            "target": target,
            "constexprs": constexprs,
            "signature": {name: kind for name, kind in signature.items() if kind != "constexpr"},
            "num_warps": num_warps,
            "num_stages": num_stages,
            **resource_usage(compiled.asm["cubin"]),
            "dynamic_shared_bytes": compiled.metadata.shared,
            "vector_loads": bool(re.search(WIDE_LOAD, ptx)),
            "vector_stores": bool(re.search(WIDE_STORE, ptx)),
        }
    )


JOBS: list[tuple] = []


def _compile_job(index: int) -> str:
    return compile_one(JOBS[index])


def main(targets: list[str]) -> None:
    """Compiles every distinct launch for every target, one process per core (forked workers inherit
    JOBS: kernels do not pickle)."""
    unique = {}
    for launch in recorded_launches():
        kernel, signature, constexprs = launch[:3]
        key = (kernel.fn.__name__, json.dumps(signature, sort_keys=True), json.dumps(constexprs, sort_keys=True))
        unique.setdefault(key, launch)
    JOBS.extend((launch, target) for launch in unique.values() for target in targets)
    with multiprocessing.get_context("fork").Pool(os.cpu_count()) as pool:
        for line in pool.imap(_compile_job, range(len(JOBS))):
            print(line, flush=True)


if __name__ == "__main__":
    main(sys.argv[1:] or ["sm_90"])
