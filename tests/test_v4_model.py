"""DeepSeek-V4 on the real transformers model under nested TP: 16 ranks, every layout, against one process."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from .helpers.harness import assert_passed, run_suite

pytest.importorskip("transformers.models.deepseek_v4", reason="needs transformers >= 5.25 (the [models] extra)")


def test_v4_layouts_16_ranks():
    assert_passed(run_suite("tests.ranks.v4_suite:v4_layouts", 16, timeout=1200), min_checks=20)


def test_core_package_does_not_import_transformers():
    code = "import sys, flagcx, flagcx.topology; sys.exit('transformers' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0, "import flagcx pulled in transformers"


def test_generate_example_4_ranks():
    """examples/deepseek_v4_generate.py end to end through python -m flagcx.launch (float32, then bfloat16)."""
    root = Path(__file__).resolve().parent.parent
    for dtype in ("float32", "bfloat16"):
        cmd = [sys.executable, "-m", "flagcx.launch", "--nproc", "4", "examples/deepseek_v4_generate.py", "--tp", "4", "--ogroup-tp", "2", "--dtype", dtype]
        proc = subprocess.run(cmd, cwd=root, env={**os.environ, "FLAGCX_TIMEOUT": "120"}, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, f"{' '.join(cmd)}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        assert ": OK" in proc.stdout and "4 ranks" in proc.stdout, proc.stdout


def test_generate_example_from_a_published_checkpoint_4_ranks(tmp_path):
    """examples/deepseek_v4_generate.py --checkpoint on a generated FP8 / FP4 checkpoint, checked against transformers in one process."""
    from flagcx.models.deepseek_v4 import random_model, tiny_config

    from .helpers.v4_checkpoint import write_checkpoint

    config = tiny_config()
    write_checkpoint(tmp_path, {k: v.contiguous() for k, v in random_model(config, 5).state_dict().items()}, config)
    root = Path(__file__).resolve().parent.parent
    cmd = [
        sys.executable,
        "-m",
        "flagcx.launch",
        "--nproc",
        "4",
        "examples/deepseek_v4_generate.py",
        "--tp",
        "4",
        "--ogroup-tp",
        "2",
        "--checkpoint",
        str(tmp_path),
        "--check",
    ]
    proc = subprocess.run(cmd, cwd=root, env={**os.environ, "FLAGCX_TIMEOUT": "120"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd)}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert "tokens equal: OK" in proc.stdout and "MiB read by one rank" in proc.stdout, proc.stdout
