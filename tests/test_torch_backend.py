"""Every torch.distributed op through backend "flagcx" (and "cpu:gloo,cuda:flagcx"), 2 and 4 ranks."""

import pytest

from .helpers.harness import assert_passed, run_suite


@pytest.mark.parametrize("nproc", [2, 4])
def test_torch_ops(nproc):
    assert_passed(run_suite("tests.ranks.torch_suite:torch_ops", nproc), min_checks=100)


def test_mixed_backend_string():
    outcome = run_suite("tests.ranks.torch_suite:torch_ops", 2, env={"FLAGCX_TEST_BACKEND": "cpu:gloo,cuda:flagcx"})
    assert_passed(outcome, min_checks=100)


def test_dist_reduce_ops_reach_the_communicator_fast_path(tmp_path):
    """torch hands a new ReduceOp object per call; the backend passes the flagcx member it maps to, which the fast path caches on."""
    import torch
    import torch._C._distributed_c10d as c10d
    import torch.distributed as dist

    from flagcx import Communicator, ReduceOp
    from flagcx.frontends.process_group import _op_of

    def opts(op):
        o = c10d.AllreduceOptions()
        o.reduceOp = op
        return o

    torch_ops = [dist.ReduceOp.SUM, dist.ReduceOp.PRODUCT, dist.ReduceOp.MIN, dist.ReduceOp.MAX, dist.ReduceOp.AVG]
    ours = [ReduceOp.SUM, ReduceOp.PROD, ReduceOp.MIN, ReduceOp.MAX, ReduceOp.AVG]
    assert [_op_of(opts(op)) for op in torch_ops] == ours
    assert [_op_of(dist.ReduceOp(op)) for op in torch_ops] == ours  # a bare ReduceOp is read too
    assert _op_of(None) is ReduceOp.SUM
    assert _op_of(opts(dist.ReduceOp.BAND)) == dist.ReduceOp.BAND  # torch's own: the Communicator refuses it by name
    premul = dist._make_nccl_premul_sum(2.0)
    assert _op_of(opts(premul)) is not None and not isinstance(_op_of(opts(premul)), dist.ReduceOp.RedOpType)
    comm = Communicator(dist.FileStore(str(tmp_path / "store"), 1), 0, 1, name="fast")
    try:
        t = torch.ones(5)
        comm.all_reduce(t, _op_of(opts(dist.ReduceOp.SUM)))  # the first call takes the checked path and remembers
        assert ("all_reduce", t.device, t.dtype, _op_of(opts(dist.ReduceOp.SUM))) in comm._fast._reduce
        assert torch.equal(t, torch.ones(5))
    finally:
        comm.destroy()
