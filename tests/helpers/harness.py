"""Run many checks inside one set of spawned ranks (import torch costs ~3 s a process).

A *suite* is a function ``suite(rank, size) -> Iterable[(name, callable)]``; every rank
runs the same checks in the same order, each check's failure is recorded (with its
traceback) and the run goes on. The parent gets, for every check, the ranks where it
failed; ``assert_passed`` reports each check as a pytest subtest (the summary counts
checks, and a failure shows under the check's own name), then fails the test if any did.

To rerun some checks alone: ``FLAGCX_TEST_CHECKS='<glob>[,<glob>...]' pytest tests/test_x.py``
runs only the checks whose names match (every rank skips the same ones, so collectives
stay matched; a check that needs an earlier one's state must be selected with it).
"""

from __future__ import annotations

import fnmatch
import importlib
import os
import traceback
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, Optional, Union

import torch.distributed as dist

from flagcx import Communicator, config
from flagcx.launch import patched_environ, spawn

Suite = Callable[[int, int], Iterable[tuple[str, Callable[[], None]]]]

TEST_TIMEOUT = "60"
"""FLAGCX_TIMEOUT for test ranks: a hang becomes an error long before CI's limit."""


def _run_suite(rank: int, size: int, target: str) -> dict[str, Optional[str]]:
    module_name, _, func = target.partition(":")
    suite: Suite = getattr(importlib.import_module(module_name), func)
    wanted = [p for p in os.environ.get("FLAGCX_TEST_CHECKS", "").split(",") if p]
    outcome: dict[str, Optional[str]] = {}
    try:
        for name, check in suite(rank, size):
            if wanted and not any(fnmatch.fnmatchcase(name, p) for p in wanted):
                continue
            try:
                check()
                outcome[name] = None
            except Exception:
                outcome[name] = traceback.format_exc()
    except Exception:
        outcome["<suite setup>"] = traceback.format_exc()
    return outcome


def run_suite(
    target: str,
    nproc: int,
    env: Union[None, Mapping[str, str], Callable[[int], Mapping[str, str]]] = None,
    timeout: float = 600,
) -> list[dict[str, Optional[str]]]:
    """Spawn ``nproc`` ranks running suite ``module:function``; per-rank outcomes."""
    base = {"FLAGCX_TIMEOUT": os.environ.get("FLAGCX_TEST_TIMEOUT", TEST_TIMEOUT), "OMP_NUM_THREADS": "1"}
    if callable(env):
        per_rank = lambda r: {**base, **env(r)}  # noqa: E731
    else:
        per_rank = {**base, **(env or {})}
    return spawn(_run_suite, nproc, (target,), env=per_rank, timeout=timeout)


SUBTESTS: Any = None
"""The running test's pytest ``subtests`` fixture (set by tests/conftest.py), through which checks are reported."""


def assert_passed(outcomes: list[dict[str, Optional[str]]], min_checks: int = 1) -> None:
    """Report every check (a subtest each); fail with every check that failed on any rank (first traceback of each)."""
    names = list(outcomes[0])
    filtered = bool(os.environ.get("FLAGCX_TEST_CHECKS"))
    assert filtered or len(names) >= min_checks, f"suite ran only {len(names)} checks: {names}"
    failed = []
    for name in names:
        bad = [r for r, o in enumerate(outcomes) if o.get(name)]
        message = f"--- {name} failed on ranks {bad}:\n{outcomes[bad[0]][name]}" if bad else ""
        if bad:
            failed.append(message)
        if SUBTESTS is not None:
            with SUBTESTS.test(msg=name):
                assert not bad, message
    for r, o in enumerate(outcomes):
        if set(o) != set(names):
            failed.append(f"--- rank {r} ran different checks: {sorted(set(o) ^ set(names))}")
    if SUBTESTS is not None:  # the tracebacks are in the subtests' reports
        failed = [f.partition(":\n")[0] for f in failed]
    assert not failed, f"{len(failed)} of {len(names)} checks failed:\n" + "\n".join(failed)


@contextmanager
def flagcx_env(**values: str) -> Iterator[None]:
    """Set FLAGCX_* variables for the communicators created inside (config re-read), then restore them."""
    try:
        with patched_environ(values):
            config.reload()
            yield
    finally:
        config.reload()


def with_cpu_adapter(comm: Communicator, key: str, adapter: str) -> Communicator:
    """A homogeneous communicator over ``comm``'s ranks whose CPU tensors go through ``adapter`` (every rank of ``comm`` calls).

    ``torch_pg:<backend>`` is chosen with FLAGCX_VENDOR_BACKEND=cpu:<backend>, any other
    name with FLAGCX_CPU_ADAPTER; FLAGCX_CLUSTER_ID puts every rank in one cluster. All
    are set only while the communicator is created.
    """
    kind, _, backend = adapter.partition(":")
    env = {"FLAGCX_VENDOR_BACKEND": f"cpu:{backend}"} if kind == "torch_pg" else {"FLAGCX_CPU_ADAPTER": adapter}
    env["FLAGCX_CLUSTER_ID"] = key
    with flagcx_env(**env):
        return Communicator(dist.PrefixStore(f"{key}/", comm._store), comm.rank, comm.size, timeout=comm.timeout, name=f"{comm.name}.{key}")
