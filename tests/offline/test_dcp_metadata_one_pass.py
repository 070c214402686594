"""The C reader walks check_pickle's walk in its own pass (megatron_peft_export/_pickle_walk.h, included by
_dcp_metadata.c): check_pickle runs separately only on the Python path. A pickle check_pickle refuses is refused by
parse_metadata exactly as before (the same class and message, whether the reader itself refused it or declined and
the Python path did); a pickle the reader reads has passed check_pickle opcode for opcode."""

import pickle

import pytest

from megatron_peft_export.io import torch_save
from megatron_peft_export.io.torch_save import walk_pickle
from megatron_peft_export.offline import dcp_metadata
from megatron_peft_export.offline.dcp_metadata import MetadataError, parse_metadata
from tests.io.test_pickle_walk import HOSTILE
from tests.offline.test_dcp_metadata import torch_written
from tests.offline.test_dcp_metadata_c import _facts

C_READER = dcp_metadata._reader()
needs_c = pytest.mark.skipif(C_READER is None, reason="the C reader was not built")


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    return torch_written(tmp_path_factory.mktemp("one_pass"))


def _read(data: bytes):
    """The C reader's own answer: the arrays (read), (code, byte, value, value) (the walk refused it), or a str."""
    return C_READER.read(data, dcp_metadata._reader_tables()[0])


def _outcome(data: bytes, monkeypatch, c: bool):
    """parse_metadata's facts or its refusal (class and message), with the C reader on or forced off (then
    check_pickle and the restricted unpickler: the path as it was before the reader walked in its own pass)."""
    with monkeypatch.context() as patch:
        if not c:
            patch.setattr(dcp_metadata, "_reader", lambda: None)
        try:
            return _facts(parse_metadata(data))
        except Exception as exc:
            return type(exc), str(exc)


def _refusal(data: bytes) -> str:
    """check_pickle's refusal as parse_metadata words it (expected: from check_pickle itself, not the reader)."""
    with pytest.raises(ValueError) as refused:
        torch_save.check_pickle(data)
    return f"cannot be read (not a valid pickle: {refused.value}); is the checkpoint truncated?"


def _inside(host: bytes, hostile: bytes) -> bytes:
    """The hostile pickle's opcodes (its PROTO and STOP taken off) at the start of the metadata torch wrote, its
    object popped: the reader reads torch's records after it, so it goes as far as what it models of the hostile
    part."""
    body = hostile[2:] if hostile[:1] == b"\x80" else hostile
    body = body[:-1] if body.endswith(b".") else body
    return host[:2] + body + b"0" + host[2:]


@needs_c
@pytest.mark.parametrize("name", list(HOSTILE))
def test_the_hostile_corpus_is_refused_as_check_pickle_refuses_it(written, monkeypatch, name):
    """Every pickle of check_pickle's hostile corpus, alone and inside torch's metadata: parse_metadata's outcome is
    the Python path's (check_pickle, then the restricted unpickler); what check_pickle refuses is refused in its words;
    the reader's own answer is never a reading of a pickle check_pickle refuses, and a refusal of its own is the
    walk's refusal, at the same byte."""
    for data in (HOSTILE[name], _inside(written, HOSTILE[name])):
        outcome = _outcome(data, monkeypatch, True)
        assert outcome == _outcome(data, monkeypatch, False)
        walked, found = walk_pickle(data), _read(data)
        if walked is not None:
            assert outcome == (MetadataError, _refusal(data))
            assert type(found) is str or found == walked  # declined, or refused by the walk itself
        if type(found) is tuple and len(found) == 4:
            assert found == walked


@needs_c
def test_the_reader_itself_refuses_the_hostile_parts_it_reads_up_to(written):
    """Inside torch's metadata, the hostile pickles whose opcodes the reader models up to the refusal are refused by
    the reader's own walk (no second pass), not declined."""
    refused = {name for name in HOSTILE if len(_read(_inside(written, HOSTILE[name]))) == 4}
    assert refused >= {"deep key", "101 deep", "101 deep, TUPLE3", "101 deep, TUPLE", "shared-tuple key"}
    assert refused >= {"shared DICT key", "shared frozenset", "one torch.Size as many keys", "SETITEM on nothing"}
    assert refused >= {"LONG_BINPUT past the size", "PUT past the size", "PUT of 19 digits", "PUT of a sign"}
    assert refused >= {"BYTEARRAY8", "BINUNICODE8 past int64", "BINSTRING negative", "unknown opcode"}
    assert refused >= {"frame ending inside an opcode", "frame longer than the data", "FRAME inside a frame"}
    assert refused >= {"FRAME crossing a frame's end", "marked op below the mark"}


def _size_calls(times: int, items: int = 2000) -> bytes:
    """torch.Size(t) of one memoized tuple of `items` ints, `times` times, each popped: the reader models all of it
    (torch.Size of ints), and check_pickle counts what each call may hash (its arguments: `items` + 2 steps)."""
    size = b"ctorch\nSize\nr\xb8\x0b\x00\x00" + b"(" + b"K\x01" * items + b"t\x85r\xb9\x0b\x00\x00"  # 3000, 3001
    return size + b"0" + b"j\xb8\x0b\x00\x00j\xb9\x0b\x00\x00R0" * times + b"0"


def _deep_state(depth: int) -> bytes:
    """A tuple `depth` deep, pushed and popped: the reader keeps tuples of any depth (a TensorProperties' state is
    any value), check_pickle refuses past MAX_TUPLE_DEPTH."""
    return b"K\x00" + b"\x85" * depth + b"0"


@needs_c
@pytest.mark.parametrize(
    "part,refused",
    [(_size_calls(10), False), (_size_calls(2000), True), (_deep_state(100), False), (_deep_state(101), True)],
    ids=["few calls", "hash budget", "100 deep", "101 deep"],
)
def test_what_the_reader_models_but_check_pickle_refuses_is_refused_in_one_pass(written, monkeypatch, part, refused):
    """Rules only check_pickle has (the hashing budget, the tuple depth), in opcodes after torch's records: the reader
    reads every opcode of these, so without the walk in its pass it would read them; it refuses them in the walk's
    words, and reads the rest."""
    host = pickle.dumps(pickle.loads(written), protocol=2)  # no frames, memo indices below 3000
    data = host[:-1] + part + host[-1:]
    assert (walk_pickle(data) is not None) == refused
    found = _read(data)
    if refused:
        assert found == walk_pickle(data)
        with pytest.raises(MetadataError) as raised:
            parse_metadata(data)
        assert str(raised.value) == _refusal(data)
    else:
        assert type(found) is tuple and len(found) == 7
        assert _outcome(data, monkeypatch, True) == _outcome(data, monkeypatch, False)


@needs_c
@pytest.mark.parametrize("protocol", range(2, pickle.HIGHEST_PROTOCOL + 1))
def test_torchs_metadata_is_read_in_one_pass_as_the_python_path_reads_it(written, monkeypatch, protocol):
    """What torch writes (and its records pickled again at each protocol the reader reads): the reader reads it
    without check_pickle running (its walk is in the reader's pass), and parse_metadata's facts are the Python
    path's."""
    data = written if protocol == 4 else pickle.dumps(pickle.loads(written), protocol=protocol)
    expected = _outcome(data, monkeypatch, False)

    def not_called(data: bytes) -> None:
        raise AssertionError("check_pickle ran on the one-pass path")

    monkeypatch.setattr(dcp_metadata, "check_pickle", not_called)
    assert _outcome(data, monkeypatch, True) == expected
    assert type(expected) is list and expected[0]  # facts, not a refusal
