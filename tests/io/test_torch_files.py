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
from tests.support import hostile_pickles as hp
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


def test_check_pickle_accepts_every_protocol_and_refuses_what_would_allocate_past_the_data(walk):
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
        pickle.dumps(b"x" * 10, protocol=3)[:-6]: "declares 10 bytes, 7 follow",
        pickle.dumps(b"x" * 10)[:-3]: "at byte 2 declares 14 bytes, 11 follow",  # protocol 4 on: its FRAME
        b"N": "ends before its STOP opcode",
        b"\xff.": "unknown pickle opcode 0xff",
    }
    for data, message in bombs.items():
        with pytest.raises(ValueError, match=message):
            check_pickle(data)


def test_check_pickle_follows_tuples_through_the_memo_as_hashing_would(walk):
    """Tuples the unpickler would hash (dict keys, set items) are followed through shared references and nesting:
    what torch writes (Size arguments, shared stride tuples, tuple keys) passes; a shared-tuple key (32^12 hash
    steps, 800 bytes) and a key nested 200000 deep (SIGSEGV in CPython's tuple hash) are refused before unpickling."""
    stride = (64, 1)
    for obj in [
        {(1, 2): 3, (1, (2, (3,))): 4},
        [(stride, stride)] * 1000,
        {"a": (torch.Size([1, 2]), stride), "b": frozenset({(1, 2), (3, 4)})},
        {hp.shared_tuples(depth=2, width=8): 1},
    ]:
        for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
            check_pickle(pickle.dumps(obj, protocol=protocol))
    nested = b"K\x00" + b"\x85" * 100  # 100 levels pass, 101 do not
    check_pickle(hp.dict_keyed_by(nested))
    for data, message in [
        (hp.tuple_bomb_key(), "a tuple of shared tuples holding more items than the pickle has bytes"),
        (hp.deep_tuple_key(), "a tuple nested 101 deep"),
        (hp.dict_keyed_by(b"K\x00" + b"\x85" * 101), "a tuple nested 101 deep"),
        (b"\x80\x04\x8f(" + _doubled(20) + b"\x90.", "a tuple of shared tuples"),  # a set item
        (b"\x80\x02s.", "takes more items than the stack holds"),
    ]:
        with pytest.raises(ValueError, match=message):
            check_pickle(data)


def _doubled(times: int) -> bytes:
    """Opcodes leaving t on the stack, for t = (); t = (t, t) `times` times, through the memo (t memoized as
    `times`)."""
    return b")\x94" + b"".join(b"0h" + bytes([n]) + b"h" + bytes([n]) + b"\x86\x94" for n in range(times))


def _zip_with(tmp_path, data_pkl: bytes, name="f.pt"):
    path = tmp_path / name
    path.write_bytes(hp.with_data_pkl(data_pkl))
    return path


@pytest.mark.parametrize(
    "data_pkl,message",
    [
        (hp.in_a_dict("args", hp.opcodes(hp.shared_lists())), "items counted through shared references"),
        (hp.in_a_dict("args", hp.opcodes(hp.shared_lists(depth=200, width=1))), "nested deeper than 100 levels"),
        (hp.in_a_dict("seed", hp.huge_int()), "an integer of 40001 bits"),
        (hp.many_classes(1025), "more than 1024 class names"),
        (hp.call_pickle("__builtin__", "bytearray", b"J\x00\x00\x00\x40"), "bytearray of int"),
        (hp.call_pickle("torch", "Size", hp.opcodes(list(range(65)))), "torch.Size: expected up to 64"),
        (hp.global_pickle("torch", "has_cuda"), "torch.has_cuda"),
    ],
    ids=["shared lists", "deep lists", "huge int", "many classes", "bytearray(1 GiB)", "torch.Size of 65", "has_cuda"],
)
def test_load_torch_file_refuses_what_its_readers_could_not_walk(tmp_path, data_pkl, message):
    with open_regular(_zip_with(tmp_path, data_pkl)) as f, pytest.raises((ValueError, RefusedGlobal), match=message):
        load_torch_file(f)


