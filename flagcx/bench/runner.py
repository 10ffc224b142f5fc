"""The sweep on one rank: every collective x backend x dtype x op x root x size x mode.

Every rank runs the same sequence; rank 0 prints the nccl-tests report as rows
complete and writes the exports. Per (size, mode): allocate the nccl-tests buffers,
fill deterministic inputs, build the backend's call, one untimed call that also proves
the combination works (all ranks agree through the control channel, so an unsupported
combination becomes one report row on every rank, never a crash or a hang), more
warm-up, the timed loop (:mod:`flagcx.bench.timing`), then validation.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Optional, Union

import torch
import torch.distributed as dist

from ..bootstrap import LaunchEnv, store_allgather, store_from_env
from ..errors import FlagcxError, InvalidArgument
from ..topology.detect import usable_cpus
from . import bound, data, memory, report, timing
from .backends import make_backend
from .colls import COLLECTIVES, Collective, allocate
from .control import Control
from .interface import Backend
from .options import DTYPES, Options
from .results import Row, Run, Timing
from .sysinfo import describe_device, hostname, load_average, version_line, versions


class Progress:
    """A one-line progress indicator on stderr (rank 0, only when stderr is a terminal)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled and sys.stderr.isatty()
        self.total = 0
        self.done = 0

    def start(self, total: int) -> None:
        self.total, self.done = total, 0

    def step(self, what: str) -> None:
        self.done += 1
        if self.enabled:
            sys.stderr.write(f"\r\033[K[flagcx-bench {self.done}/{self.total}] {what}")
            sys.stderr.flush()

    def clear(self) -> None:
        if self.enabled:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()


def _reason(exc: BaseException) -> str:
    """One line for a 'not supported' row: flagcx errors as they read, others with their type."""
    text = " ".join(str(exc).split())
    if isinstance(exc, FlagcxError):
        text = text.removeprefix("flagcx: ")
    else:
        text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text[:300]


