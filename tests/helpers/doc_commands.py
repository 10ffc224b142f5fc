"""Every shell command of the README and docs/: found, classified, and run, so that none goes stale.

A command is a line of a ```bash / ```sh block (``\\`` continuations and multi-line quotes
joined) or an inline code span that starts with a program (``python``, ``flagcx-bench``,
``torchrun``, ``bash``, ``pip``, ``mpiexec``...). Steps joined by ``&&`` are judged one by
one: the quick start's install steps are skipped, its benchmark runs. A step that cannot
run here says why (:data:`SKIPS`: installs, GPU, several hosts, the user's own script,
placeholders); every other step runs as written from the repository root and must exit 0.

    python -m tests.helpers.doc_commands            # every runnable step (3.6 min on 2 cores): .ci/docs
    python -m tests.helpers.doc_commands --quick    # the steps that take seconds (CI runs these in tests/test_first_hour.py)
    python -m tests.helpers.doc_commands --list     # what would run, what is skipped and why
"""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parent.parent.parent

PROGRAMS = ("python", "python3", "flagcx-bench", "torchrun", "bash", "pip", "mpiexec", "mpirun", "sudo", "torchfrtrace")
"""Words a command starts with (after ``VAR=value`` assignments)."""

SKIPS: tuple[tuple[str, str], ...] = (
    (r"^pip |^python3? -m venv |^\. \S+/bin/activate$", "installs packages (CI's own install runs the quick start's)"),
    (r"\bsudo\b", "needs root for its network namespaces"),
    (r"--device cuda|-m gpu\b|FLAGCX_NCCL_|FLAGCX_VENDOR_BACKEND", "needs a GPU or a vendor's accelerator"),
    (r"--nnodes|\bmpiexec -hosts\b|\bmpirun -H\b", "needs several hosts"),
    (r"\btrain\.py\b", "stands for the user's own training script"),
    (r"^python3? -m pytest -q$", "is the test run itself (the quick start's second command, which CI runs)"),
    (r"^bash \.ci/run$|^\.ci/run$", "is CI itself"),
    (r"\.ci/vllm|from vllm", "runs in vLLM's own venv: bash .ci/vllm"),
    (r"\.ci/docs|tests\.helpers\.doc_commands", "is this check itself"),
    (r"^torchfrtrace\b", "reads the dumps of a failed run"),
    (r"\.\.\.|\bN\b|\bFILE\b|COLLECTIVE|\[flags\]|\bMODEL\b|<[^>]+>", "has placeholders"),
    (r"^[A-Z_]+=\S+$", "sets a variable"),
    (r"^\S+$|^flagcx-bench --[\w-]+$|^python -m flagcx\.launch$", "names a program or an option in prose"),
)
"""(pattern, why): the first pattern found in a step skips it."""

SLOW = r"^flagcx-bench |--nproc (8|16)\b|benchmarks/|-m pytest "
"""Steps that take minutes: run by the full check only (``.ci/docs``), not by CI's quick one."""

_FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
_INLINE = re.compile(r"(?<!`)`((?:[^`\n]|\n(?!\n))+)`(?!`)")
_START = re.compile(r"^(?:[A-Z_]+=\S+ )*(?:" + "|".join(re.escape(p) for p in PROGRAMS) + r")\b")
_PATH = re.compile(r"^(?:examples|benchmarks|tests|docs|\.ci)/[\w./{},-]+$")


@dataclass(frozen=True)
class Step:
    """One command (or one ``&&`` step of it) and where the docs give it."""

    page: str
    line: int
    text: str

    @property
    def skip(self) -> Optional[str]:
        """Why it cannot run here, or None."""
        return next((why for pattern, why in SKIPS if re.search(pattern, self.text)), None)

    @property
    def slow(self) -> bool:
        return re.search(SLOW, self.text) is not None

    def paths(self) -> list[str]:
        """The repository files it names (``examples/x.py``), brace forms expanded."""
        try:
            words = shlex.split(self.text, comments=True)
        except ValueError:
            words = self.text.split()
        found = []
        for w in words:
            if _PATH.match(w):
                m = re.search(r"\{([^}]*)\}", w)
                found += [w[: m.start()] + alt + w[m.end() :] for alt in m.group(1).split(",")] if m else [w]
        return found


def pages(root: Path = ROOT) -> list[Path]:
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def _scan(text: str) -> tuple[bool, int]:
    """(whether a quote is still open at the end of ``text``, where its first ``# comment`` outside quotes starts or -1)."""
    quote = ""
    for i, ch in enumerate(text):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or text[i - 1].isspace()):
            return False, i
    return bool(quote), -1


