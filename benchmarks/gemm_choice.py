"""Measures the rule behind kBlasMinWidth (csrc/cpu/residual_stack.cpp): for each width, the cpp stack's
training step with its GEMMs on the micro-kernel (DMUP_STACK_GEMM=kernel) against the BLAS
(DMUP_STACK_GEMM=blas), interleaved in one process.

    python -m benchmarks.gemm_choice [--widths 32 64 96 128 192 256] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import statistics

import torch

from .cases import Case, make_problem
from .measure import step, time_round_robin
from .variants import backend_module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--widths", type=int, nargs="+", default=[32, 64, 96, 128, 192, 256])
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"threads {torch.get_num_threads()}; training step, relu, post, MS; B = 2n, L = 32768 / n")
    print(f"{'n':>5} {'B':>5} {'L':>5} {'kernel ms':>10} {'blas ms':>10} {'blas/kernel':>12}")
    for width in args.widths:
        case = Case("residual_stack", 2 * width, width, 32768 // width)
        problem = make_problem(case)
        module = backend_module(case, problem.params, "cpp")
        inputs = problem.leaf_inputs()

        def run(choice: str):
            def call() -> None:
                os.environ["DMUP_STACK_GEMM"] = choice
                step(module, inputs, case.mode)

            return call

        times, errors = time_round_robin(
            {"kernel": run("kernel"), "blas": run("blas")}, warmup=2, min_repeats=7, max_repeats=30, budget_s=4.0
        )
        os.environ.pop("DMUP_STACK_GEMM", None)
        if errors:
            raise RuntimeError(errors)
        kernel, blas = statistics.median(times["kernel"]), statistics.median(times["blas"])
        print(f"{width:>5} {case.batch:>5} {case.depth:>5} {kernel:>10.2f} {blas:>10.2f} {blas / kernel:>11.2f}x")


if __name__ == "__main__":
    main()