class Sweep:
    """Runs the rows of one backend and collective on this rank."""

    def __init__(self, opts: Options, rank: int, size: int, device: torch.device, control: Control, emit: Callable[[str], None], progress: Progress) -> None:
        self.opts = opts
        self.rank = rank
        self.size = size
        self.device = device
        self.control = control
        self.emit = emit
        self.progress = progress

    def combos(self, coll: Collective) -> list[tuple[str, str, int]]:
        ops = self.opts.ops if coll.reduces else ["none"]
        roots = (list(range(self.size)) if self.opts.root == -1 else [self.opts.root]) if coll.rooted else [-1]
        return [(d, o, r) for d in self.opts.dtypes for o in ops for r in roots]

    def run(self, backend: Backend, coll: Collective) -> Run:
        iterations = self.opts.iters * (self.opts.graph_replays or 1)
        run = Run(coll.name, coll.program, backend.name, backend.describe(), self.size, iterations)
        combos = self.combos(coll)
        self.progress.start(len(combos) * len(self.opts.sizes))
        for dtype_name, op, root in combos:
            for size in self.opts.sizes:
                self.progress.step(f"{backend.name} {coll.name} {dtype_name} {op} {size} B")
                row = self.row(backend, coll, dtype_name, op, root, size)
                run.rows.append(row)
                self.progress.clear()  # a terminal shows stderr and stdout on one line: no leftover before the row
                self.emit(report.row_line(row))
                for line in report.noise_warning(row):
                    self.emit(line)
                if row.unsupported is not None:
                    break
        self.progress.clear()
        return run

    def row(self, backend: Backend, coll: Collective, dtype_name: str, op: str, root: int, size: int) -> Row:
        dtype = DTYPES[dtype_name]
        block, elems = coll.counts(size, dtype.itemsize, self.size)
        row = Row(elems * dtype.itemsize, block, dtype_name, op, root)
        pattern = data.Pattern(dtype, op if coll.reduces else "none", self.size)
        for inplace in (False, True):
            outcome = self.mode(backend, coll, pattern, op, max(root, 0), block, row.size, inplace)
            if isinstance(outcome, str):
                row.unsupported = outcome
                row.out_of_place = row.in_place = None
                return row
            if inplace:
                row.in_place = outcome
            else:
                row.out_of_place = outcome
        return row

    def mode(
        self, backend: Backend, coll: Collective, pattern: data.Pattern, op: str, root: int, block: int, nbytes: int, inplace: bool
    ) -> Union[Timing, None, str]:
        """A Timing, None (mode not available: N/A), or the reason the combination cannot run."""
        opts, device, ctl = self.opts, self.device, self.control
        bufs = allocate(coll, block, self.rank, self.size, pattern.dtype, device, inplace)
        data.fill(bufs, pattern, self.rank, rep=0)
        reason: Optional[str] = None
        prep = None
        try:
            prep = backend.prepare(coll, bufs, op, root)
            if prep is not None:
                timing.warm_up(prep.fn, 1, device)
        except Exception as exc:  # reported as a row; the ranks agree below
            reason = _reason(exc)
        if ctl.any(reason is not None):
            return reason or "failed on another rank"
        if prep is None:
            return None
        timing.warm_up(prep.fn, max(opts.warmup, 1) - 1, device)
        if opts.graph_replays:
            graph = None
            try:
                graph = timing.capture(prep.fn, opts.iters, device)
            except Exception as exc:
                reason = "CUDA graph capture failed: " + _reason(exc)
            if ctl.any(reason is not None):
                return reason or "CUDA graph capture failed on another rank"
            ctl.barrier()
            assert graph is not None
            mine = timing.time_replays(graph, opts.graph_replays, opts.iters, device)
        else:
            ctl.barrier()
            mine = timing.time_calls(prep.fn, opts.iters, device)
        slowest = ctl.max_each(mine)
        seconds = timing.summarize(slowest)
        algbw = nbytes / 1e9 / seconds if seconds > 0 else 0.0
        wrong: Optional[int] = None
        if opts.check:
            wrong = 0
            for rep in range(1, opts.check + 1):
                data.fill(bufs, pattern, self.rank, rep)
                prep.fn()
                timing.synchronize(device)
                want = data.expected(coll, pattern, self.rank, root, block, rep, device)
                wrong = ctl.total(data.count_wrong(prep.result, want))
                if wrong:
                    break
        return Timing(seconds * 1e6, algbw, coll.busbw(algbw, self.size), wrong, [s * 1e6 for s in slowest])


def _device(opts: Options, env: LaunchEnv) -> torch.device:
    if opts.device == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise InvalidArgument(f"--device cuda: rank {env.rank} sees no GPU; use --device cpu")
    count = torch.cuda.device_count()
    if env.local_rank >= count:
        raise InvalidArgument(f"--device cuda: local rank {env.local_rank} has no GPU of its own ({count} visible); start at most {count} ranks per host")
    torch.cuda.set_device(env.local_rank)
    return torch.device("cuda", env.local_rank)


def _config(opts: Options, size: int) -> dict:
    cfg = {
        "nthreads": 1,
        "ngpus": 1,
        "minimum_bytes": opts.min_bytes,
        "maximum_bytes": opts.max_bytes,
        "warmup_iters": opts.warmup,
        "iterations": opts.iters,
        "aggregated_iterations": 1,
        "validation": opts.check,
        "graph": opts.graph_replays,
        "nranks": size,
        "device": opts.device,
        "backends": opts.backends,
        "collectives": opts.collectives,
        "datatypes": opts.dtypes,
        "ops": opts.ops,
        "root": opts.root,
    }
    if opts.step_factor > 1:
        cfg["step_factor"] = opts.step_factor
    else:
        cfg["step_bytes"] = opts.step_bytes
    return cfg


