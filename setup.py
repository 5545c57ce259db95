"""Builds the Cython cores (cext/: SMTP syntax, durable file steps) into
extension modules inside `engine`.

Metadata lives in pyproject.toml; this file exists only because extension
modules still need setup.py's ext_modules.
"""
from Cython.Build import cythonize
from setuptools import Extension, setup

extensions = [
    Extension(
        "engine._smtpcore",
        ["cext/smtpcore.pyx"],
        extra_compile_args=["-O3"],
    ),
    Extension(
        "engine._fileio",
        ["cext/fileio.pyx"],
        extra_compile_args=["-O3"],
    ),
]

setup(
    ext_modules=cythonize(
        extensions,
        language_level=3,
        compiler_directives={
            "boundscheck": False,
            "wraparound": False,
            "cdivision": True,
            "initializedcheck": False,
        },
    ),
)
