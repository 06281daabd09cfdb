"""Build the optional C kernels (``tallytree._speedups``); without a compiler tallytree runs on Python."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension("tallytree._speedups", ["src/tallytree/_speedups.c"], optional=True),
    ]
)
