"""Builds the optional Cython timestamping core.

The extension is optional: without a compiler (or with DETNET_NO_EXTENSIONS=1) the
package installs with the pure-Python fallback in ``native/_fallback.py``.
"""

import os

from setuptools import setup

ext_modules = []
if not os.environ.get("DETNET_NO_EXTENSIONS"):
    try:
        import numpy
        from Cython.Build import cythonize
        from setuptools import Extension
    except ImportError:  # no Cython at build time: fall back to pure Python
        pass
    else:
        ext_modules = cythonize(
            [
                Extension(
                    "detnet.native._core",
                    ["native/_core.pyx"],
                    include_dirs=[numpy.get_include()],
                    define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
                    extra_compile_args=["-O2"],
                )
            ],
            compiler_directives={
                "language_level": "3",
                "boundscheck": False,
                "wraparound": False,
                "cdivision": True,
                "embedsignature": True,
            },
        )
        # cythonize() drops `optional`; set it afterwards so a failed compile still installs.
        for ext in ext_modules:
            ext.optional = True

setup(ext_modules=ext_modules)
