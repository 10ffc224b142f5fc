"""cffi API-mode builder of ``flagcx._shm``, the compiled shared-memory transport.

``setup.py`` names ``ffibuilder`` in ``cffi_modules``, so ``pip install`` (editable or
not) compiles it; ``python csrc/build_shm.py`` builds it in place for development.
The declarations are the block between the cdef markers of ``flagcx_shm.h``. Kernels
are compiled for several x86-64 levels in one binary (target_clones), never with
``-march=native``, so a built wheel runs on any x86-64 CPU.
"""

import os

from cffi import FFI

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
_SOURCES = ["shm_segment.c", "shm_collectives.c", "shm_p2p.c", "shm_helpers.c", "flagcx_reduce.c"]


def _cdef() -> str:
    with open(os.path.join(_HERE, "flagcx_shm.h")) as f:
        text = f.read()
    return text.split("/* cdef-begin */", 1)[1].split("/* cdef-end */", 1)[0]


def _rel(path: str) -> str:
    # setuptools wants paths relative to the project root (its cwd); a direct run
    # compiles in a temporary directory, so it needs absolute ones.
    return path if __name__ == "__main__" else os.path.relpath(path, _ROOT)


ffibuilder = FFI()
ffibuilder.cdef(_cdef())
ffibuilder.set_source(
    "flagcx._shm",
    '#include "flagcx_shm.h"',
    sources=[_rel(os.path.join(_HERE, s)) for s in _SOURCES],
    include_dirs=[_rel(_HERE)],
    # this script too: it is what the sdist needs to rebuild (and it holds the cdef)
    depends=[_rel(os.path.join(_HERE, f)) for f in ("flagcx_shm.h", "shm_internal.h", "flagcx_reduce.h", "build_shm.py")],
    # -g0 after the interpreter's own -g, and a stripped link: the wheel carries no debug info (787 -> ~260 KB)
    extra_compile_args=["-O3", "-g0", "-std=gnu11", "-fno-strict-aliasing", "-pthread"],
    extra_link_args=["-pthread", "-s"],
    libraries=["rt"],
)

if __name__ == "__main__":
    import glob
    import shutil
    import tempfile

    os.chdir(_ROOT)
    with tempfile.TemporaryDirectory() as tmp:
        built = ffibuilder.compile(tmpdir=tmp, verbose=True)
        for old in glob.glob(os.path.join(_ROOT, "flagcx", "_shm.*so")):  # e.g. an editable install's .abi3.so
            os.remove(old)
        shutil.copy(built, os.path.join(_ROOT, "flagcx"))
