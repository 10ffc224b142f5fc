"""Command-line flags (nccl-tests names and meanings), size sweeps, dtype and reduce-op tables."""

from __future__ import annotations

import argparse
import importlib.util
import re
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

import torch

from .colls import COLLECTIVES

DTYPES: dict[str, torch.dtype] = {
    "int8": torch.int8,
    "uint8": torch.uint8,
    "int32": torch.int32,
    "uint32": torch.uint32,
    "int64": torch.int64,
    "uint64": torch.uint64,
    "half": torch.float16,
    "float": torch.float32,
    "double": torch.float64,
    "bfloat16": torch.bfloat16,
}
"""nccl-tests type names (``-d``), in nccl-tests' ``-d all`` order."""

OPS = ("sum", "prod", "max", "min", "avg")
"""nccl-tests reduce-op names (``-o``), in nccl-tests' ``-o all`` order."""

BACKENDS = ("flagcx", "gloo", "nccl", "mpi", "vllm")

_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmg]?)\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}

TIMING_METHOD = """\
timing method:
  For every size and mode (out-of-place, in-place) each rank runs max(-w, 1) untimed
  warm-up calls (the first also checks that the backend supports the dtype/op), then a
  barrier, then -n calls timed one by one: time.perf_counter_ns() around each call on
  CPU (host backends complete the op before returning), CUDA events on the current
  stream on GPU. The per-call times are gathered after the loop over a separate Gloo
  channel (outside the timed region); the time of call i is the maximum over ranks, and
  the reported time is the median over calls. With -G N the -n calls are captured once
  into a CUDA graph after warm-up and each of the N replays is timed (time per op =
  replay time / n). algbw = size / time (decimal GB/s); busbw = algbw * factor with the
  nccl-tests factors (allreduce 2(n-1)/n; allgather, reducescatter, alltoall, gather,
  scatter (n-1)/n with size = the whole array; broadcast, reduce, sendrecv 1).

validation (-c K):
  after timing, K more calls run on fresh deterministic inputs (small integers chosen
  per dtype, op and rank count so that every result is exactly representable) and each
  result is compared with a reference computed locally; #wrong is the number of wrong
  elements summed over ranks, N/A with -c 0. The exit code is 1 when any #wrong > 0.

modes:
  in-place uses NCCL's layouts; a backend whose API has no in-place form prints N/A in
  those columns. Out-of-place on an API that is in-place only (gloo / nccl allreduce,
  reduce, broadcast; flagcx and mpi broadcast) is timed as copy-to-output + the
  in-place call. A dtype/op a backend cannot do is reported as one 'not supported' row.

examples:
  flagcx-bench allreduce -b 8 -e 128M -f 2 --nproc 4
  flagcx-bench all -b 1K -e 1M -f 4 --nproc 2 --compare flagcx,gloo,mpi --plot bw.png
  torchrun --nproc-per-node 8 -m flagcx.bench allgather -b 1M -e 1G -f 2 --device cuda --compare nccl,flagcx
"""


def parse_size(text: str) -> int:
    """Bytes from '8', '64K', '1.5M', '2G' (binary units, like nccl-tests)."""
    m = _SIZE.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"invalid size {text!r}: use a byte count with an optional K, M or G suffix (e.g. 64K)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def size_list(min_bytes: int, max_bytes: int, factor: int, step: int) -> list[int]:
    """The swept sizes: min, then times ``factor`` (when > 1) or plus ``step``, while <= max."""
    if min_bytes > max_bytes:
        raise ValueError(f"-b ({min_bytes}) is larger than -e ({max_bytes}); give -b <= -e")
    if factor > 1:
        if min_bytes == 0 and max_bytes > 0:
            raise ValueError("-b 0 cannot grow by a factor (-f); start at -b 1 or more")
    elif step <= 0 and max_bytes > min_bytes:
        raise ValueError(f"-i must be positive to go from {min_bytes} to {max_bytes} bytes")
    sizes = []
    size = min_bytes
    while size <= max_bytes:
        sizes.append(size)
        if size == max_bytes:
            break
        size = size * factor if factor > 1 else size + step
    return sizes


