"""Distributed training with ResidualStack and ResidualMLPStack, 2 processes on this machine (gloo, started with
torch.multiprocessing spawn): DistributedDataParallel on half the batch each, and a 2-stage pipeline
(``ResidualStack.split`` + torch.distributed.pipelining's GPipe schedule) on the full batch in 2
micro-batches. Both must give the gradients of one process on the full batch.

The two processes are started once for the module (starting Python and torch is most of the cost);
each runs both set-ups and saves what it computed, and the tests compare."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import dmup_kernels
from dmup_kernels import ResidualMLPStack, ResidualStack

from conftest import rel_err

pytestmark = [
    pytest.mark.skipif(
        not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo"
    ),
    pytest.mark.skipif(not dmup_kernels.HAS_CPP, reason="C++ extension not built"),
]

WORLD, WIDTH, HIDDEN, DEPTH, BATCH, MICRO_BATCHES = 2, 16, 24, 7, 8, 2
KINDS = ("stack", "mlp")


def problem(
    kind: str, dtype: torch.dtype = torch.float32, backend: str = "cpp"
) -> tuple[ResidualStack | ResidualMLPStack, torch.Tensor, torch.Tensor]:
    """The same stack of ``kind`` (random biases), input and target in every process, drawn in float32."""
    generator = torch.Generator().manual_seed(1234)
    torch.manual_seed(1234)
    if kind == "stack":
        stack = ResidualStack(WIDTH, DEPTH, activation="gelu", bias=True, backend=backend)
    else:
        stack = ResidualMLPStack(WIDTH, HIDDEN, DEPTH, activation="gelu", bias=True, backend=backend)
    with torch.no_grad():
        for name, parameter in stack.named_parameters():
            if name.startswith("bias"):
                parameter.copy_(0.1 * torch.randn(parameter.shape, generator=generator))
    x = torch.randn(BATCH, WIDTH, generator=generator)
    target = torch.randn(BATCH, WIDTH, generator=generator)
    return stack.to(dtype), x.to(dtype), target.to(dtype)


def worker(rank: int, port: int, out_dir: str) -> None:
    from torch.distributed.pipelining import PipelineStage, ScheduleGPipe
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)  # two processes share the machine
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        results = {}
        for kind in KINDS:
            stack, x, target = problem(kind)
            # DDP: each rank its half of the batch; the mean loss per rank, averaged by DDP, is the full-batch mean
            ddp = DistributedDataParallel(stack)
            F.mse_loss(ddp(x.chunk(WORLD)[rank]), target.chunk(WORLD)[rank]).backward()
            result = {"ddp": {name: p.grad for name, p in stack.named_parameters()}}

            # pipeline: rank k runs stage k; GPipe averages the micro-batch losses (scale_grads)
            stage = problem(kind)[0].split(WORLD)[rank]
            schedule = ScheduleGPipe(
                PipelineStage(stage, rank, WORLD, torch.device("cpu")), MICRO_BATCHES, loss_fn=F.mse_loss
            )
            if rank == 0:
                schedule.step(x)
            else:
                losses: list[torch.Tensor] = []
                result["output"] = schedule.step(target=target, losses=losses)
                result["loss"] = torch.stack(losses).mean()
            result["stage"] = {name: p.grad for name, p in stage.named_parameters()}
            result["stage_depth"], result["stage_scale"] = stage.depth, stage.scale
            results[kind] = result
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out_dir = tmp_path_factory.mktemp("distributed")
    mp.spawn(worker, args=(free_port(), str(out_dir)), nprocs=WORLD, join=True)
    return [torch.load(out_dir / f"rank{rank}.pt") for rank in range(WORLD)]


@pytest.fixture(scope="module", params=KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module")
def single_process(kind: str) -> dict:
    """Float64 reference on the full batch: output, loss, and the parameter gradients."""
    stack, x, target = problem(kind, torch.float64, backend="reference")
    out = stack(x)
    loss = F.mse_loss(out, target)
    loss.backward()
    return {"output": out.detach(), "loss": loss.detach(), "grads": {n: p.grad for n, p in stack.named_parameters()}}


def test_ddp_gives_the_full_batch_gradients(ranks, kind, single_process):
    for name, expected in single_process["grads"].items():
        got = [rank[kind]["ddp"][name] for rank in ranks]
        assert torch.equal(got[0], got[1]), name  # all-reduced on both ranks
        assert rel_err(got[0], expected) < 1e-5, name


def test_pipeline_stages_give_the_full_batch_output_and_gradients(ranks, kind, single_process):
    stages = [rank[kind] for rank in ranks]
    assert [stage["stage_depth"] for stage in stages] == [4, 3]
    assert all(stage["stage_scale"] == pytest.approx(DEPTH**-0.5) for stage in stages)  # the whole depth's scale
    assert rel_err(stages[-1]["output"], single_process["output"]) < 1e-5
    assert rel_err(stages[-1]["loss"], single_process["loss"]) < 1e-5
    for name, expected in single_process["grads"].items():
        stacked = torch.cat([stage["stage"][name] for stage in stages])  # stage 0 holds the first layers
        assert rel_err(stacked, expected) < 1e-5, name
