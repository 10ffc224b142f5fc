"""Heterogeneous communicators on CPU, real processes: clusters labelled with FLAGCX_CLUSTER_ID on different CPU adapters.

6 ranks in 3 clusters of sizes 1, 2, 3 that interleave in rank order (A,B,C,B,C,C),
the cluster of 2 on Gloo and the cluster of 3 on shm (Gloo when shm is not built),
with small staging chunks moved on 3 parallel lanes; 4 ranks in 2 contiguous clusters of 2 (A,A,B,B); the
torch.distributed frontend on a 2-label job; and init-time configuration errors.
"""

from .helpers.harness import assert_passed, run_suite
from .ranks.hetero_suite import cluster_env, shm_usable

SHM = "shm" if shm_usable() else "gloo"


def _env(labels: str, adapters: dict, chunk=None, lanes=0):
    base = cluster_env(labels, adapters, chunk, lanes)
    return lambda r: {**base(r), "HETERO_LABELS": labels}


def test_hetero_three_clusters_interleaved():
    labels = "ABCBCC"
    outcome = run_suite("tests.ranks.hetero_suite:hetero_matrix", 6, env=_env(labels, {"A": SHM, "B": "gloo", "C": SHM}, chunk="64K", lanes=3))
    assert_passed(outcome, min_checks=300)


def test_hetero_two_clusters_of_two():
    labels = "AABB"
    outcome = run_suite("tests.ranks.hetero_suite:hetero_matrix", 4, env=_env(labels, {"A": SHM, "B": "gloo"}))
    assert_passed(outcome, min_checks=300)


def test_hetero_torch_distributed():
    labels = "ABBA"
    assert_passed(run_suite("tests.ranks.hetero_suite:torch_hetero", 4, env=_env(labels, {"A": "gloo", "B": SHM})), min_checks=8)


def test_hetero_init_errors():
    assert_passed(run_suite("tests.ranks.hetero_suite:init_errors", 4), min_checks=4)


def test_plan_chooser_times_both_plans_then_keeps_the_faster():
    from flagcx.hetero import PlanChooser

    agreed = []

    def agree(seconds):
        agreed.append(list(seconds))
        return [s * 2 for s in seconds]  # the slowest rank's times: both doubled, order kept

    def feed(chooser, nbytes, times):
        plans = []
        for t in times:
            plan, timed = chooser.plan(nbytes)
            plans.append((plan, timed))
            chooser.record(nbytes, t if timed else None, agree)
        return plans

    chooser = PlanChooser(None)
    small, large = 1000, 1 << 24
    plans = feed(chooser, small, [9, 9, 0.003, 0.002, 0.004, 0.001])
    assert plans == [("hierarchical", False), ("flat", False)] + [("hierarchical", True), ("flat", True)] * 2
    assert agreed == [[0.003, 0.001]] and chooser.timings[small.bit_length()] == (0.006, 0.002)
    assert chooser.plan(small) == ("flat", False) and chooser.plan(1023) == ("flat", False)  # the same size class
    feed(chooser, large, [9, 9, 0.01, 0.02, 0.011, 0.03])
    assert chooser.chosen == {small.bit_length(): "flat", large.bit_length(): "hierarchical"}
    assert PlanChooser("flat").plan(large) == ("flat", False)