def _positive(text: str) -> int:
    value = int(text, 0)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _non_negative(text: str) -> int:
    value = int(text, 0)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _names(text: str, known: Sequence[str], what: str) -> list[str]:
    if text == "all":
        return list(known)
    names = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in names if t not in known]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown {what} {', '.join(bad) or repr(text)}; choose from {', '.join(known)} or all")
    return names


@dataclass
class Options:
    """Everything a rank needs to run the sweep (picklable: it travels to spawned ranks)."""

    collectives: list[str]
    sizes: list[int]
    min_bytes: int
    max_bytes: int
    step_factor: int
    step_bytes: int
    iters: int
    warmup: int
    check: int
    dtypes: list[str]
    ops: list[str]
    root: int
    graph_replays: int
    nproc: Optional[int]
    device: str
    backends: list[str]
    timeout: float
    json_path: Optional[str]
    csv_path: Optional[str]
    plot_path: Optional[str]
    argv: list[str]
    notes: list[str]
    """What the sweep took in place of the user's flags (printed as '# note:' lines in the report)."""


DEFAULT_BYTES = 32 << 20
"""nccl-tests' default -b and -e."""


def _size_range(min_bytes: Optional[int], max_bytes: Optional[int]) -> tuple[int, int, list[str]]:
    """(-b, -e) with nccl-tests' 32M defaults; a default that would cross the one the user gave follows it."""
    if min_bytes is None and max_bytes is not None and max_bytes < DEFAULT_BYTES:
        return max_bytes, max_bytes, [f"-b defaults to 32M, above -e {max_bytes}: sweeping -b {max_bytes} (give -b for a range)"]
    if max_bytes is None and min_bytes is not None and min_bytes > DEFAULT_BYTES:
        return min_bytes, min_bytes, [f"-e defaults to 32M, below -b {min_bytes}: sweeping -e {min_bytes} (give -e for a range)"]
    return DEFAULT_BYTES if min_bytes is None else min_bytes, DEFAULT_BYTES if max_bytes is None else max_bytes, []


def build_parser() -> argparse.ArgumentParser:
    names = ", ".join(COLLECTIVES)
    p = argparse.ArgumentParser(
        prog="flagcx-bench",
        description=textwrap.fill(
            f"nccl-tests compatible bandwidth benchmark for flagcx, Gloo, NCCL, MPI and vLLM's CPU communicator. COLLECTIVE is one of {names}, a comma list of them, or all.",
            width=88,
        ),
        epilog=TIMING_METHOD,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("collective", metavar="COLLECTIVE", help="what to benchmark (" + names + ", or all)")
    p.add_argument(
        "-b", "--minbytes", type=parse_size, default=None, help="smallest size (K/M/G suffixes; default 32M, or -e when only -e is given and smaller)"
    )
    p.add_argument("-e", "--maxbytes", type=parse_size, default=None, help="largest size (default 32M, or -b when only -b is given and larger)")
    p.add_argument("-i", "--stepbytes", type=parse_size, default=parse_size("1M"), help="size increment when -f is not given (default 1M)")
    p.add_argument("-f", "--stepfactor", type=_positive, default=1, help="multiply the size by this factor (e.g. 2); overrides -i")
    p.add_argument("-n", "--iters", type=_positive, default=20, help="timed iterations per size (default 20)")
    p.add_argument("-w", "--warmup_iters", type=_non_negative, default=1, help="untimed warm-up iterations per size (default 1)")
    p.add_argument("-c", "--check", type=_non_negative, default=1, help="validation iterations after timing; 0 disables (default 1)")
    p.add_argument("-d", "--datatype", default="float", help="int8 uint8 int32 uint32 int64 uint64 half float double bfloat16, or all (default float)")
    p.add_argument("-o", "--op", default="sum", help="sum prod min max avg, or all (default sum); reductions only")
    p.add_argument("-r", "--root", type=int, default=0, help="root of rooted collectives; -1 runs every root (default 0)")
    p.add_argument("-G", "--cudagraph", type=_non_negative, default=0, help="capture the iterations in a CUDA graph and time N replays (GPU only)")
    p.add_argument("-T", "--timeout", type=float, default=None, help="seconds before a stuck collective fails (default FLAGCX_TIMEOUT or 300)")
    p.add_argument(
        "--nproc", type=_positive, default=None, help="spawn N local ranks (no launcher needed; default 1); under torchrun/mpiexec the launcher decides"
    )
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="tensor device; cuda: rank uses GPU local_rank (default cpu)")
    p.add_argument("--backend", choices=BACKENDS, default="flagcx", help="library to benchmark (default flagcx)")
    p.add_argument("--compare", default=None, help="comma list of backends, each timed in the same ranks; ratios vs the first")
    p.add_argument("--json", dest="json_path", default=None, metavar="PATH", help="write results as JSON (nccl-tests -J like)")
    p.add_argument("--csv", dest="csv_path", default=None, metavar="PATH", help="write one CSV row per backend, size and mode")
    p.add_argument(
        "--plot",
        dest="plot_path",
        default=None,
        metavar="PATH.png",
        help="plot, per collective, a latency panel and a bus-bandwidth panel against size, a line per backend and mode (needs matplotlib)",
    )
    return p


