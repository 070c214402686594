"""`distributed.gather_held`: the receiving rank gets every rank's object, and an object it holds under the same key
is not sent again (the sender passes an object that cannot be pickled, so sending it would fail)."""

import pytest

from tests.support.multiprocess import run_ranks

pytestmark = pytest.mark.timeout(120)


class _Unsendable:
    def __reduce__(self):
        raise AssertionError("sent, though the receiver holds this key")


def _rounds(rank, world):
    import torch.distributed as dist

    from megatron_peft_export import distributed as coll

    group = dist.group.WORLD
    rounds = [  # (key, object) per round on the senders
        (("walk", 1), f"report 1 of rank {rank}"),
        (("walk", 1), _Unsendable()),  # held: the key alone goes
        (("walk", 2), f"report 2 of rank {rank}"),  # a new key: sent
        (None, f"unkeyed of rank {rank}"),  # no key: always sent
        (("walk", 1), _Unsendable()),  # still held
    ]
    got = []
    for key, obj in rounds:
        mine = f"writer's own, {key}"
        got.append(coll.gather_held(mine if rank == 0 else obj, key, 0, group))
    other = coll.new_gloo_group(None)  # another group holds nothing of the first's
    got.append(coll.gather_held(f"report 1 of rank {rank}" if rank else "own", ("walk", 1), 0, other))
    return got


def test_gather_held_sends_an_object_once_per_key():
    got, nothing = run_ranks(_rounds, 2)
    assert nothing == [None] * 6
    assert got == [
        ["writer's own, ('walk', 1)", "report 1 of rank 1"],
        ["writer's own, ('walk', 1)", "report 1 of rank 1"],
        ["writer's own, ('walk', 2)", "report 2 of rank 1"],
        ["writer's own, None", "unkeyed of rank 1"],
        ["writer's own, ('walk', 1)", "report 1 of rank 1"],
        ["own", "report 1 of rank 1"],
    ]
