"""Builds the compiled passes (``melter._fastpath``); without a C compiler or Cython, Melter
installs and runs on its Python passes alone.

The packages are listed here rather than in pyproject.toml because one of them lives outside
``melter/``: the built-in layouts stay in the top-level ``layouts/`` folder, where people edit
them, and install as ``melter.layout.builtin`` (read with ``importlib.resources``). The same
mapping serves the sdist, the wheel built from it and an editable install, so there is one
copy of each layout file.
"""

from setuptools import Extension, find_namespace_packages, setup

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
        # The generated C goes to build/, not beside the .pyx: it is a build product, never
        # part of the source tree or the sdist (which builds from the .pyx; MANIFEST.in).
        build_dir="build",
    )

packages = find_namespace_packages(include=["melter", "melter.*"], exclude=["*.__pycache__"])

setup(
    packages=[*packages, "melter.layout.builtin"],
    package_dir={"melter.layout.builtin": "layouts"},
    package_data={"melter.layout.builtin": ["*.yaml"]},
    ext_modules=extensions,
)