def parse(argv: Sequence[str]) -> Options:
    """Parse and validate flags; user errors exit through argparse with status 2."""
    parser = build_parser()
    ns = parser.parse_args(list(argv))
    try:
        collectives = _names(ns.collective, list(COLLECTIVES), "collective")
        dtypes = _names(ns.datatype, list(DTYPES), "datatype (-d)")
        ops = _names(ns.op, list(OPS), "reduce op (-o)")
        backends = _names(ns.compare, BACKENDS, "backend (--compare)") if ns.compare else [ns.backend]
    except argparse.ArgumentTypeError as exc:
        parser.error(str(exc))
    if len(set(backends)) != len(backends):
        parser.error(f"--compare lists a backend twice: {ns.compare}")
    min_bytes, max_bytes, notes = _size_range(ns.minbytes, ns.maxbytes)
    try:
        sizes = size_list(min_bytes, max_bytes, ns.stepfactor, ns.stepbytes)
    except ValueError as exc:
        parser.error(str(exc))
    if ns.root < -1:
        parser.error(f"-r {ns.root}: give a rank, or -1 for every root")
    if ns.cudagraph and ns.device != "cuda":
        parser.error("-G (CUDA graph replays) needs GPU tensors: add --device cuda, or drop -G on CPU")
    host_only = [b for b in backends if b in ("gloo", "mpi")]
    if ns.device == "cuda" and host_only:
        parser.error(f"backend(s) {', '.join(host_only)} benchmark CPU tensors here; use --device cpu")
    if ns.device == "cpu" and "nccl" in backends:
        parser.error("the nccl backend needs GPU tensors: add --device cuda")
    if ns.plot_path and importlib.util.find_spec("matplotlib") is None:
        parser.error("--plot needs matplotlib: pip install matplotlib (or pip install 'flagcx[plot]')")
    if ns.timeout is not None and ns.timeout <= 0:
        parser.error(f"-T must be positive seconds, got {ns.timeout}")
    from .. import config

    timeout = ns.timeout or config.get().timeout or 300.0
    return Options(
        collectives=collectives,
        sizes=sizes,
        min_bytes=min_bytes,
        max_bytes=max_bytes,
        step_factor=ns.stepfactor,
        step_bytes=ns.stepbytes,
        iters=ns.iters,
        warmup=ns.warmup_iters,
        check=ns.check,
        dtypes=dtypes,
        ops=ops,
        root=ns.root,
        graph_replays=ns.cudagraph,
        nproc=ns.nproc,
        device=ns.device,
        backends=backends,
        timeout=timeout,
        json_path=ns.json_path,
        csv_path=ns.csv_path,
        plot_path=ns.plot_path,
        argv=list(argv),
        notes=notes,
    )
