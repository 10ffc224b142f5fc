"""Run many checks inside one set of spawned ranks (import torch costs ~3 s a process).

A *suite* is a function ``suite(rank, size) -> Iterable[(name, callable)]``; every rank
runs the same checks in the same order, each check's failure is recorded (with its
traceback) and the run goes on. The parent gets, for every check, the ranks where it
failed, and ``assert_passed`` reports them all at once.
"""

from __future__ import annotations

import importlib
import os
import traceback
from contextlib import contextmanager
from typing import Callable, Iterable, Iterator, Mapping, Optional, Union

from flagcx import config
from flagcx.launch import patched_environ, spawn

Suite = Callable[[int, int], Iterable[tuple[str, Callable[[], None]]]]

TEST_TIMEOUT = "60"
"""FLAGCX_TIMEOUT for test ranks: a hang becomes an error long before CI's limit."""


def _run_suite(rank: int, size: int, target: str) -> dict[str, Optional[str]]:
    module_name, _, func = target.partition(":")
    suite: Suite = getattr(importlib.import_module(module_name), func)
    outcome: dict[str, Optional[str]] = {}
    try:
        for name, check in suite(rank, size):
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


def assert_passed(outcomes: list[dict[str, Optional[str]]], min_checks: int = 1) -> None:
    """Fail with every check that failed on any rank (first traceback of each)."""
    names = list(outcomes[0])
    assert len(names) >= min_checks, f"suite ran only {len(names)} checks: {names}"
    failed = []
    for name in names:
        bad = [r for r, o in enumerate(outcomes) if o.get(name)]
        if bad:
            failed.append(f"--- {name} failed on ranks {bad}:\n{outcomes[bad[0]][name]}")
    for r, o in enumerate(outcomes):
        if set(o) != set(names):
            failed.append(f"--- rank {r} ran different checks: {sorted(set(o) ^ set(names))}")
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
