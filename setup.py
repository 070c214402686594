"""The optional C walk of check_pickle (megatron_peft_export/_pickle_walk.c): built by `pip install -e .` when a C
compiler and Python's headers are there; without it check_pickle runs the same walk in Python (slower)."""

from setuptools import Extension, setup

setup(
    ext_modules=[Extension("megatron_peft_export._pickle_walk", ["megatron_peft_export/_pickle_walk.c"], optional=True)]
)
