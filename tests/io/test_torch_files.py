"""torch.save files read without torch.load (io/torch_save.load_torch_file) and pickles checked before unpickling
(check_pickle): what torch.save writes comes back as torch.load gives it; what it does not write is refused."""

import argparse
import pickle
import zipfile
from collections import OrderedDict

import pytest
import torch

from megatron_peft_export.io.safe_read import open_regular
from megatron_peft_export.io.torch_save import Opaque, RefusedGlobal, StoredTensor, check_pickle, load_torch_file
from tests.support.gadgets import Call


def _load(path):
    with open_regular(path) as f:
        found = load_torch_file(f)
        return found, {k: v.read(f) for k, v in _tensors(found)}


def _tensors(obj, prefix=""):
    if isinstance(obj, StoredTensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _tensors(v, f"{prefix}/{k}")
    elif isinstance(obj, (list, tuple)):
        for n, v in enumerate(obj):
            yield from _tensors(v, f"{prefix}/{n}")


def test_tensors_and_plain_data_come_back_as_torch_load_gives_them(tmp_path):
    flat = torch.arange(40, dtype=torch.float32)  # views of one storage, as Megatron's contiguous buffers save them
    state = {
        "model": OrderedDict(
            a=flat[:12].view(3, 4),
            b=flat[12:40].view(4, 7),
            strided=torch.randn(5, 6)[1:, ::2],
            bf16=torch.randn(7).to(torch.bfloat16),
            half=torch.randn(2, 3).half(),
            i64=torch.arange(6),
            u16=torch.tensor([1, 2, 65535], dtype=torch.uint16),
            empty=torch.zeros(0, 3),
            scalar=torch.tensor(2.5),
            param=torch.nn.Parameter(torch.ones(2, 2)),
        ),
        "args": argparse.Namespace(
            num_layers=4, swiglu=True, params_dtype=torch.bfloat16, data_path=["a", "b"], size=torch.Size([2, 3])
        ),
        "plain": {"bytes": b"\x00\xff", "set": {1, 2}, "tuple": (1.5, None, "x"), "slice": slice(1, 2)},
    }
    torch.save(state, tmp_path / "state.pt")
    expected = torch.load(tmp_path / "state.pt", weights_only=True)
    found, tensors = _load(tmp_path / "state.pt")
    for name, tensor in expected["model"].items():
        got = tensors[f"/model/{name}"]
        assert got.dtype == tensor.dtype and got.shape == tensor.shape and torch.equal(got, tensor.detach()), name
    assert vars(found["args"]) == vars(expected["args"])
    assert found["plain"] == expected["plain"]
    assert (
        isinstance(found["model"]["a"], StoredTensor)
        and found["model"]["a"].span() == (0, 48)
        and found["model"]["b"].span() == (48, 160)
    )


def test_megatron_modelopt_and_numpy_objects_are_kept_as_inert_names(tmp_path):
    import numpy as np
    from megatron.core.transformer.enums import AttnBackend

    torch.save(
        {"args": argparse.Namespace(attention_backend=AttnBackend.flash, num_layers=2), "rng": np.random.get_state()},
        tmp_path / "common.pt",
    )
    found, _ = _load(tmp_path / "common.pt")
    assert isinstance(found["args"].attention_backend, Opaque) and found["args"].num_layers == 2
    assert found["args"].attention_backend.qualified_name == "megatron.core.transformer.enums.AttnBackend"
    assert isinstance(found["rng"][1], Opaque)


@pytest.mark.parametrize(
    "payload,name",
    [
        (Call(print, "x"), "builtins.print"),
        (Call(eval, "1"), "builtins.eval"),
        (Call(getattr, 1, "real"), "builtins.getattr"),
        (torch.nn.Linear(2, 2), "torch.nn.modules.linear.Linear"),
        (Call(zipfile.ZipFile, "x"), "zipfile.ZipFile"),
    ],
    ids=["print", "eval", "getattr", "a module", "a class"],
)
def test_any_other_class_or_function_is_refused(tmp_path, payload, name):
    torch.save({"args": payload}, tmp_path / "bad.pt")
    with open_regular(tmp_path / "bad.pt") as f, pytest.raises(RefusedGlobal, match=name):
        load_torch_file(f)


def _archive(path, members):
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for name, data in members.items():
            z.writestr(name, data)


def test_malformed_archives_are_refused(tmp_path):
    torch.save({"w": torch.ones(4)}, tmp_path / "good.pt")
    with zipfile.ZipFile(tmp_path / "good.pt") as z:
        members = {n: z.read(n) for n in z.namelist()}
    legacy = tmp_path / "legacy.pt"
    torch.save({"w": torch.ones(4)}, legacy, _use_new_zipfile_serialization=False)
    compressed = tmp_path / "compressed.pt"
    with zipfile.ZipFile(compressed, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in members.items():
            z.writestr(name, data)
    short = tmp_path / "short.pt"
    _archive(short, {**members, "good/data/0": b"\0" * 8})
    big_endian = tmp_path / "big.pt"
    _archive(big_endian, {**members, "good/byteorder": b"big"})
    for path, message in [
        (legacy, "no zip end record"),
        (compressed, "is compressed"),
        (short, "is a member of 8 bytes"),
        (big_endian, "not little-endian"),
    ]:
        with open_regular(path) as f, pytest.raises(ValueError, match=message):
            load_torch_file(f)


def test_check_pickle_accepts_every_protocol_and_refuses_what_would_allocate_past_the_data():
    for obj in [
        1,
        "x",
        [1, 2, {3: 4}],
        b"abc" * 1000,
        1.5,
        10**100,
        (1,),
        {1},
        frozenset(),
        bytearray(b"a"),
        [[1]] * 300,
        "a\nb",
        list(range(2000)),
    ]:
        for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
            check_pickle(pickle.dumps(obj, protocol=protocol))
    bombs = {
        b"\x80\x02]r\xff\xff\xff\x7f.": "a memo index past the pickle's size",  # LONG_BINPUT: a 32 GiB memo table
        b"]p99999999999\n.": "a bad memo index",  # PUT
        b"\x80\x05\x96"
        + (1 << 40).to_bytes(8, "little")
        + b".": "declares 1099511627776 bytes",  # BYTEARRAY8: allocated before it is read
        b"\x80\x04\x8d" + (1 << 40).to_bytes(8, "little") + b".": "declares 1099511627776 bytes",  # BINUNICODE8
        pickle.dumps(b"x" * 10)[:-3]: "declares 10 bytes",
        b"N": "ends before its STOP opcode",
        b"\xff.": "unknown pickle opcode 0xff",
    }
    for data, message in bombs.items():
        with pytest.raises(ValueError, match=message):
            check_pickle(data)
