"""The optional C parts (built by `pip install -e .` when a C compiler and Python's headers are there; without them the
same work runs in Python, slower): check_pickle's walk (megatron_peft_export/_pickle_walk.c), the `.metadata`
reader (megatron_peft_export/_dcp_metadata.c), the hook's reads of the model on the training thread at a save
(megatron_peft_export/_hook_reads.c) and the check of stored tensor blobs against their layout
(megatron_peft_export/_blob_check.c)."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension("megatron_peft_export._pickle_walk", ["megatron_peft_export/_pickle_walk.c"], optional=True),
        Extension("megatron_peft_export._dcp_metadata", ["megatron_peft_export/_dcp_metadata.c"], optional=True),
        Extension("megatron_peft_export._hook_reads", ["megatron_peft_export/_hook_reads.c"], optional=True),
        Extension("megatron_peft_export._blob_check", ["megatron_peft_export/_blob_check.c"], optional=True),
    ]
)