def _joined(lines: list[str]) -> list[str]:
    """Shell lines with ``\\`` continuations and open quotes joined into whole commands, ``# comments`` dropped."""
    out: list[str] = []
    pending = ""
    for raw in lines:
        if pending and _scan(pending)[0]:  # inside a quoted string: the line as it is
            pending = f"{pending}\n{raw}"
        else:
            at = _scan(raw)[1]
            line = (raw[:at] if at >= 0 else raw).strip()
            pending = f"{pending} {line}" if pending else line
        if pending.endswith("\\"):
            pending = pending[:-1].rstrip()
            continue
        if _scan(pending)[0]:
            continue
        if pending:
            out.append(pending)
        pending = ""
    if pending:
        out.append(pending)
    return out


def _steps(page: str, line: int, command: str) -> list[Step]:
    return [Step(page, line, part.strip()) for part in re.split(r"\s&&\s", command) if part.strip()]


def steps(root: Path = ROOT) -> list[Step]:
    """Every command step of the README and docs/, in page order."""
    found: list[Step] = []
    for page in pages(root):
        text = page.read_text()
        name = str(page.relative_to(root))
        fenced = [(m.start(), m.end()) for m in _FENCE.finditer(text)]
        for m in _FENCE.finditer(text):
            if m.group(1) in ("bash", "sh", "shell"):
                line = text.count("\n", 0, m.start()) + 2
                for command in _joined(m.group(2).splitlines()):
                    found += _steps(name, line, command)
        for m in _INLINE.finditer(text):
            if any(a <= m.start() < b for a, b in fenced):
                continue
            span = " ".join(m.group(1).split())
            if _START.match(span):
                found += _steps(name, text.count("\n", 0, m.start()) + 1, span)
    return found


def unlabelled_commands(root: Path = ROOT) -> list[str]:
    """``page:line: text`` of command lines inside fences with no language (the finder would miss them)."""
    bad = []
    for page in pages(root):
        text = page.read_text()
        for m in _FENCE.finditer(text):
            if m.group(1):
                continue
            for k, line in enumerate(m.group(2).splitlines()):
                if _START.match(line.strip()):
                    bad.append(f"{page.relative_to(root)}:{text.count(chr(10), 0, m.start()) + 2 + k}: {line.strip()}")
    return bad


def run(step: Step, timeout: float, root: Path = ROOT) -> tuple[int, float, str]:
    """(exit status, seconds, output tail) of ``step`` run by bash from the repository root."""
    start = time.monotonic()
    try:
        out = subprocess.run(["bash", "-o", "pipefail", "-c", step.text], cwd=root, capture_output=True, text=True, timeout=timeout)
        return out.returncode, time.monotonic() - start, (out.stdout + out.stderr)[-2000:]
    except subprocess.TimeoutExpired as exc:
        tail = ((exc.stdout or b"") + (exc.stderr or b"")).decode(errors="replace")[-2000:] if isinstance(exc.stdout, bytes) else ""
        return 124, time.monotonic() - start, f"timed out after {timeout:g} s\n{tail}"


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.helpers.doc_commands", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="only the steps that take seconds")
    parser.add_argument("--list", action="store_true", help="list the steps and what would happen to each; run nothing")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per step (default 900)")
    ns = parser.parse_args(argv)
    failed = 0
    for bad in unlabelled_commands():
        print(f"UNLABELLED {bad}  (give its fence a language: ```bash)")
        failed += 1
    seen: dict[str, str] = {}
    for step in steps():
        where = f"{step.page}:{step.line}"
        short = step.text.splitlines()[0][:100]
        missing = [p for p in step.paths() if not (ROOT / p).exists()]
        if missing:
            print(f"MISSING  {where}: {step.text}  (no {', '.join(missing)})")
            failed += 1
        if step.skip:
            print(f"skip     {where}: {short}  ({step.skip})")
        elif step.text in seen:
            print(f"same     {where}: {short}  (as {seen[step.text]})")
        elif ns.quick and step.slow:
            print(f"slow     {where}: {short}  (runs without --quick)")
        elif ns.list:
            print(f"run      {where}: {step.text}")
        else:
            seen[step.text] = where
            rc, secs, tail = run(step, ns.timeout)
            print(f"{'ok' if rc == 0 else 'FAILED':8} {where}: {step.text}  ({secs:.1f} s)", flush=True)
            if rc:
                print("\n".join("    " + line for line in tail.splitlines()))
                failed += 1
    print(f"{failed} problem(s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
