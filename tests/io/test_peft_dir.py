"""The adapter readers against malformed and hostile files, property-based (hypothesis): whatever the bytes of
adapter_config.json and adapter_model.safetensors, reading them (the checks import, verify and push run) either
succeeds with consistent values or raises an ExportError with a message, never another exception, never a hang."""

import json
import math
import re
import shutil
import struct
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from megatron_peft_export.errors import AdapterFileError, ExportError, NonFiniteError
from megatron_peft_export.io.peft_dir import (
    FLOAT_DTYPES,
    MAX_RANK,
    check_shapes,
    nonfinite,
    read_adapter,
    read_config,
    read_header,
)

pytestmark = pytest.mark.timeout(300)
FUZZ = settings(
    max_examples=100, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck)
)
KEY_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
KEY_B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
DTYPE_SIZE = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8, "I32": 4, "U8": 1, "BOOL": 1, "I64": 8}
GOOD_CONFIG = {
    "peft_type": "LORA",
    "r": 2,
    "lora_alpha": 4,
    "target_modules": ["q_proj"],
    "rank_pattern": {},
    "alpha_pattern": {},
    "use_dora": False,
}

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=8,
)
interesting = st.one_of(
    json_values,
    st.sampled_from(["LORA", "(a+)+$", ".*", "(.*)*", "a)|(b", "q_proj", "", "[", r"(\w+)\1", "x" * 300]),
    st.integers(-3, 2**21),
    st.lists(st.sampled_from(["q_proj", "(a|a)*b", ".*.*.*.*z", 7]), max_size=3),
    st.dictionaries(
        st.sampled_from(["q_proj", "(a+)+", "layers\\.0", "v_proj"]),
        st.one_of(st.integers(-2, 2**21), st.floats(), st.text(max_size=3)),
        max_size=3,
    ),
)
configs = st.one_of(
    json_values,
    st.fixed_dictionaries(
        {},
        optional={
            name: interesting
            for name in (
                "peft_type",
                "r",
                "lora_alpha",
                "target_modules",
                "target_parameters",
                "rank_pattern",
                "alpha_pattern",
                "use_dora",
                "use_rslora",
                "base_model_name_or_path",
            )
        },
    ),
    st.builds(
        lambda changes: {**GOOD_CONFIG, **changes},
        st.dictionaries(st.sampled_from(sorted(GOOD_CONFIG)), interesting, max_size=2),
    ),
)


