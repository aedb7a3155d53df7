"""Build hook for the optional native kernel, ``cryptoplane._native._sectors``.

Project metadata lives in pyproject.toml; this file only adds the C extension.
The extension is optional: where it cannot be compiled or linked (no C compiler, no
OpenSSL headers) the install still succeeds and ``cryptoplane._native`` falls back to a
pure-Python path that gives the same bytes, more slowly.
"""

from __future__ import annotations

import sys

from setuptools import Extension, setup  # type: ignore[import-untyped]
from setuptools.command.build_ext import build_ext  # type: ignore[import-untyped]

_HOW_TO_GET_NATIVE = (
    "install a C compiler and the OpenSSL development files "
    "(Debian/Ubuntu: apt-get install build-essential libssl-dev; "
    "Fedora: dnf install gcc openssl-devel) and reinstall cryptoplane"
)


class OptionalBuildExt(build_ext):  # type: ignore[misc]
    """build_ext that turns a failed native build into a warning, not a failed install."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # any build failure must stay non-fatal
            self._warn(exc)

    def build_extension(self, ext: Extension) -> None:
        try:
            super().build_extension(ext)
        except Exception as exc:  # compiler and linker errors vary by tool
            self._warn(exc)

    @staticmethod
    def _warn(exc: BaseException) -> None:
        bar = "*" * 78
        print(
            f"\n{bar}\nWARNING: the native AES-XTS kernel (cryptoplane._native._sectors) "
            f"could not be built:\n  {exc}\n"
            "cryptoplane will use its pure-Python fallback: same bytes, much slower.\n"
            f"To get the native kernel, {_HOW_TO_GET_NATIVE}.\n{bar}\n",
            file=sys.stderr,
        )


setup(
    ext_modules=[
        Extension(
            "cryptoplane._native._sectors",
            ["cryptoplane/_native/sectors.c", "cryptoplane/_native/xts_ctx.c"],
            depends=["cryptoplane/_native/xts_ctx.h"],
            libraries=["crypto"],
            extra_compile_args=[
                "-O3",
                "-std=c99",
                "-Wall",
                "-Wextra",
                "-Wno-unused-parameter",
                "-Wno-missing-field-initializers",
                "-Wno-cast-function-type",
                "-fvisibility=hidden",  # only PyInit__sectors leaves the .so
            ],
        )
    ],
    cmdclass={"build_ext": OptionalBuildExt},
)
