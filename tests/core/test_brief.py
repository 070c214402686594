"""brief: a bounded description of any value a hostile file can make (tests/support/hostile_pickles.py)."""

import pickle

from megatron_peft_export.core.brief import brief
from tests.support import hostile_pickles as hp


def test_plain_values_read_as_their_repr():
    for value in [1, -2.5, None, True, "a\nb", b"x", (1,), ("a", 2), [1, [2, 3]], {"k": [1]}, set(), frozenset()]:
        assert brief(value, 200) == repr(value)


def test_what_repr_cannot_finish_is_described_in_bounded_time():
    shared = pickle.loads(pickle.dumps(hp.shared_lists()))  # 32^12 items to a repr
    assert brief(shared, 40) == "[[[<list of 32>, <list of 32>, <list ..."
    assert brief(1 << 40000) == "<an integer of 40001 bits>"
    deep: list = []
    for _ in range(100_000):
        deep = [deep]
    assert brief(deep) == "[[[<list of 1>]]]"
    assert brief("x" * 10**6, 1000) == repr("x" * 60) + "..."
    assert brief(object()) == "<object>"