@pytest.fixture(scope="module")
def scratch():
    path = Path(tempfile.mkdtemp(prefix="fuzz-adapter-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _config_holds(config):
    """What a config that passed the checks guarantees to its readers."""
    assert isinstance(config, dict) and config["peft_type"] == "LORA"
    assert isinstance(config["r"], int) and not isinstance(config["r"], bool) and 1 <= config["r"] <= MAX_RANK
    assert isinstance(config["lora_alpha"], (int, float)) and math.isfinite(config["lora_alpha"])
    for name in ("rank_pattern", "alpha_pattern"):
        assert isinstance(config.get(name) or {}, dict)


@FUZZ
@given(document=configs)
def test_any_json_config_is_read_or_refused_with_an_export_error(scratch, document):
    path = scratch / "adapter_config.json"
    path.write_text(json.dumps(document))
    try:
        config = read_config(path)
    except AdapterFileError as exc:
        assert str(exc).startswith(str(path)) and "\n" not in str(exc)
        return
    _config_holds(config)
    check_shapes(
        config, {KEY_A: ("F32", (config["r"], 4)), KEY_B: ("F32", (4, config["r"]))}, "adapter"
    )  # matches its own r


@FUZZ
@given(raw=st.binary(max_size=600) | st.text(max_size=300).map(str.encode))
def test_any_bytes_as_config_are_read_or_refused_with_an_export_error(scratch, raw):
    path = scratch / "adapter_config.json"
    path.write_bytes(raw)
    try:
        _config_holds(read_config(path))
    except AdapterFileError:
        pass


def _safetensors(header: dict, body: bytes, length_delta: int, cut: int | None) -> bytes:
    data = json.dumps(header).encode()
    raw = struct.pack("<Q", max(0, len(data) + length_delta)) + data + body
    return raw if cut is None else raw[:cut]


tensor_entries = st.fixed_dictionaries(
    {
        "dtype": st.sampled_from(sorted(DTYPE_SIZE)) | st.text(max_size=4),
        "shape": st.lists(st.integers(-2, 6) | st.sampled_from([2**40, 2**63]), max_size=3),
        "data_offsets": st.lists(st.integers(-4, 200) | st.sampled_from([2**64 + 1]), min_size=0, max_size=3),
    }
)
VALID_HEADER = {
    KEY_A: {"dtype": "F32", "shape": [2, 4], "data_offsets": [0, 32]},
    KEY_B: {"dtype": "F32", "shape": [4, 2], "data_offsets": [32, 64]},
}
VALID_BODY = struct.pack("<16f", *range(16))


def _lie(key, field, value):
    """The valid header with one field of one tensor replaced: a header that lies about the data."""
    header = json.loads(json.dumps(VALID_HEADER))
    header[key][field] = value
    return header


headers = st.dictionaries(
    st.sampled_from([KEY_A, KEY_B, "__metadata__", "other", ""]), tensor_entries | json_values, max_size=3
) | st.builds(
    _lie,
    st.sampled_from([KEY_A, KEY_B]),
    st.sampled_from(["dtype", "shape", "data_offsets"]),
    st.sampled_from(["F16", "BF16", "F64", "I32", "F8_E4M3"])
    | tensor_entries.map(lambda e: e["shape"])
    | tensor_entries.map(lambda e: e["data_offsets"]),
)
bodies = st.binary(max_size=200) | st.just(VALID_BODY) | st.just(VALID_BODY + b"\0" * 8) | st.just(VALID_BODY[:40])


@FUZZ
@given(
    header=headers,
    body=bodies,
    length_delta=st.sampled_from([0, 0, 0, -3, 5, 2**40]),
    cut=st.none() | st.integers(0, 400),
)
def test_any_safetensors_header_is_read_or_refused_with_an_export_error(scratch, header, body, length_delta, cut):
    path = scratch / "adapter_model.safetensors"
    path.write_bytes(_safetensors(header, body, length_delta, cut))
    try:
        found = read_header(path)
    except AdapterFileError as exc:
        assert str(exc).startswith(str(path)) and "\n" not in str(exc)
        return
    # what a header that passed guarantees: floating point, sizes that fit the file
    for dtype, shape in found.values():
        assert dtype in FLOAT_DTYPES and all(n >= 0 for n in shape)
        assert math.prod(shape) * DTYPE_SIZE[dtype] <= path.stat().st_size


@FUZZ
@given(document=configs, header=headers, body=bodies, cut=st.none() | st.integers(0, 400), values=st.booleans())
def test_import_verify_and_push_read_any_adapter_or_refuse_it_with_an_export_error(
    scratch, document, header, body, cut, values
):
    """The whole reader (import, verify and push run it), and verify's entry point, on fuzzed config + weights."""
    from megatron_peft_export.importer import read_adapter as _read_adapter
    from megatron_peft_export.services.verify import VerificationInputError, verify_adapter

    adapter = scratch / "adapter"
    adapter.mkdir(exist_ok=True)
    (adapter / "adapter_config.json").write_text(json.dumps(document))
    (adapter / "adapter_model.safetensors").write_bytes(_safetensors(header, body, 0, cut))
    try:
        config, shapes = read_adapter(adapter, values=values)
        assert _read_adapter(adapter) == (config, shapes)
    except (AdapterFileError, NonFiniteError):
        pass
    with pytest.raises(VerificationInputError):  # never past the inputs: there is no reference and no base model here
        verify_adapter(adapter, str(scratch / "no-base-model"))


def test_a_consistent_adapter_passes_and_each_contradiction_is_named(scratch):
    import torch
    from safetensors.torch import save_file

    adapter = scratch / "consistent"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({**GOOD_CONFIG, "rank_pattern": {"k_proj": 4}}))
    tensors = {
        KEY_A: torch.ones(2, 4),
        KEY_B: torch.ones(4, 2),
        KEY_A.replace("q_proj", "k_proj"): torch.ones(4, 4),
        KEY_B.replace("q_proj", "k_proj"): torch.ones(4, 4),
    }
    save_file(tensors, str(adapter / "adapter_model.safetensors"))
    config, shapes = read_adapter(adapter, values=True)
    assert config["r"] == 2 and shapes[KEY_A] == (2, 4)

    cases = {
        "lora_A has shape [3, 4], expected rank 2": {KEY_A: torch.ones(3, 4), KEY_B: torch.ones(4, 2)},
        "lora_A has rank 2 but lora_B has rank 3": {KEY_A: torch.ones(2, 4), KEY_B: torch.ones(4, 3)},
        "lora_magnitude_vector is present but use_dora is false": {
            KEY_A: torch.ones(2, 4),
            KEY_B: torch.ones(4, 2),
            KEY_A.replace("lora_A.weight", "lora_magnitude_vector"): torch.ones(4),
        },
        "(1 NaN, 1 Inf)": {
            KEY_A: torch.tensor([[float("nan"), float("inf"), 0, 0], [0, 0, 0, 0]]),
            KEY_B: torch.ones(4, 2),
        },
    }
    for message, tensors in cases.items():
        save_file(tensors, str(adapter / "adapter_model.safetensors"))
        with pytest.raises(ExportError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
            read_adapter(adapter, values=True)
    read_adapter(adapter, values=True, allow_nonfinite=True)  # NaN/Inf allowed on request


def test_nonfinite_names_nan_and_inf_and_not_finite_values_whose_sum_overflows():
    tensors = {
        "finite": torch.randn(4, 4),
        "nan": torch.tensor([1.0, float("nan"), 2.0]),
        "inf": torch.tensor([float("inf"), 1.0, float("-inf")]),
        "huge": torch.full((4,), 3e38),  # finite values; their float32 sum is inf
        "half_huge": torch.full((8,), 6e4, dtype=torch.float16),
        "bf16_inf": torch.tensor([float("-inf")], dtype=torch.bfloat16),
        "int": torch.arange(3),
    }
    assert nonfinite(tensors.items()) == ["nan (1 NaN, 0 Inf)", "inf (0 NaN, 2 Inf)", "bf16_inf (0 NaN, 1 Inf)"]


@pytest.mark.parametrize("batch_bytes", [64, 1 << 20], ids=["small_batches", "one_batch"])
def test_nonfinite_in_batches_names_exactly_the_tensors_an_elementwise_check_finds(monkeypatch, batch_bytes):
    """The batched check (consecutive tensors of one dtype concatenated) names the same tensors, in order, as
    torch.isfinite on each tensor alone, whatever the batch size and wherever the bad values sit."""
    import megatron_peft_export.io.peft_dir as af

    monkeypatch.setattr(af, "_FINITE_BATCH_BYTES", batch_bytes)
    g = torch.Generator().manual_seed(4)
    tensors = []
    for i in range(300):
        dtype = (torch.float32, torch.float32, torch.bfloat16, torch.int64)[i % 4]
        t = torch.randn(3, 5, generator=g).to(dtype) if dtype != torch.int64 else torch.arange(6)
        if i in (9, 148, 149, 297):
            t.view(-1)[i % t.numel()] = float("nan") if i % 2 else float("inf")
        if i == 42:
            t.fill_(3e38)  # finite values whose sum overflows
        tensors.append((f"t{i}", t))
    expected = [key for key, t in tensors if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    assert [item.split(" ")[0] for item in af.nonfinite(iter(tensors))] == expected == ["t9", "t148", "t149", "t297"]


def test_nonfinite_over_an_exports_payload_names_exactly_the_bad_tensors_without_copying(monkeypatch):
    """Tensors laid out back to back by safetensors_out.allocate (an export's output) are checked through views of
    their buffer: no concatenation, and the same tensors named, in the order given, as isfinite on each alone."""
    import megatron_peft_export.io.peft_dir as af
    from megatron_peft_export.io import safetensors_out

    entries = {
        f"t{i}": ((torch.float32, torch.bfloat16, torch.float16, torch.float32)[i // 100], (2, 3 + i % 4))
        for i in range(400)
    }
    entries["ints"] = (torch.int64, (5,))
    tensors = safetensors_out.allocate(entries)
    g = torch.Generator().manual_seed(5)
    for t in tensors.values():
        t.copy_(torch.randn(t.shape, generator=g).to(t.dtype) if t.is_floating_point() else torch.arange(t.numel()))
    for i, value in ((3, float("nan")), (200, float("inf")), (201, float("-inf")), (399, float("nan"))):
        tensors[f"t{i}"].view(-1)[1] = value
    tensors["t7"].fill_(3e38)  # finite values whose float32 sum overflows
    monkeypatch.setattr(af, "_FINITE_BATCH_BYTES", 64)

    def no_cat(*args, **kwargs):
        raise AssertionError("tensors lying back to back were concatenated")

    monkeypatch.setattr(af.torch, "cat", no_cat)
    shuffled = list(tensors.items())[::-1]
    expected = [key for key, t in shuffled if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    assert [item.split(" ")[0] for item in af.nonfinite(shuffled)] == expected == ["t399", "t201", "t200", "t3"]


@pytest.mark.parametrize(
    "change, words",
    [
        ({"alpha_pattern": {"(.*a){20}": 2}}, "more than 3 unbounded repeats"),  # twenty `.*`: peft hung on it
        ({"rank_pattern": {"(a|aa){30}": 2}}, "an alternation repeated 30 times"),  # 2^30 ways: peft hung on it
        ({"target_modules": "(?:.*q){12}"}, "more than 3 unbounded repeats"),
        ({"exclude_modules": "(a+)+$"}, "exclude_modules: pattern"),  # peft fullmatches it against every module
        ({"exclude_modules": 5}, "exclude_modules: expected"),
        ({"modules_to_save": ["(a+)+"]}, "modules_to_save: pattern"),  # peft puts it inside rf"(^|.*\.){m}($|\..*)"
        ({"modules_to_save": [".*x.*"]}, "more than 1 unbounded repeats"),
        ({"modules_to_save": "lm_head"}, None),
        ({"modules_to_save": [["lm_head"]]}, "modules_to_save: expected"),
        ({"layers_pattern": "(l+)+", "layers_to_transform": [0]}, "layers_pattern: pattern"),
        ({"layers_pattern": ["layers", "h"], "layers_to_transform": [0, 1]}, None),
        ({"layers_to_transform": "0"}, "layers_to_transform: expected"),
        ({"layers_to_transform": [[0]]}, "layers_to_transform: expected"),
        ({"layers_to_transform": [True]}, "layers_to_transform: expected"),
    ],
)
def test_fields_peft_turns_into_regular_expressions_are_checked(tmp_path, change, words):
    """Each of these hangs peft's backtracking matcher (verify loads the adapter with peft) or is a wrong type."""
    import time

    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps({**GOOD_CONFIG, **change}))
    start = time.process_time()
    if words is None:
        assert read_config(path)["peft_type"] == "LORA"
        return
    with pytest.raises(AdapterFileError, match=re.escape(words)):
        read_config(path)
    assert time.process_time() - start < 5


def test_check_finite_of_a_payload_checks_its_buffer_and_names_the_bad_tensors():
    """A Payload (an export's tensors) passes through one check per dtype's part of its buffer, making no views; a
    bad value is named as the per-tensor check names it."""
    from megatron_peft_export.errors import NonFiniteError
    from megatron_peft_export.io import safetensors_out
    from megatron_peft_export.io.peft_dir import check_finite

    entries = {f"t{i}": ((torch.float32, torch.bfloat16)[i % 2], (3, 1 + i % 3)) for i in range(50)}
    entries["ints"] = (torch.int64, (4,))
    payload = safetensors_out.allocate(entries)
    payload.buffer()[:] = bytes(len(payload.buffer()))
    check_finite(payload)
    assert not payload._views
    payload["t17"][1, 0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"1 adapter tensor\(s\) hold NaN or Inf values: t17 \(1 NaN, 0 Inf\)"):
        check_finite(payload)
    check_finite(payload, allow=True)


_BIG = torch.full((64,), 3e38)
_INF, _NAN = float("inf"), float("nan")


@pytest.mark.parametrize(
    "tensors, named",
    [
        ({"a": _BIG, "b": torch.ones(3)}, []),  # the float32 sum overflows, every value is finite
        ({"a": _BIG.bfloat16(), "b": torch.ones(3, dtype=torch.bfloat16)}, []),
        ({"a": torch.full((4,), 1.7e308, dtype=torch.float64)}, []),
        ({"a": torch.tensor([-0.0, 1e-45, -1e-45]), "h": torch.tensor([6e-8, -0.0], dtype=torch.float16)}, []),
        ({"a": torch.ones(5), "z": torch.tensor([1.0, _INF], dtype=torch.bfloat16)}, ["z"]),
        ({"a": torch.ones(5), "z": torch.tensor([1.0, -_INF], dtype=torch.float16)}, ["z"]),
        ({"x": torch.tensor([_INF]), "y": torch.tensor([-_INF])}, ["x", "y"]),  # a sum of inf and -inf is NaN
        ({"a": _BIG, "n": torch.tensor([_NAN])}, ["n"]),  # NaN behind an overflowing part
        ({"a": _BIG, "n": torch.tensor([_INF, 1.0])}, ["n"]),
        ({"i": torch.arange(4), "n": torch.tensor([_NAN], dtype=torch.float16)}, ["n"]),
        ({**{f"t{i}": torch.ones(1000) for i in range(50)}, "t50": torch.tensor([1.0, _NAN])}, ["t50"]),
    ],
    ids=lambda v: "" if isinstance(v, list) else None,
)
def test_check_finite_of_a_payload_refuses_and_names_exactly_what_isfinite_finds(tensors, named):
    """An export's payload (one sum per dtype) is refused, naming the tensors, exactly when one of them holds NaN or
    Inf: an overflowing sum of finite values, -0.0 and denormals pass; bf16 and fp16 infinities are named. The same
    answer as for a plain dict of the same tensors."""
    from megatron_peft_export.io import safetensors_out
    from megatron_peft_export.io.peft_dir import check_finite

    payload = safetensors_out.allocate({k: (t.dtype, tuple(t.shape)) for k, t in tensors.items()})
    for key, t in tensors.items():
        payload[key].copy_(t)
    assert named == [k for k, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    for given_ in (payload, dict(tensors)):
        if not named:
            check_finite(given_)
            continue
        with pytest.raises(NonFiniteError) as refused:
            check_finite(given_)
        assert re.findall(r"(\S+) \(\d+ NaN, \d+ Inf\)", str(refused.value)) == named
        check_finite(given_, allow=True)