def test_a_set_of_one_shared_tuple_many_times_is_refused(tmp_path):
    """set(list) as protocol 2 writes a set: the list holds one shared tuple (~8400 items hashed) 4000 times, 34
    million hash steps from 20 KB; check_pickle counts the list as one item, the set's builder counts the items."""
    shared = hp.opcodes(hp.shared_tuples(depth=3, width=20))
    index = (1000).to_bytes(4, "little")
    data = b"\x80\x02c__builtin__\nset\n(" + shared + b"r" + index + (b"j" + index) * 3999 + b"l\x85R."
    with open_regular(_zip_with(tmp_path, data)) as f, pytest.raises(ValueError, match="a set whose items hash far"):
        load_torch_file(f)


def test_what_torch_save_writes_of_plain_data_still_loads(tmp_path):
    state = {
        "args": argparse.Namespace(a=[1, 2], b=(3, (4, 5)), c={"x": None}, d={(1, 2), (3, (4,))}),
        "rng": (3, tuple(range(625)), None),
        "names": frozenset({"a", "b"}),
    }
    torch.save(state, tmp_path / "f.pt")
    found, _ = _load(tmp_path / "f.pt")
    assert vars(found["args"]) == vars(state["args"]) and found["rng"] == state["rng"]
    assert found["names"] == state["names"]
    data = pickle.dumps([bytearray(b"abc"), torch.Size([2, 3])], protocol=2)
    with open_regular(_zip_with(tmp_path, data, "g.pt")) as f:
        assert load_torch_file(f) == [bytearray(b"abc"), torch.Size([2, 3])]


def test_an_adapter_bin_with_a_shared_tuple_key_is_one_error(tmp_path):
    from megatron_peft_export.errors import AdapterFileError
    from megatron_peft_export.io.peft_dir import read_bin_header

    _zip_with(tmp_path, hp.tuple_bomb_key(), "adapter_model.bin")
    with pytest.raises(AdapterFileError, match="a tuple of shared tuples"):
        read_bin_header(tmp_path / "adapter_model.bin")


