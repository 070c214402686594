import pytest

from megatron_peft_export.io import torch_save


@pytest.fixture(params=["c", "python"])
def walk(request, monkeypatch):
    """check_pickle through the C walk (skipped when it is not built: tests/io/test_pickle_walk.py fails on CI then),
    then through the Python one."""
    if request.param == "c" and torch_save._accelerated() is None:
        pytest.skip("the C walk of check_pickle is not built")
    if request.param == "python":
        monkeypatch.setattr(torch_save, "_accelerated", lambda: None)
    return request.param
