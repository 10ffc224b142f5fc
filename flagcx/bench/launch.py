"""How the ranks come to be: an existing launcher, local spawn, or a re-run under mpiexec.

* Under torchrun / ``python -m flagcx.launch`` (RANK, WORLD_SIZE) or mpiexec
  (PMI_* / OMPI_*): this process is one rank; the store comes from the environment.
* No launcher: ``--nproc N`` ranks are spawned with :func:`flagcx.launch.spawn`
  (N = 1 runs in this process); rank 0's exit code is the command's.
* The ``mpi`` backend needs every rank inside one MPI job, so when it is requested
  outside mpiexec the command re-runs itself as ``mpiexec -n N python -m flagcx.bench``
  (mpiexec beside the interpreter, e.g. the PyPI mpich wheel's, else on PATH); every
  backend of a --compare then runs in the same ranks.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from typing import Optional

import torch.distributed as dist

from ..bootstrap import LaunchEnv, detect_launch_env
from ..errors import FlagcxError
from .colls import COLLECTIVES
from .options import Options


def _fail(message: str) -> int:
    print(f"flagcx-bench: error: {message}", file=sys.stderr)
    return 2


def find_mpiexec() -> Optional[str]:
    """mpiexec next to the running interpreter (venv wheels), else the first on PATH."""
    beside = Path(sys.executable).parent / "mpiexec"
    if beside.exists():
        return str(beside)
    return shutil.which("mpiexec")


def _mpiexec_flags(exe: str) -> list[str]:
    """Open MPI refuses root and oversubscription without flags; MPICH needs none."""
    try:
        out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return []
    text = out.stdout + out.stderr
    if "Open MPI" not in text and "OpenRTE" not in text:
        return []
    flags = ["--oversubscribe"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        flags.append("--allow-run-as-root")
    return flags


def rerun_under_mpiexec(opts: Options) -> int:
    exe = find_mpiexec()
    if exe is None:
        return _fail("the mpi backend needs mpiexec: pip install mpich mpi4py (or pip install 'flagcx[mpi]'), or start the job with mpiexec")
    if importlib.util.find_spec("mpi4py") is None:
        return _fail("the mpi backend needs mpi4py: pip install mpi4py (or pip install 'flagcx[mpi]')")
    cmd = [exe, "-n", str(opts.nproc or 1), *_mpiexec_flags(exe), sys.executable, "-m", "flagcx.bench", *opts.argv]
    sys.stdout.flush()
    return subprocess.call(cmd)


def _rank(opts: Options, env: LaunchEnv, store: Optional[dist.Store] = None) -> int:
    from .runner import run_job

    try:
        return run_job(opts, env, store)
    except FlagcxError as exc:
        if env.rank == 0:
            _fail(str(exc).removeprefix("flagcx: "))
        return 2


def _spawned_rank(rank: int, size: int, opts: Options) -> int:
    env = detect_launch_env()
    assert env is not None, "flagcx.launch.spawn sets RANK / WORLD_SIZE"
    return _rank(opts, env)


def _bad_root(opts: Options, size: int) -> Optional[str]:
    if opts.root >= size and any(COLLECTIVES[c].rooted for c in opts.collectives):
        return f"-r {opts.root} is not a rank of this {size}-rank job; give -r in [0, {size}) or -1 for every root"
    return None


def _no_gpus(opts: Options, nproc: int) -> Optional[str]:
    """Before spawning: --device cuda needs a GPU per local rank (checked in this process, without a CUDA context)."""
    if opts.device != "cuda":
        return None
    import torch

    if not torch.cuda.is_available():
        build = f"torch {torch.__version__} has no CUDA" if torch.version.cuda is None else f"torch {torch.__version__} finds no GPU"
        return f"--device cuda: {build} on this machine; use --device cpu"
    count = torch.cuda.device_count()
    if nproc > count:
        return f"--device cuda: --nproc {nproc} needs a GPU per rank but {count} are visible; use --nproc {count} or less"
    return None


def launch(opts: Options) -> int:
    """Run the benchmark in whatever rank layout the environment and flags ask for."""
    env = detect_launch_env()
    problem = _bad_root(opts, env.size if env is not None else opts.nproc or 1)
    if problem:
        return _fail(problem)
    if "mpi" in opts.backends and (env is None or env.launcher != "mpiexec"):
        if env is not None:
            return _fail(f"the mpi backend needs the ranks started by mpiexec, not {env.launcher}; drop mpi or run under mpiexec")
        return rerun_under_mpiexec(opts)
    if env is not None:
        if opts.nproc is not None and opts.nproc != env.size:
            return _fail(f"--nproc {opts.nproc} but {env.launcher} started {env.size} ranks; drop --nproc under a launcher")
        return _rank(opts, env)
    nproc = opts.nproc or 1
    problem = _no_gpus(opts, nproc)
    if problem:
        return _fail(problem)
    if nproc == 1:
        store = dist.TCPStore("127.0.0.1", 0, 1, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=opts.timeout))
        return _rank(opts, LaunchEnv(0, 1, 0, 1, "local"), store)
    from ..launch import LaunchError, LaunchInterrupted, spawn

    try:
        codes = spawn(_spawned_rank, nproc, (opts,))  # spawn gives ranks OMP_NUM_THREADS=1 unless it is set
    except LaunchInterrupted as exc:
        print(f"flagcx-bench: {exc}", file=sys.stderr)
        return 128 + exc.signum
    except LaunchError as exc:
        print(f"flagcx-bench: {exc}", file=sys.stderr)
        return 1
    return codes[0]
