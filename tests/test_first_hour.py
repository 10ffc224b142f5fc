"""What a newcomer meets first: a launcher and configuration that answer mistakes in one line, a clean package.

The launcher: a missing script or module is refused before any rank starts; a bad FLAGCX_*
value is one ``flagcx.launch: ...`` line and exit 2; a rank's failure shows the user's
frames without the launcher's and runpy's; a rank killed by a signal is named by the signal;
Ctrl-C while ranks are still starting, or while the launcher itself imports torch, prints one line;
a flagcx world the user did not destroy is drained at exit. Configuration:
FLAGCX_CPU_ADAPTER=shmm is a ConfigError that suggests shm; a misspelled FLAGCX_* name is
logged once with the closest known one. Package: LICENSE, SPDX license, numpy only in
the mpi extra.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

from flagcx import ConfigError, config

ROOT = Path(__file__).resolve().parent.parent


def _launch(tmp_path: Path, *args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "flagcx.launch", *args], cwd=tmp_path, env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=timeout
    )


def test_a_missing_script_or_module_is_refused_before_any_rank_starts(tmp_path):
    start = time.monotonic()
    out = _launch(tmp_path, "--nproc", "2", "no_such_script.py")
    assert out.returncode == 2 and out.stderr.strip() == "flagcx.launch: no such script: 'no_such_script.py'", out.stderr
    out = _launch(tmp_path, "--nproc", "2", "-m", "no_such_module_xyz")
    assert out.returncode == 2 and "no module named 'no_such_module_xyz'" in out.stderr, out.stderr
    assert time.monotonic() - start < 30  # no rank imported torch


def test_a_bad_variable_is_one_line(tmp_path):
    (tmp_path / "ok.py").write_text("print('ran')\n")
    out = _launch(tmp_path, "--nproc", "2", "ok.py", env={"FLAGCX_TIMEOUT": "ten"})
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().splitlines() == ["flagcx.launch: FLAGCX_TIMEOUT='ten' is not a number of seconds; set e.g. FLAGCX_TIMEOUT=300"], out.stderr


def test_a_failing_rank_shows_the_users_frames_only(tmp_path):
    (tmp_path / "boom.py").write_text("def inner():\n    raise ValueError('bad value in rank code')\n\ninner()\n")
    out = _launch(tmp_path, "--nproc", "2", "boom.py")
    assert out.returncode == 1
    assert "boom.py" in out.stderr and "ValueError: bad value in rank code" in out.stderr, out.stderr
    assert "launch.py" not in out.stderr and "runpy" not in out.stderr, out.stderr


def test_a_rank_killed_by_a_signal_is_named(tmp_path):
    (tmp_path / "abort.py").write_text("import os, signal, time\nif os.environ['RANK'] == '1':\n    os.kill(os.getpid(), signal.SIGABRT)\ntime.sleep(30)\n")
    out = _launch(tmp_path, "--nproc", "2", "abort.py")
    assert out.returncode == 1 and "was killed by SIGABRT" in out.stderr, out.stderr


def _launcher(tmp_path: Path, script: str) -> subprocess.Popen:
    """``python -m flagcx.launch --nproc 2 script`` in its own session, SIGINT at its default (a background job inherits it ignored)."""
    return subprocess.Popen(
        [sys.executable, "-m", "flagcx.launch", "--nproc", "2", script],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def test_ctrl_c_while_ranks_start_prints_one_line(tmp_path):
    (tmp_path / "slow.py").write_text("import time\ntime.sleep(60)\n")
    proc = _launcher(tmp_path, "slow.py")
    deadline = time.monotonic() + 60
    while len(_children(proc.pid)) < 2 and time.monotonic() < deadline:  # the launcher has started its ranks...
        time.sleep(0.01)
    time.sleep(1.0)  # ...which are still starting: importing torch in spawn_main takes seconds
    os.killpg(proc.pid, signal.SIGINT)  # as a terminal's Ctrl-C: the whole process group
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGINT, err
    assert "Traceback" not in err and "Fatal Python error" not in err, err
    assert err.strip().startswith("flagcx.launch: stopped by SIGINT"), err


def test_ctrl_c_while_the_launcher_imports_torch_prints_one_line(tmp_path):
    """Before any rank: ``python -m flagcx.launch`` spends seconds importing torch (its package's first import)."""
    (tmp_path / "ok.py").write_text("print('ran')\n")
    proc = _launcher(tmp_path, "ok.py")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # torch's import has begun once its library is mapped
        try:
            if "libtorch_cpu" in open(f"/proc/{proc.pid}/maps").read():
                break
        except OSError:
            pass
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGINT, err
    assert err.splitlines() == ["flagcx.launch: stopped by SIGINT before any rank started"], err


def test_ranks_start_with_sigint_blocked_and_user_code_gets_it(tmp_path):
    """The mechanism behind a quiet Ctrl-C: a rank's Python starts with SIGINT blocked; the rank's code has it again."""
    (tmp_path / "mask.py").write_text("import signal, time\nassert signal.SIGINT not in signal.pthread_sigmask(signal.SIG_BLOCK, [])\ntime.sleep(3)\n")
    proc = subprocess.Popen([sys.executable, "-m", "flagcx.launch", "--nproc", "2", "mask.py"], cwd=tmp_path, stderr=subprocess.PIPE, text=True)
    seen = {}
    deadline = time.monotonic() + 60
    while len(seen) < 2 and time.monotonic() < deadline:
        for pid in _children(proc.pid):
            try:
                cmdline = open(f"/proc/{pid}/cmdline").read()
                status = open(f"/proc/{pid}/status").read()
            except OSError:
                continue
            if "spawn_main" in cmdline and pid not in seen:
                seen[pid] = int(next(line.split()[1] for line in status.splitlines() if line.startswith("SigBlk:")), 16)
        time.sleep(0.005)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert len(seen) == 2 and all(mask & (1 << (signal.SIGINT - 1)) for mask in seen.values()), seen


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        found.append(int(entry))
            except (OSError, ValueError, IndexError):
                pass
    return found


def test_a_misspelled_cpu_adapter_suggests_the_right_one(monkeypatch):
    monkeypatch.setenv("FLAGCX_CPU_ADAPTER", "shmm")
    monkeypatch.delenv("FLAGCX_ADAPTER_PLUGIN", raising=False)
    with pytest.raises(ConfigError, match=r"FLAGCX_CPU_ADAPTER='shmm' is no adapter; did you mean shm\?"):
        config.reload()
    monkeypatch.undo()
    config.reload()


def test_a_misspelled_variable_is_named_once(monkeypatch, caplog):
    monkeypatch.setenv("FLAGCX_TIMEOUTT", "5")
    config._warned.discard("FLAGCX_TIMEOUTT")
    with caplog.at_level(logging.WARNING, logger="flagcx.config"):
        config.reload()
        config.reload()
    hits = [r.getMessage() for r in caplog.records if "FLAGCX_TIMEOUTT" in r.getMessage()]
    assert hits == ["FLAGCX_TIMEOUTT is not a flagcx variable and is ignored; did you mean FLAGCX_TIMEOUT?"], hits
    monkeypatch.undo()
    config.reload()


def test_the_package_metadata():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert (ROOT / "LICENSE").read_text().lstrip().startswith("Apache License")
    assert meta["license"] == "Apache-2.0" and meta["license-files"] == ["LICENSE"]
    assert not any(d.startswith("numpy") for d in meta["dependencies"])
    assert any(d.startswith("numpy") for d in meta["optional-dependencies"]["mpi"])


@pytest.mark.parametrize("launcher", ["flagcx.launch", "torchrun"])
def test_the_readme_hello_world_runs(tmp_path, launcher):
    script = str(ROOT / "examples" / "hello.py")
    if launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", script]
    else:
        cmd = [sys.executable, "-m", "flagcx.launch", "--nproc", "2", script]
    out = subprocess.run(cmd, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    for rank in (0, 1):
        assert f"rank {rank} of 2: sum of ranks = 1 (expected 1)" in out.stdout, out.stdout


_NO_DESTROY = """
import atexit, os
drains = []
atexit.register(lambda: print(f"rank {os.environ['RANK']} drains at exit: {len(drains)}", flush=True))  # runs after flagcx's (LIFO)
import torch, torch.distributed as dist
import flagcx.frontends.process_group as pg
real = pg._drain_torch_groups
pg._drain_torch_groups = lambda: (drains.append(1), real())
dist.init_process_group("cpu:gloo,cuda:flagcx")
g = dist.new_group(backend="gloo")
t = torch.ones(8)
dist.all_reduce(t, group=g)
if os.environ.get("DESTROY"):
    dist.destroy_process_group()
"""


@pytest.mark.parametrize("destroy", [False, True])
def test_a_world_left_undestroyed_is_drained_at_exit(tmp_path, destroy):
    """Under torchrun, a gloo subgroup's worker thread could abort the process at exit (2 of 20 runs without the drain,
    0 of 30 with it: benchmarks/results/2026-12-08_cpu2core_exit_without_destroy.md): flagcx drains once, at destroy or at exit."""
    (tmp_path / "no_destroy.py").write_text(_NO_DESTROY)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "no_destroy.py"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **({"DESTROY": "1"} if destroy else {})}
    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    for rank in (0, 1):
        assert f"rank {rank} drains at exit: 1" in out.stdout, out.stdout


def test_every_quick_command_of_the_readme_and_docs_runs():
    """Every shell command of README and docs/ is found and either runs (exit 0), or is skipped for a stated reason;
    files they name exist; the ones taking minutes run in ``bash .ci/docs`` (tests/helpers/doc_commands.py)."""
    from tests.helpers import doc_commands

    found = doc_commands.steps()
    runnable = [s for s in found if not s.skip]
    assert any("flagcx-bench allreduce" in s.text and s.page == "README.md" for s in runnable), "the quick start's benchmark must be a runnable command"
    assert len(runnable) >= 10, [s.text for s in runnable]
    out = subprocess.run([sys.executable, "-m", "tests.helpers.doc_commands", "--quick"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and out.stdout.rstrip().endswith("0 problem(s)"), out.stdout + out.stderr
    assert out.stdout.count("\nok ") >= 5, out.stdout


def test_every_link_of_the_readme_and_docs_resolves():
    import re

    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    for page in pages:
        text = page.read_text()
        for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text):
            if "://" in target:
                continue
            assert (page.parent / target).exists(), f"{page.name} links to {target}, which does not exist"


def test_every_variable_config_reads_is_known():
    """config.VARIABLES (what the misspelling warning compares against) lists every FLAGCX_* name config.py reads."""
    import inspect
    import re

    read = set(re.findall(r'"(FLAGCX_[A-Z0-9_]+)"', inspect.getsource(config._load)))
    assert read and read <= set(config.VARIABLES), sorted(read - set(config.VARIABLES))
