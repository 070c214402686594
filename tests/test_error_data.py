"""Errors carry their data (expected, found, the option) across ranks: every rank raises the same type with the same
fields when one rank reports it (distributed.agree), so a caller on any rank can act on them."""

from tests.support.multiprocess import run_ranks


def _agree_on_rank_ones_error(rank, world_size):
    import torch.distributed as dist

    from megatron_peft_export import distributed as coll
    from megatron_peft_export.errors import OptionError

    mine = OptionError(option="dtype", expected="bf16", found="bf17", hint="fix it") if rank == 1 else None
    try:
        coll.agree(mine, dist.group.WORLD)
    except OptionError as exc:
        return str(exc), exc.option, exc.expected, exc.found, exc.hint
    return None


def test_every_rank_raises_the_reporting_ranks_error_with_its_data():
    results = run_ranks(_agree_on_rank_ones_error, 2)
    assert results == [("rank 1: dtype: expected bf16, found 'bf17'; fix it", "dtype", "bf16", "bf17", "fix it")] * 2
