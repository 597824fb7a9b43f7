"""Builds the C++ CPU backend `pyfuse._C` against the torch already installed.

Install with `pip install --no-build-isolation -e .` so the build sees that torch instead of fetching
its own into an isolated environment. With PYFUSE_NO_CPP=1 (or no torch yet) the extension is skipped;
it is then compiled on first use from csrc/, or `backend="auto"` falls back to the reference.
"""

import os
import runpy

from setuptools import setup

build = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "pyfuse", "_build.py"))
ext_modules = []
cmdclass = {}
try:
    from torch.utils.cpp_extension import BuildExtension, CppExtension
except ImportError:
    CppExtension = None
if CppExtension is not None and os.environ.get("PYFUSE_NO_CPP") != "1":
    ext_modules.append(
        CppExtension(
            "pyfuse._C",
            build["CPP_SOURCES"],
            extra_compile_args=build["CPP_FLAGS"],
            extra_link_args=build["CPP_LINK_FLAGS"],
        )
    )
    cmdclass["build_ext"] = BuildExtension

setup(ext_modules=ext_modules, cmdclass=cmdclass)
