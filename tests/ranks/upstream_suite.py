"""Rank side of torch's own distributed test suite (``DistributedTest._DistTestBase``) on flagcx.

Upstream (``test/distributed/test_distributed_spawn.py``) spawns fresh processes for
every test; at ~3 s of ``import torch`` a process that would cost CI most of an hour.
Here one set of ranks runs every test in turn, each inside its own
``init_process_group`` / ``destroy_process_group`` on a fresh FileStore and a fresh
TEMP_DIR, exactly as upstream's ``TestDistBackend._run`` does per process.

Gates: the module is imported with ``BACKEND=gloo``, so every import-time gate
(``skip_but_pass_in_sandcastle_if(BACKEND != "gloo", ...)``, ``require_backend_is_available``
...) is gloo's. Then the module's ``BACKEND`` becomes the backend under test, as a
string that also compares equal to "gloo", so the bodies' branches
(``if BACKEND == "gloo": <build the CPU model>``) take gloo's path while
``init_process_group(backend=BACKEND)`` and ``get_backend`` see "flagcx"; flagcx is
added to every ``DistTestCases`` feature set that names gloo. The tests therefore run
on flagcx exactly where they run on gloo.
"""

from __future__ import annotations

import os
import sys
import time
import traceback
import unittest
from datetime import timedelta

Outcome = dict[str, tuple[str, str]]
"""test name -> ("passed" | "skipped" | "failed", detail)."""

SYNC_TIMEOUT = 120.0
"""Seconds a rank waits for the others at the start of a test (a test that hangs on one rank times out on its own first)."""


class _GlooGated(str):
    """A backend name that also equals "gloo" in comparisons (the bodies' gloo branches apply to it)."""

    def __eq__(self, other: object) -> bool:
        return str.__eq__(self, other) or other == "gloo"

    def __ne__(self, other: object) -> bool:
        return not self.__eq__(other)

    __hash__ = str.__hash__


def _load(backend: str):
    """Import the upstream module with gloo's gates, then point it at ``backend``."""
    os.environ["BACKEND"] = "gloo"
    from torch.testing._internal import common_distributed
    from torch.testing._internal.distributed import distributed_test as upstream

    os.environ["BACKEND"] = backend
    if backend != "gloo":
        upstream.BACKEND = _GlooGated(backend)
        import flagcx

        # torch's dist.monitored_barrier raises for every backend but gloo before it
        # reaches the group; flagcx users call flagcx.monitored_barrier instead.
        upstream.dist.monitored_barrier = flagcx.monitored_barrier

        cases = common_distributed.DistTestCases
        for table in (cases.backend_feature, cases.skip_collective):
            for members in table.values():
                if "gloo" in members:
                    members.add(backend)

    class UpstreamTest(upstream.TestDistBackend, upstream.DistributedTest._DistTestBase):
        pass

    return upstream, common_distributed, UpstreamTest


def _wait_all(store, key: str, size: int) -> None:
    """A store barrier under ``key`` (every rank adds one, then waits for the count)."""
    store.add(key, 1)
    deadline = time.monotonic() + SYNC_TIMEOUT
    while int(store.add(key, 0)) < size:
        if time.monotonic() > deadline:
            raise TimeoutError(f"ranks did not all reach {key} within {SYNC_TIMEOUT:g} s")
        time.sleep(0.005)


def _skip_code_messages(common_distributed) -> dict[int, str]:
    return {v.exit_code: v.message for v in common_distributed.TEST_SKIPS.values()}


def run_upstream(rank: int, size: int, backend: str, workdir: str, names: list[str] | None = None) -> Outcome:
    """Run the upstream tests (all of them, or ``names``) on this rank; the outcome of each."""
    import torch.distributed as dist
    from torch.testing._internal import common_utils

    upstream, common_distributed, cls = _load(backend)
    skips = _skip_code_messages(common_distributed)
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False, timeout=timedelta(seconds=SYNC_TIMEOUT))
    outcome: Outcome = {}
    for name in names or sorted(n for n in dir(cls) if n.startswith("test_")):
        method = getattr(cls, name)
        if getattr(method, "__unittest_skip__", False):
            outcome[name] = ("skipped", getattr(method, "__unittest_skip_why__", ""))
            continue
        _wait_all(store, f"start/{name}", size)
        temp = os.path.join(workdir, name)
        for sub in ("barrier", "test_dir", "init_dir"):
            os.makedirs(os.path.join(temp, sub), exist_ok=True)
        os.environ["TEMP_DIR"] = temp
        os.environ["INIT_METHOD"] = f"file://{os.path.join(temp, 'init_dir', 'shared_init_file')}"
        upstream.Barrier.barrier_id = 0
        test = cls(name)
        test.rank = rank
        test.file_name = os.path.join(temp, "init_file")
        common_utils.set_rng_seed()
        started = time.monotonic()
        try:
            seconds = upstream.CUSTOM_PG_TIMEOUT.get(name, upstream.default_pg_timeout)
            dist.init_process_group(init_method=test.init_method, backend=backend, world_size=size, rank=rank, timeout=timedelta(seconds=seconds))
            test._barrier()
            getattr(test, name)()
            test._barrier()
            outcome[name] = ("passed", f"{time.monotonic() - started:.2f} s")
        except unittest.SkipTest as exc:
            outcome[name] = ("skipped", str(exc))
        except SystemExit as exc:
            if exc.code in skips:
                outcome[name] = ("skipped", skips[exc.code])
            else:
                outcome[name] = ("failed", f"SystemExit({exc.code!r})")
        except Exception:
            outcome[name] = ("failed", traceback.format_exc())
        finally:
            if dist.is_initialized():
                try:
                    dist.destroy_process_group()
                except Exception:
                    outcome[name] = ("failed", outcome.get(name, ("", ""))[1] + "\ndestroy_process_group: " + traceback.format_exc())
            sys.stdout.flush()
    return outcome
