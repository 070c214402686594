"""The hook's change check (`host_snapshot._Walk.current`) against every lookup ModelOpt's `probes` lists: each one
(a lookup listed twice is checked once) changed alone makes the cached walk stale, and restoring it makes it current
again; so do a changed rank, scale or enable, a weight's data replaced, and a parameter's shape or dtype changed."""

import pytest

from tests.support.multiprocess import run_ranks

pytestmark = pytest.mark.timeout(300)


def _every_lookup_run(rank, world):
    import torch

    from megatron_peft_export import distributed as coll
    from megatron_peft_export import host_snapshot as hs
    from megatron_peft_export.dialects import modelopt
    from megatron_peft_export.export import ExportOptions
    from tests.support.hook_loop import lora_model

    model = lora_model(world)
    layout = coll.RankLayout.from_megatron()
    key, registered = hs._key(model, layout), hs._modules_registered()
    walk = hs._walk_model(model, key, registered, layout, ExportOptions(), None)
    carriers = [m for m in model.modules() if "_lora_adapters" in m.__dict__]
    listed = [probe for m in carriers for probe in modelopt.probes(m, "default")]
    lookups = {(id(table), k): (table, k) for table, k, _, _ in listed}
    results = {"carriers": len(carriers), "listed": len(listed), "lookups": len(lookups), "current": []}
    results["current"].append(walk.current(key, registered))
    missed = []
    for table, k in lookups.values():
        had, old = k in table, table.get(k)
        table[k] = object() if old is None or not isinstance(old, (bool, int, float, str)) else [old]
        stale = not walk.current(key, registered)
        if had:
            table[k] = old
        else:
            del table[k]
        if not stale or not walk.current(key, registered):
            missed.append(k)
    results["missed"] = missed

    entry = carriers[0].__dict__["_lora_adapters"]["default"]
    weight = carriers[1].lora_b_default.weight
    changes = {
        "rank": lambda: entry.__setitem__("rank", entry["rank"] + 1),
        "scale": lambda: entry.__setitem__("scale", entry["scale"] * 2),
        "enable": lambda: entry.__setitem__("enable", False),
        "data": lambda: setattr(weight, "data", weight.data.clone()),
        "shape": lambda: setattr(weight, "data", weight.data.reshape(-1)),
        "dtype": lambda: setattr(weight, "data", weight.data.double()),
    }
    for name, change in changes.items():
        saved_entry, saved_data = dict(entry), weight.data
        change()
        results[name] = not walk.current(key, registered)
        entry.update(saved_entry)
        weight.data = saved_data
        results["current"].append(walk.current(key, registered))
    results["current"] = all(results["current"]) and torch.is_tensor(weight)
    return results


def test_every_lookup_the_probes_list_is_checked():
    (results,) = run_ranks(_every_lookup_run, 1)
    assert results.pop("missed") == []
    assert results.pop("current") is True
    carriers, listed, lookups = results.pop("carriers"), results.pop("listed"), results.pop("lookups")
    assert carriers > 0 and listed > lookups > 20 * carriers, (carriers, listed, lookups)
    assert results == {name: True for name in ("rank", "scale", "enable", "data", "shape", "dtype")}, results
