"""The launcher and flagcx-bench as a user meets them in a terminal: signals end every rank, rows are not garbled.

SIGTERM, SIGINT and SIGHUP to ``python -m flagcx.launch`` end every rank within a few
seconds, print one line and leave nothing in /dev/shm; a SIGKILLed launcher's ranks end
on their own (PR_SET_PDEATHSIG). flagcx-bench in a real pseudo-terminal (stdout and
stderr on one tty) shows no progress text in front of any row.
"""

from __future__ import annotations

import os
import pty
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _shm_entries() -> set[str]:
    return {n for n in os.listdir("/dev/shm") if n.startswith(("flagcx-", "sem.mp-"))}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def _start_ranks(tmp_path: Path, nproc: int = 2) -> tuple[subprocess.Popen, list[int]]:
    env = {**os.environ, "FLAGCX_TIMEOUT": "60"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "flagcx.launch", "--nproc", str(nproc), "tests/ranks/sleeping_rank.py", str(tmp_path)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while len(list(tmp_path.glob("rank*.pid"))) < nproc:
        assert proc.poll() is None, f"the launcher exited early: {proc.communicate()}"
        assert time.monotonic() < deadline, "the ranks did not start within 120 s"
        time.sleep(0.1)
    time.sleep(0.2)  # let the pid files be complete
    return proc, [int(p.read_text()) for p in sorted(tmp_path.glob("rank*.pid"))]


def _gone_within(pids: list[int], seconds: float) -> list[int]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.05)
    return [p for p in pids if _alive(p)]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_signal_to_launcher_ends_every_rank(sig, tmp_path):
    before = _shm_entries()
    proc, ranks = _start_ranks(tmp_path)
    start = time.monotonic()
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=30)
    assert time.monotonic() - start < 10, f"the launcher took {time.monotonic() - start:.1f} s to stop"
    assert proc.returncode == 128 + sig, (proc.returncode, err)
    assert not _gone_within(ranks, 5), f"ranks outlived the launcher: {ranks}"
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines == [f"flagcx.launch: stopped by {signal.Signals(sig).name}; ended 2 running rank(s)"], err
    assert "Traceback" not in out + err
    assert _shm_entries() <= before, f"left in /dev/shm: {sorted(_shm_entries() - before)}"


def test_ranks_end_when_the_launcher_is_killed(tmp_path):
    proc, ranks = _start_ranks(tmp_path)
    proc.kill()
    proc.communicate(timeout=30)
    assert not _gone_within(ranks, 5), "ranks outlived a SIGKILLed launcher (PR_SET_PDEATHSIG)"


def test_nproc_zero_is_a_usage_error():
    proc = subprocess.run([sys.executable, "-m", "flagcx.launch", "--nproc", "0", "x.py"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--nproc must be at least 1" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def _screen(raw: str) -> list[str]:
    """What a terminal shows: each line after carriage returns and erase-to-end-of-line (ESC [ K)."""
    shown = []
    for line in raw.replace("\r\n", "\n").split("\n"):
        cells: list[str] = []
        col = 0
        for token in re.split(r"(\r|\x1b\[K)", line):
            if token == "\r":
                col = 0
            elif token == "\x1b[K":
                del cells[col:]
            else:
                for ch in token:
                    if col < len(cells):
                        cells[col] = ch
                    else:
                        cells.append(ch)
                    col += 1
        shown.append("".join(cells))
    return shown


def test_bench_rows_are_clean_in_a_terminal():
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "flagcx.bench", "allreduce", "-b", "8", "-e", "4K", "-f", "8", "--nproc", "2"],
        cwd=ROOT,
        stdin=slave,
        stdout=slave,
        stderr=slave,
        close_fds=True,
    )
    os.close(slave)
    chunks = []
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.5)
        if ready:
            try:
                data = os.read(master, 65536)
            except OSError:  # the child side closed
                break
            if not data:
                break
            chunks.append(data)
        elif proc.poll() is not None:
            break
    proc.wait(timeout=30)
    os.close(master)
    raw = b"".join(chunks).decode(errors="replace")
    assert proc.returncode == 0, raw[-3000:]
    assert "[flagcx-bench" in raw, "no progress line was written: the test did not see a terminal"
    rows = [line for line in _screen(raw) if re.match(r"^\s+\d+\s+\d+\s+float", line)]
    assert len(rows) == 4, _screen(raw)  # 8, 64, 512, 4096 bytes
    bad = [line for line in _screen(raw) if "[flagcx-bench" in line]
    assert not bad, f"progress text left on screen: {bad}"


@pytest.mark.parametrize("launcher", ["torchrun", "flagcx.launch"])
def test_backend_flagcx_needs_no_import_under_either_launcher(launcher):
    """torch imports flagcx through its ``torch.backends`` entry point, so torchrun behaves like flagcx.launch."""
    env = {k: v for k, v in os.environ.items() if k != "TORCH_DEVICE_BACKEND_AUTOLOAD"}
    env.update(FLAGCX_TIMEOUT="60", OMP_NUM_THREADS="1")
    if launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone", "tests/ranks/no_import_job.py"]
    else:
        cmd = [sys.executable, "-m", "flagcx.launch", "--nproc", "2", "tests/ranks/no_import_job.py"]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stdout + p.stderr
    assert sorted(re.findall(r"rank \d: all_reduce ok", p.stdout)) == ["rank 0: all_reduce ok", "rank 1: all_reduce ok"]
