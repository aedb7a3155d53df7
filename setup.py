"""Build hook for the optional native extensions of ``cryptoplane._native``.

Project metadata lives in pyproject.toml; this file only adds the C extensions:

* ``_sectors``: AES-XTS over runs of sectors, on OpenSSL's libcrypto;
* ``_fastpath``: ``Plane.encrypt``/``decrypt``'s fast path as a C method (no crypto, no
  libcrypto: it only dispatches to ``cryptography``).

Both are optional: where one cannot be compiled or linked (no C compiler, no OpenSSL
headers) the install still succeeds and ``cryptoplane`` falls back to pure Python that
gives the same results, more slowly.
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

_WHAT = {
    "cryptoplane._native._sectors":
        "the native AES-XTS kernel (cryptoplane._native._sectors)",
    "cryptoplane._native._fastpath":
        "the native encrypt/decrypt fast path (cryptoplane._native._fastpath)",
    "cryptoplane._native._chunks":
        "the native age STREAM chunk kernel (cryptoplane._native._chunks)",
}

_WARNINGS = [
    "-O3",
    "-std=c99",
    "-Wall",
    "-Wextra",
    "-Wno-unused-parameter",
    "-Wno-missing-field-initializers",
    "-Wno-cast-function-type",
]


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
            self._warn(exc, ext.name)

    @staticmethod
    def _warn(exc: BaseException, name: str | None = None) -> None:
        what = _WHAT.get(name or "", "the native extensions (cryptoplane._native)")
        bar = "*" * 78
        print(
            f"\n{bar}\nWARNING: {what} could not be built:\n  {exc}\n"
            "cryptoplane will use its pure-Python fallback: same results, slower.\n"
            f"To get the native code, {_HOW_TO_GET_NATIVE}.\n{bar}\n",
            file=sys.stderr,
        )


setup(
    ext_modules=[
        Extension(
            "cryptoplane._native._sectors",
            [
                "cryptoplane/_native/sectors.c",
                "cryptoplane/_native/sectors_batch.c",
                "cryptoplane/_native/xts_ctx.c",
            ],
            depends=[
                "cryptoplane/_native/sectors.h",
                "cryptoplane/_native/xts_ctx.h",
                "cryptoplane/_native/openssl_error.h",
            ],
            libraries=["crypto"],
            extra_compile_args=[
                *_WARNINGS,
                "-fvisibility=hidden",  # only PyInit__sectors leaves the .so
            ],
        ),
        Extension(
            "cryptoplane._native._fastpath",
            ["cryptoplane/_native/fastpath.c"],
            extra_compile_args=[
                *_WARNINGS,
                "-fvisibility=hidden",  # only PyInit__fastpath leaves the .so
            ],
        ),
        Extension(
            "cryptoplane._native._chunks",
            ["cryptoplane/_native/chunks.c"],
            depends=["cryptoplane/_native/openssl_error.h"],
            libraries=["crypto"],
            extra_compile_args=[*_WARNINGS, "-fvisibility=hidden"],
        ),
    ],
    cmdclass={"build_ext": OptionalBuildExt},
)
