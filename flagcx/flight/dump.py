"""Flight-recorder dumps in the pickle format of torch's analyzer (``torchfrtrace``, ``torch.distributed.flight_recorder``).

One file per rank holds the rings of every communicator of the process: ``version``,
``pg_config`` (group name -> name, desc, ranks as global ranks), ``pg_status`` and
``entries`` (one dict per call, oldest first, with torch's keys plus ``error`` for a call
that raised). Where files go follows torch: ``TORCH_FR_DUMP_TEMP_FILE`` is a prefix and
the global rank is appended; unset, the prefix is :data:`DEFAULT_PREFIX`. The file is
written beside its final name and renamed, so an analyzer never reads half a dump.

Two choices keep every transport readable by torch's matcher: sizes are element counts
(``[[numel]]``, the same on the fast and the ordinary path), and ``profiling_name`` is
``nccl:<op>`` for every transport (the analyzer accepts only the library prefixes it
knows; flagcx's ops have NCCL's semantics on all of them).
"""

from __future__ import annotations

import logging
import os
import pickle
import tempfile
import threading
import time
from typing import Any, Optional

from ..errors import InvalidArgument
from . import ring
from .ring import Recorder, live_recorders

log = logging.getLogger("flagcx.flight")

VERSION = "2.10"
"""The dump format version written (torch's analyzer needs major.minor; >= 2.7 reads non-p2p coalescing)."""
DEFAULT_PREFIX = os.path.join(tempfile.gettempdir(), "flagcx_trace_rank_")
"""Dump path prefix when TORCH_FR_DUMP_TEMP_FILE is unset (the global rank is appended)."""
PREFIX_ENV = "TORCH_FR_DUMP_TEMP_FILE"

_WALL_OFFSET_NS = time.time_ns() - ring.clock_ns()
_write_lock = threading.Lock()


def default_path(rank: int) -> str:
    """Where rank ``rank``'s dump goes: ``$TORCH_FR_DUMP_TEMP_FILE<rank>``, else ``DEFAULT_PREFIX<rank>``."""
    return f"{os.environ.get(PREFIX_ENV) or DEFAULT_PREFIX}{rank}"


def dump_trace(path: Optional[str] = None, reason: str = "on demand", *, level: int = logging.WARNING) -> str:
    """Write the flight recorder of every communicator of this process; returns the path written.

    ``path`` None: :func:`default_path` of this process's global rank. The path is logged
    at ``level``. Raises InvalidArgument when no communicator with a recorder exists
    (FLAGCX_TRACE_BUFFER=0, or none was created).
    """
    recorders = live_recorders()
    if not recorders:
        raise InvalidArgument(
            "no communicator of this process records calls (none exists, or FLAGCX_TRACE_BUFFER=0); create one with the recorder on first",
            op="dump_trace",
        )
    rank = _process_rank(recorders)
    target = path or default_path(rank)
    data = pickle.dumps(snapshot(recorders, reason))
    folder, name = os.path.split(os.path.abspath(target))
    with _write_lock:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, target)
        except BaseException:
            os.unlink(tmp)
            raise
    log.log(level, "flight recorder of rank %d (%s) written to %s", rank, reason, target)
    return target


def dump_on_abort(name: str) -> None:
    """Communicator ``name`` is being aborted: dump (never raises; the path is logged at INFO)."""
    try:
        dump_trace(reason=f"abort of {name}", level=logging.INFO)
    except Exception:
        log.exception("flight recorder: the dump at the abort of %s failed", name)


def snapshot(recorders: list[Recorder], reason: str) -> dict[str, Any]:
    """The dump of ``recorders`` as torch's analyzer reads it."""
    entries: list[dict[str, Any]] = []
    pg_config: dict[str, dict[str, str]] = {}
    pg_status: dict[str, dict[str, int]] = {}
    for pg_id, rec in enumerate(sorted(recorders, key=lambda r: r.name)):
        pg_config[rec.name] = {"name": rec.name, "desc": rec.desc, "ranks": str(rec.global_ranks)}
        last = {"last_enqueued_collective": -1, "last_started_collective": -1, "last_completed_collective": -1}
        for e, p2p_so_far in rec.entries():
            entry = _entry(rec, pg_id, e, p2p_so_far)
            entries.append(entry)
            if not entry["is_p2p"]:
                seq = entry["collective_seq_id"]
                last["last_enqueued_collective"] = seq
                if entry["state"] != "scheduled":
                    last["last_started_collective"] = seq
                if entry["state"] == "completed":
                    last["last_completed_collective"] = seq
        pg_status[rec.name] = last
    entries.sort(key=lambda e: e["record_id"])
    return {
        "version": VERSION,
        "comm_lib_version": "flagcx",
        "pg_config": pg_config,
        "pg_status": pg_status,
        "entries": entries,
        "reason": reason,
        "pid": os.getpid(),
    }


def _entry(rec: Recorder, pg_id: int, e: tuple, p2p_so_far: int) -> dict[str, Any]:
    i, op = e[ring.INDEX], e[ring.OP]
    is_p2p = op.startswith(ring.P2P_OPS)
    error = rec.errors.get(i)
    if error is not None:
        state = error[0]
    elif i >= rec.done:
        state = "started"
    else:
        state = "scheduled" if e[ring.ORDERED] else "completed"
    dtype = str(e[ring.DTYPE]).removeprefix("torch.") if e[ring.DTYPE] is not None else ""
    created = e[ring.T_NS] + _WALL_OFFSET_NS
    entry: dict[str, Any] = {
        "record_id": e[ring.RECORD_ID],
        "pg_id": pg_id,
        "process_group": (rec.name, rec.desc),
        "collective_seq_id": i + 1 - p2p_so_far,
        "p2p_seq_id": p2p_so_far,
        "op_id": i,
        "profiling_name": f"nccl:{op}",
        "time_created_ns": created,
        "duration_ms": None,
        "is_p2p": is_p2p,
        "input_sizes": [[e[ring.IN_NUMEL]]],
        "input_dtypes": [dtype],
        "output_sizes": [[e[ring.OUT_NUMEL]]],
        "output_dtypes": [dtype],
        "state": state,
        "time_discovered_started_ns": created if state != "scheduled" else None,
        "time_discovered_completed_ns": None,
        "retired": state == "completed",
        "timeout_ms": None,
        "frames": e[ring.FRAMES_OF] or [],
    }
    if error is not None:
        entry["error"] = error[1]
    return entry


def _process_rank(recorders: list[Recorder]) -> int:
    """This process's global rank, as its largest communicator numbers it."""
    return max(recorders, key=lambda r: len(r.global_ranks)).global_rank
