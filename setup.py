"""The optional C parts (built by `pip install -e .` when a C compiler and Python's headers are there; without them the
same work runs in Python, slower): check_pickle's walk (megatron_peft_export/_pickle_walk.c) and the `.metadata`
reader (megatron_peft_export/_dcp_metadata.c), and the hook's listing of a model's parameters at a first save
(megatron_peft_export/_module_walk.c)."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension("megatron_peft_export._pickle_walk", ["megatron_peft_export/_pickle_walk.c"], optional=True),
        Extension("megatron_peft_export._dcp_metadata", ["megatron_peft_export/_dcp_metadata.c"], optional=True),
        Extension("megatron_peft_export._module_walk", ["megatron_peft_export/_module_walk.c"], optional=True),
    ]
)
