"""Builds the compiled passes (``melter._fastpath``); without a C compiler or Cython, Melter
installs and runs on its Python passes alone."""

from setuptools import Extension, setup

try:
    from Cython.Build import cythonize
except ImportError:  # no Cython: pure Python
    extensions = []
else:
    extensions = cythonize(
        [
            Extension(
                "melter._fastpath",
                ["melter/_fastpath.pyx"],
                # Times must equal the Python passes' to the bit: no fused multiply-add.
                extra_compile_args=["-O2", "-ffp-contract=off"],
                optional=True,
            )
        ],
        language_level=3,
        quiet=True,
    )

setup(ext_modules=extensions)
