"""The optional C parts (built by `pip install -e .` when a C compiler and Python's headers are there; without them the
same work runs in Python, slower): check_pickle's walk (megatron_peft_export/_pickle_walk.c) and the `.metadata`
reader (megatron_peft_export/_dcp_metadata.c), which both include the walk itself (_pickle_walk.h)."""

from setuptools import Extension, setup

_WALK = ["megatron_peft_export/_pickle_walk.h"]

setup(
    ext_modules=[
        Extension(
            "megatron_peft_export._pickle_walk", ["megatron_peft_export/_pickle_walk.c"], depends=_WALK, optional=True
        ),
        Extension(
            "megatron_peft_export._dcp_metadata", ["megatron_peft_export/_dcp_metadata.c"], depends=_WALK, optional=True
        ),
    ]
)
