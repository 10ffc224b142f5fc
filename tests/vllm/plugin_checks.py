"""The vLLM plugin's switch and wiring, in vLLM's own processes (run by .ci/vllm in the vLLM venv).

- Installed but not asked for, flagcx leaves vLLM alone: vLLM resolves its own CPU platform.
- ``FLAGCX_VLLM=1`` or ``VLLM_PLUGINS=flagcx``: vLLM resolves flagcx's CPU platform (dist_backend
  flagcx, flagcx's device communicator).
- The CUDA communicator class builds on this CPU-only vLLM and is vLLM's CudaCommunicator with
  flagcx's collectives first in its method order (the CUDA platform itself needs vLLM's CUDA
  build and cannot be imported here).

Exits 1 on any failure.
"""

from __future__ import annotations

import os
import subprocess
import sys

PROBE = "from vllm.platforms import current_platform as p; print(type(p).__name__, p.dist_backend, p.get_device_communicator_cls())"


def resolved(env: dict[str, str]) -> str:
    base = {k: v for k, v in os.environ.items() if k not in ("FLAGCX_VLLM", "VLLM_PLUGINS")}
    out = subprocess.run([sys.executable, "-c", PROBE], env={**base, **env}, capture_output=True, text=True, timeout=300, check=True)
    return out.stdout.strip().splitlines()[-1]


def main() -> int:
    failures = []
    cases = [
        ({}, "CpuPlatform gloo vllm.distributed.device_communicators.cpu_communicator.CpuCommunicator"),
        ({"FLAGCX_VLLM": "1"}, "FlagcxCpuPlatform flagcx flagcx.integrations.vllm.communicator.FlagcxCpuCommunicator"),
        ({"VLLM_PLUGINS": "flagcx"}, "FlagcxCpuPlatform flagcx flagcx.integrations.vllm.communicator.FlagcxCpuCommunicator"),
        ({"FLAGCX_VLLM": "0"}, "CpuPlatform gloo vllm.distributed.device_communicators.cpu_communicator.CpuCommunicator"),
    ]
    for env, want in cases:
        got = resolved(env)
        status = "ok" if got == want else f"FAILED: got {got!r}, want {want!r}"
        failures += [env] if got != want else []
        print(f"platform with {env or 'nothing set'}: {status}")
    from vllm.distributed.device_communicators.cuda_communicator import CudaCommunicator

    from flagcx.integrations.vllm.communicator import FlagcxCollectives, cuda_communicator_class

    cls = cuda_communicator_class()
    hot = ("all_reduce", "all_gather", "reduce_scatter", "all_gatherv", "reduce_scatterv")
    ok = issubclass(cls, CudaCommunicator) and all(getattr(cls, m) is getattr(FlagcxCollectives, m) for m in hot)
    print(f"CUDA communicator: vLLM's CudaCommunicator with flagcx's {', '.join(hot)}: {'ok' if ok else 'FAILED'}")
    return 1 if failures or not ok else 0


if __name__ == "__main__":
    sys.exit(main())