_HANDED_OUT = [
    ("argparse", "Namespace"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch.serialization", "_get_layout"),
    ("torch", "Size"),
    ("_codecs", "encode"),
    ("__builtin__", "bytearray"),
    ("__builtin__", "set"),
    ("megatron.core.enums", "ModelType"),
]


@pytest.mark.parametrize("module,name", _HANDED_OUT, ids=[f"{m}.{n}" for m, n in _HANDED_OUT])
@pytest.mark.parametrize("state", [b"N}X\x05\x00\x00\x00probeK\x01s\x86", b"}X\x05\x00\x00\x00probeK\x01s"])
def test_a_build_on_what_find_class_gives_is_refused_and_changes_nothing(tmp_path, module, name, state):
    """BUILD given a class or function itself (a GLOBAL) with a slot state or a dict sets its attributes, shared by
    the whole process (argparse.Namespace, torch's layout cache, this reader's functions and its inert classes):
    refused, nothing set."""
    from megatron_peft_export.io import torch_save

    shared = [
        argparse.Namespace,
        torch.serialization._get_layout,
        torch_save._rebuild_tensor_v2,
        torch_save._rebuild_v2,
        torch_save._size,
        torch_save._codecs_encode,
        torch_save._bytearray,
        torch_save._opaque("megatron.core.enums", "ModelType"),
    ]
    cache = dict(torch.serialization._get_layout.cache)
    data = b"\x80\x02c" + module.encode() + b"\n" + name.encode() + b"\n" + state + b"b."
    with open_regular(_zip_with(tmp_path, data)) as f, pytest.raises(Exception):  # noqa: B017 (refused somehow)
        load_torch_file(f)
    assert not any(hasattr(thing, "probe") for thing in shared)
    assert torch.serialization._get_layout.cache == cache
    found, _ = _load(_saved_namespace(tmp_path))
    assert type(found["args"]) is argparse.Namespace and vars(found["args"]) == {"a": 1}


def _saved_namespace(tmp_path):
    torch.save({"args": argparse.Namespace(a=1)}, tmp_path / "n.pt")
    return tmp_path / "n.pt"


@pytest.fixture(params=["C", "numpy"])
def blob_check(request, monkeypatch):
    """`_matching_evenly` through the C blob check (built with the package, as where CI runs) or its numpy
    reference."""
    from megatron_peft_export.io import torch_save

    if request.param == "C":
        assert torch_save._blob_check() is not None, "the C blob check is not built"
    else:
        monkeypatch.setattr(torch_save, "_blob_check", lambda: None)
    return request.param


def test_matching_evenly_spaced_blobs_answers_as_gathering_their_bytes_does(blob_check):
    """matching's strided path (blobs one step apart) against its gathering path, on random bytes, positions in runs
    and alone, blobs equal to the layout's values or differing in one byte, steps 0 and up, and starts that are not
    evenly spaced or reach past the buffer (the gathering path then)."""
    import numpy as np

    from megatron_peft_export.io.torch_save import Layout, _matching_gathered, matching

    rng = np.random.default_rng(3)
    evenly = 0
    for _ in range(300):
        length = int(rng.integers(1, 64))
        positions = np.unique(rng.integers(0, length, size=int(rng.integers(1, length + 1))))
        count, step = int(rng.integers(1, 40)), int(rng.integers(0, 2 * length))
        data = rng.integers(0, 4, size=count * max(step, 1) + length + 8, dtype=np.uint8)
        values = data[positions].copy()
        for n in range(1, count):
            if rng.random() < 0.7:  # a blob with the layout's values, except sometimes one byte
                data[n * step + positions] = values
                if rng.random() < 0.2:
                    data[n * step + positions[int(rng.integers(len(positions)))]] ^= 1
        starts = np.arange(count, dtype=np.int64) * step
        if rng.random() < 0.2 and count > 2:
            starts[-1] += 1  # not evenly spaced
        layout = Layout(length, positions, values, 0, torch.uint8, 0, (), (), 0)
        buffer = bytearray(data.tobytes())
        expected = _matching_gathered(np.frombuffer(buffer, dtype=np.uint8), starts, layout)
        assert (matching(buffer, starts, layout) == expected).all()
        evenly += count > 1 and (np.diff(starts) == step).all()
    assert evenly > 150


def test_matching_evenly_with_runs_joined_and_apart_answers_as_gathering_does(blob_check):
    """Blobs of up to 3 KB whose positions lie in clusters some words apart (fewer and more than `_GAP_WORDS`, so
    runs of words are joined across small gaps and kept apart across large ones), one byte changed in some blobs
    inside a cluster: the strided path against the gathering path."""
    import numpy as np

    from megatron_peft_export.io import torch_save
    from megatron_peft_export.io.torch_save import Layout, _matching_gathered, matching

    rng = np.random.default_rng(11)
    gaps = {"joined": 0, "apart": 0}
    matched = unmatched = 0
    for _ in range(200):
        clusters, at = [], int(rng.integers(0, 16))
        for _ in range(int(rng.integers(1, 8))):
            width = int(rng.integers(1, 40))
            clusters.append(np.arange(at, at + width))
            gap = int(rng.integers(0, 2 * torch_save._GAP_WORDS + 8)) * 8
            gaps["joined" if gap <= 8 * torch_save._GAP_WORDS else "apart"] += 1
            at += width + gap
        positions = np.unique(np.concatenate(clusters))
        length = int(positions[-1]) + 1 + int(rng.integers(0, 16))
        count, step = int(rng.integers(2, 700)), length + int(rng.integers(0, 24))
        data = rng.integers(0, 256, size=count * step + 16, dtype=np.uint8)
        values = data[positions].copy()
        for n in range(1, count):
            if rng.random() < 0.8:
                data[n * step + positions] = values
                if rng.random() < 0.2:
                    data[n * step + positions[int(rng.integers(len(positions)))]] ^= 1
        starts = np.arange(count, dtype=np.int64) * step
        layout = Layout(length, positions, values, 0, torch.uint8, 0, (), (), 0)
        buffer = bytearray(data.tobytes())
        expected = _matching_gathered(np.frombuffer(buffer, dtype=np.uint8), starts, layout)
        assert (matching(buffer, starts, layout) == expected).all()
        matched, unmatched = matched + int(expected.sum()), unmatched + int((~expected).sum())
    assert min(gaps.values()) > 100 and min(matched, unmatched) > 1000


def test_the_c_blob_check_is_used_and_reads_no_word_outside_its_data(monkeypatch):
    """`_matching_evenly` calls the C check when it is built; the C check refuses, before reading, any blob word past
    the data (by one byte, or by a count whose last blob overflows), negative sizes, malformed runs and masks."""
    import numpy as np

    from megatron_peft_export.io import torch_save
    from megatron_peft_export.io.torch_save import Layout, matching

    check = torch_save._blob_check()
    assert check is not None, "the C blob check is not built"
    calls = []
    monkeypatch.setattr(torch_save, "_blob_check", lambda: calls.append(1) or check)
    data = bytearray(range(64)) * 4
    layout = Layout(64, np.arange(0, 20), np.arange(0, 20, dtype=np.uint8), 0, torch.uint8, 0, (), (), 0)
    assert matching(data, np.array([0, 64, 128]), layout).tolist() == [True, True, True] and calls
    words = np.zeros(3, dtype=np.uint64)
    runs = np.array([[0, 3]], dtype=np.int64)
    assert check.words_match(bytes(24), 0, 0, 5, words, words, runs) == bytearray(b"\x01" * 5)
    assert check.words_match(bytes(48), 0, 24, 2, words, words, runs) == bytearray(b"\x01\x01")
    bad = [
        (bytes(47), 0, 24, 2, words, words, runs),  # the last blob's last word one byte past the data
        (bytes(48), 1, 24, 2, words, words, runs),
        (bytes(48), 0, 2**62, 3, words, words, runs),  # (count - 1) * step overflows
        (bytes(48), -1, 24, 1, words, words, runs),
        (bytes(48), 0, -24, 1, words, words, runs),
        (bytes(48), 0, 24, -1, words, words, runs),
        (bytes(48), 0, 24, 1, words, words, np.array([[0, 4]], dtype=np.int64)),  # past the words
        (bytes(48), 0, 24, 1, words, words, np.array([[2, 2]], dtype=np.int64)),  # empty
        (bytes(48), 0, 24, 1, words, words, np.array([[-1, 2]], dtype=np.int64)),
        (bytes(48), 0, 24, 1, words, words[:2], runs),  # mask and expected differ in length
        (bytes(48), 0, 24, 1, bytes(7), bytes(7), np.zeros(0, dtype=np.int64)),  # not whole words
        (bytes(48), 0, 24, 1, words, words, bytes(12)),  # not pairs
    ]
    for args in bad:
        with pytest.raises(ValueError):
            check.words_match(*args)


def test_sorted_distinct_is_numpy_unique():
    """`sorted_distinct` (np.unique without its masked-array check) gives np.unique's values and dtype: empty, one
    value, all equal, repeated and negative values, sorted or not."""
    import numpy as np

    from megatron_peft_export.io.torch_save import sorted_distinct

    rng = np.random.default_rng(2)
    arrays = [np.empty(0, dtype=np.int64), np.array([5]), np.full(7, 3), np.arange(9), np.arange(9)[::-1].copy()]
    arrays += [rng.integers(-20, 20, size=int(rng.integers(0, 60))) for _ in range(200)]
    for values in arrays:
        found, expected = sorted_distinct(values), np.unique(values)
        assert found.dtype == expected.dtype and found.tolist() == expected.tolist()
