"""A key's stored items, dropped once the reader keeps them as arrays (`StoredItems.forget`), read again the same."""

import pickle

import pytest
from torch.distributed.checkpoint.metadata import BytesStorageMetadata

from megatron_peft_export.offline import dcp_metadata
from megatron_peft_export.offline.dcp_metadata import parse_metadata
from tests.offline.test_dcp_metadata import metadata  # noqa: F401  (the fixture: a file torch writes)


@pytest.mark.parametrize("c_reader", [True, False], ids=["c-reader", "python-path"])
def test_forgotten_items_are_read_again_as_torch_wrote_them(metadata, c_reader, monkeypatch):  # noqa: F811
    if not c_reader:
        monkeypatch.setattr(dcp_metadata, "_read_compact", lambda data: None)
    parsed = parse_metadata(pickle.dumps(metadata))
    items = parsed.items
    stored = {
        (index.fqn, None if index.offset is None else tuple(index.offset)): (
            info.relative_path,
            info.offset,
            info.length,
        )
        for index, info in metadata.storage_data.items()
    }
    keys = sorted(k for k, v in metadata.state_dict_metadata.items() if not isinstance(v, BytesStorageMetadata))
    first = {key: (items[key].relative_path, items[key].offset, items[key].length) for key in stored}
    items.forget(keys)
    assert not any(key in items._keys._done for key in keys)  # dropped, not kept twice
    again = {key: (items.get(key).relative_path, items.get(key).offset, items.get(key).length) for key in stored}
    assert first == again == stored


@pytest.mark.parametrize("c_reader", [True, False], ids=["c-reader", "python-path"])
def test_get_many_is_get_of_each(metadata, c_reader, monkeypatch):  # noqa: F811
    """`StoredItems.get_many` (the reader's look-up of a key's chunks) answers as `get` does per offsets: items, None
    for offsets or keys not stored, before and after the key's items are converted and after they are forgotten."""
    if not c_reader:
        monkeypatch.setattr(dcp_metadata, "_read_compact", lambda data: None)
    items = parse_metadata(pickle.dumps(metadata)).items
    asked: dict[str, list] = {}
    for fqn, offsets in items:
        asked.setdefault(fqn, []).append(offsets)
    asked = {fqn: [*offsets, (999,) * 2, None] for fqn, offsets in asked.items()}
    asked["not.a.key"] = [(0, 0), None]
    for when in ("first read", "converted", "forgotten"):
        if when == "forgotten":
            items.forget(list(asked))
        for fqn, offsets in asked.items():
            assert items.get_many(fqn, offsets) == [items.get((fqn, o)) for o in offsets], (when, fqn)
    assert any(item is not None for fqn, offsets in asked.items() for item in items.get_many(fqn, offsets))
