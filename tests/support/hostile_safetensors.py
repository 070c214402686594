"""Crafted safetensors files whose header lies about the data or attacks the parser, each a few bytes to a few MB.

`raw(header_text, body, length=None)` is the file: the 8-byte little-endian length (the header's own unless
`length` is given), the header text, the body. `ATTACKS` names each crafted file and the words its refusal must
carry."""

from __future__ import annotations

import struct

A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
BODY = struct.pack("<16f", *range(16))


def raw(header_text: str | bytes, body: bytes = BODY, length: int | None = None) -> bytes:
    data = header_text.encode() if isinstance(header_text, str) else header_text
    return struct.pack("<Q", len(data) if length is None else length) + data + body


def entry(dtype: str = "F32", shape: object = (2, 4), offsets: object = (0, 32)) -> str:
    def text(value):
        return "[" + ",".join(str(v) for v in value) + "]" if isinstance(value, tuple) else str(value)

    return f'{{"dtype":"{dtype}","shape":{text(shape)},"data_offsets":{text(offsets)}}}'


GOOD_B = entry("F32", (4, 2), (32, 64))


def two(a: str, b: str = GOOD_B, extra: str = "") -> str:
    return f'{{{extra}"{A}":{a},"{B}":{b}}}'


GOOD = two(entry())

ATTACKS: dict[str, tuple[bytes, str]] = {
    "shorter than the length": (b"\x10\x00\x00", "shorter than the 8-byte header length"),
    "length 2^63": (raw(GOOD, length=1 << 63), "the header claims 9223372036854775808 bytes"),
    "length 2^64-1": (raw(GOOD, length=(1 << 64) - 1), "the header claims"),
    "length past the file": (raw(GOOD, length=len(GOOD) + 65), "the header claims"),
    "length 0": (raw(GOOD, length=0), "not a JSON object"),
    "lists nested 100000 deep": (raw('{"x":' + "[" * 100_000 + "]" * 100_000 + "}"), "a list holds something"),
    "objects nested 100000 deep": (raw('{"x":' + '{"a":' * 100_000 + "1" + "}" * 100_001), "objects and"),
    "objects nested 1150 deep": (raw('{"x":' + '{"a":' * 1150 + "1" + "}" * 1151), "nested too deeply"),
    "a 20 MB key": (raw('{"' + "k" * 20_000_000 + '":1}', b""), "is not an object with dtype"),
    "a key twice": (raw(two(entry(), extra=f'"{A}":{entry("F16", (2, 4), (0, 16))},')), "appears twice"),
    "a field twice": (
        raw(two('{"dtype":"F32","shape":[2,4],"shape":[8],"data_offsets":[0,32]}')),
        "'shape' appears twice",
    ),
    "a list as the header": (raw("[1,2]"), "not a JSON object"),
    "a number as a tensor": (raw(two("5")), "is not an object with dtype"),
    "no data_offsets": (raw(two('{"dtype":"F32","shape":[2,4]}')), "is not an object with dtype"),
    "__metadata__ a number": (raw(two(entry(), extra='"__metadata__":{"format":1},')), "__metadata__ is not"),
    "__metadata__ a list": (raw(two(entry(), extra='"__metadata__":["pt"],')), "a list holds something other"),
    "__metadata__ a list of numbers": (raw(two(entry(), extra='"__metadata__":[1],')), "__metadata__ is not"),
    "NaN": (raw(two(entry(shape="[NaN]"))), "a list holds something other than integers"),
    "NaN as a field": (raw(two(entry().replace('"F32"', "NaN"))), "NaN is not valid JSON"),
    # an unclosed text of escaped quotes: a text pattern that must find the closing quote rescans the rest from
    # every later quote (quadratic: hours for this 2 MB header)
    "an unclosed text of escaped quotes": (raw('{"x":"' + '\\"' * 1_000_000), "Unterminated string"),
    "quotes and backslashes": (raw('{"x":' + '"\\' * 1_000_000), "Unterminated string"),
    "a list of texts": (raw('{"x":[' + '"ab",' * 2_000_000 + '"ab"]}'), "a list holds something other than"),
    "objects": (raw('{"x":{' + '"a":{},' * 400_000 + '"a":{}}}'), "objects and"),
    "texts": (raw('{"x":{' + '"a":"",' * 400_000 + '"a":""}}'), "texts in"),
    "not UTF-8": (raw(b'{"\xff":1}'), "header: 'utf-8' codec can't decode"),
    "unknown dtype": (raw(two(entry("F7"))), "has dtype 'F7'"),
    "dtype a number": (raw(two(entry().replace('"F32"', "4"))), "has dtype '4'"),
    "negative dim": (raw(two(entry(shape=(-2, -4)))), "has shape [-2, -4]"),
    "float dim": (raw(two(entry(shape=(2.0, 4)))), "a list holds something other than integers"),
    "bool dim": (raw(two(entry(shape="[true,8]"))), "a list holds something other than integers"),
    "dim 2^64": (raw(two(entry(shape=(1 << 64, 0)))), "has shape"),
    "65 dims": (raw(two(entry(shape=(1,) * 65))), "expected at most 64"),
    "product overflow": (raw(two(entry(shape=(1 << 62, 1 << 62, 0)))), "multiply past 2^63"),
    "bytes wrap to 32 in 64 bits": (raw(two(entry(shape=((1 << 62) + 8,)))), "needs 18446744073709551648 bytes"),
    "shape against offsets": (raw(two(entry(shape=(2, 2)))), "needs 16 bytes, its data_offsets [0, 32] span 32"),
    "offsets reversed": (raw(two(entry(offsets=(32, 0)))), "span -32"),
    "negative offset": (raw(two(entry(offsets=(-32, 0)))), "has data_offsets [-32, 0]"),
    "three offsets": (raw(two(entry(offsets=(0, 32, 64)))), "expected two integers"),
    "offsets out of range": (
        raw(two(entry(offsets=(1 << 40, (1 << 40) + 32)), entry("F32", (4, 2), (0, 32)))),
        "starts at data byte 1099511627776",
    ),
    "overlap": (raw(two(entry(), entry("F32", (4, 2), (0, 32)))), "starts at data byte 0, expected 32"),
    "gap": (raw(two(entry(), entry("F32", (4, 2), (36, 68))), BODY + b"\0" * 4), "starts at data byte 36"),
    "data past the tensors": (raw(GOOD, BODY + b"\0" * 8), "the tensors end at file byte"),
    "data cut": (raw(GOOD, BODY[:40]), "the tensors end at file byte"),
}
"""name -> (file, words of its refusal)."""
