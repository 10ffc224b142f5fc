"""Build hook for the compiled shm transport; every other piece of metadata is in pyproject.toml.

``cffi_modules`` compiles ``flagcx._shm`` (csrc/) during ``pip install``, editable
installs included. The build is optional: without a C compiler or the Python
headers the install still succeeds with a warning, and flagcx runs its CPU
collectives over Gloo (``ShmAdapter.unavailable_reason()`` says why).
"""

import contextlib
import sys
from collections.abc import Iterator

from setuptools import setup
from setuptools.command.build_ext import build_ext


class OptionalBuildExt(build_ext):
    """build_ext that turns a failed compile of an extension into a warning."""

    def run(self) -> None:
        self._failed: dict[str, str] = {}
        try:
            super().run()
        except Exception as exc:  # e.g. no usable compiler at all
            self._warn("the C extensions", exc)

    def build_extension(self, ext) -> None:
        try:
            super().build_extension(ext)
        except Exception as exc:
            self._failed[ext.name] = str(exc)
            self._warn(ext.name, exc)

    @contextlib.contextmanager
    def _only_built(self) -> Iterator[None]:
        """Hide the extensions that failed from the copy / output listing steps."""
        everything, failed = self.extensions, getattr(self, "_failed", {})
        self.extensions = [e for e in everything if e.name not in failed]
        try:
            yield
        finally:
            self.extensions = everything

    def copy_extensions_to_source(self) -> None:
        with self._only_built():
            super().copy_extensions_to_source()

    def get_outputs(self) -> list[str]:
        with self._only_built():
            return super().get_outputs()

    def get_output_mapping(self) -> dict[str, str]:
        with self._only_built():
            return super().get_output_mapping()

    @staticmethod
    def _warn(what: str, exc: BaseException) -> None:
        bar = "=" * 78
        print(
            f"\n{bar}\nWARNING: building {what} failed: {exc}\n"
            "flagcx is installed without its shared-memory transport; CPU collectives use Gloo.\n"
            "Install a C compiler and the Python headers (e.g. apt-get install gcc python3-dev),\n"
            f"then reinstall flagcx to get it.\n{bar}\n",
            file=sys.stderr,
        )


# The extension uses the stable ABI (cffi builds _shm.abi3.so): one wheel serves every CPython >= 3.11.
setup(
    cffi_modules=["csrc/build_shm.py:ffibuilder"],
    cmdclass={"build_ext": OptionalBuildExt},
    options={"bdist_wheel": {"py_limited_api": "cp311"}},
)