def run_job(opts: Options, env: LaunchEnv, store: Optional[dist.Store] = None) -> int:
    """Run the whole benchmark on this rank; returns the exit code (1 when any result was wrong)."""
    rank, size = env.rank, env.size
    device = _device(opts, env)
    base = store if store is not None else store_from_env(opts.timeout)
    store = dist.PrefixStore("flagcx-bench/", base)
    lead = rank == 0

    def emit(line: str) -> None:
        if lead:
            print(line, flush=True)

    def emit_all(lines: list[str]) -> None:
        for line in lines:
            emit(line)

    start = time.strftime("%Y-%m-%d %H:%M:%S")
    load = load_average()
    raw = store_allgather(store, "devices", rank, size, describe_device(rank, device).encode(), opts.timeout, "flagcx-bench device report")
    device_lines = [r.decode() for r in raw]
    control = Control(store, rank, size, opts.timeout)
    backends: list[Backend] = []
    try:
        too_big = memory.problem(opts.max_bytes, env.local_size, device)
        if control.any(too_big is not None):  # every rank refuses, before any backend starts
            raise InvalidArgument(too_big or "the sweep does not fit the memory of another rank's host or GPU")
        for name in opts.backends:
            backends.append(make_backend(name, store, rank, size, device, opts.timeout))
        info = versions(opts.backends, opts.device)
        membw = None
        if opts.device == "cpu" and "allreduce" in opts.collectives and opts.max_bytes >= bound.MIN_BYTES:
            membw = bound.measure(control, opts.max_bytes, usable_cpus(), env.local_size)
        sweep = Sweep(opts, rank, size, device, control, emit, Progress(lead))
        runs: list[Run] = []
        for coll_name in opts.collectives:
            coll = COLLECTIVES[coll_name]
            emit_all(
                report.preamble(
                    coll.program,
                    version_line(info),
                    opts.min_bytes,
                    opts.max_bytes,
                    opts.step_factor,
                    opts.step_bytes,
                    opts.warmup,
                    opts.iters,
                    opts.check,
                    opts.graph_replays,
                    device_lines,
                    load,
                    usable_cpus(),
                    env.local_size,
                )
            )
            emit_all([f"# note: {note}" for note in opts.notes])
            if membw is not None and coll.name == "allreduce":
                emit(report.membw_line(membw))
            coll_runs = []
            for backend in backends:
                emit_all(report.backend_title(f"{backend.describe()}, {size} rank(s) on {opts.device}"))
                emit_all(report.header())
                run = sweep.run(backend, coll)
                emit_all(report.footer(run))
                coll_runs.append(run)
            if len(coll_runs) > 1:
                emit_all(report.ratio_table(coll_runs))
            if membw is not None and coll.name == "allreduce":
                emit_all(report.bound_table(coll_runs, membw, bound.MIN_BYTES))
            emit_all(report.conclusion(coll.program))
            runs.extend(coll_runs)
        if lead:
            _write_outputs(opts, runs, device_lines, info, start, size, load, membw)
        return 1 if any(r.out_of_bounds() for r in runs) else 0
    finally:
        for backend in backends:
            backend.close()
        control.close()


def _write_outputs(
    opts: Options,
    runs: list[Run],
    device_lines: list[str],
    info: dict,
    start: str,
    size: int,
    load: Optional[tuple[float, float, float]],
    membw: Optional[bound.MemoryBandwidth],
) -> None:
    from . import export

    end = time.strftime("%Y-%m-%d %H:%M:%S")
    if opts.json_path:
        import json

        doc = export.json_document(runs, _config(opts, size), device_lines, info, hostname(), opts.argv, start, end, load)
        if membw is not None:
            doc["memory_bandwidth"] = membw.as_dict()
            for result in doc["results"]:
                if result["collective"] == "allreduce" and result["size"] >= bound.MIN_BYTES:
                    result["bound_us"] = membw.allreduce_bound_us(result["size"])
                    result["all_core_bound_us"] = membw.all_core_bound_us(result["size"])
        with open(opts.json_path, "w") as f:
            json.dump(doc, f, indent=1)
    if opts.csv_path:
        export.write_csv(opts.csv_path, runs)
    if opts.plot_path:
        names = sorted({export.device_dict(line).get("device_info", "?") for line in device_lines})
        title = f"flagcx-bench {', '.join(opts.collectives)}: {size} rank(s) on {opts.device} ({'; '.join(names)})"
        commit = f", commit {info['flagcx_commit']}" if info.get("flagcx_commit") else ""
        caption = f"{start} on {hostname()}{commit}; backends: {', '.join(opts.backends)}; median of {opts.iters} calls per point"
        export.write_plot(opts.plot_path, runs, title, caption)
