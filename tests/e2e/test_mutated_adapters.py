"""Property-based (hypothesis, fixed seed, bounded): a real adapter directory (a TP2 export with its verification
reference)
mutated by up to three edits (truncations, bit flips, swapped files, links to a secret or a device, deleted files, a
directory in place of a file, wrong dtypes and shapes in the safetensors header, bogus config fields, stray files), then
run through `verify`, `push` (to a fake Hub) and `load_hf_adapter`. For every example:

- verify: exit 0 or 1 with a complete verification.json (`passed` agreeing with the status), or exit 2 with one `error:`
  line and no result; never a traceback; no temporary file left;
- push: exit 0 with one commit holding exactly the directory's regular files, or exit 2 with one `error:` line and no
  request that commits; the secret a link points to never reaches the Hub; no staging directory left;
- load_hf_adapter: loads, or raises an ExportError before changing any parameter;
- the adapter directory is unchanged (every entry hashed, links by target, without following them).

Everything runs in one forked process (the model for the import, the fake Hub, the CLI in-process)."""

import os
import secrets

import pytest

from tests.e2e.test_verify import exported  # noqa: F401  (the module fixture: a TP2 export with its reference, and the base model)
from tests.support.multiprocess import run_ranks

pytestmark = pytest.mark.timeout(900)
EXAMPLES = 60
FILES = ["adapter_config.json", "adapter_model.safetensors", "README.md", "verification/reference.safetensors"]
CONFIG_FIELDS = [
    "r",
    "lora_alpha",
    "target_modules",
    "target_parameters",
    "rank_pattern",
    "alpha_pattern",
    "use_dora",
    "use_rslora",
    "peft_type",
    "base_model_name_or_path",
    "task_type",
    "layers_to_transform",
    "modules_to_save",
    "bias",
    "fan_in_fan_out",
    "lora_dropout",
]


def _strategies():
    from hypothesis import strategies as st

    values = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-3, 70),
        st.floats(allow_nan=False, allow_infinity=False, width=32),
        st.text(max_size=8),
        st.sampled_from(["q_proj", ".*", "all-linear", "LORA", "(a+)+$", "CAUSAL_LM", "none", "all"]),
        st.lists(st.sampled_from(["q_proj", "v_proj", "down_proj", "nothing", "lm_head"]), max_size=3),
        st.dictionaries(st.sampled_from(["q_proj", "layers.0.mlp.up_proj", "(x+)+y"]), st.integers(0, 16), max_size=2),
    )
    files = st.sampled_from(FILES)
    mutation = st.one_of(
        st.tuples(st.just("truncate"), files, st.floats(0, 1)),
        st.tuples(st.just("flip"), files, st.floats(0, 1), st.integers(0, 7)),
        st.tuples(st.just("swap"), files, files),
        st.tuples(st.just("link"), files, st.sampled_from(["secret", "/dev/null", *FILES])),
        st.tuples(st.just("delete"), files),
        st.tuples(st.just("directory"), files),
        st.tuples(
            st.just("dtype"),
            st.integers(0, 1000),
            st.sampled_from(["F16", "BF16", "F64", "I32", "I64", "U8", "BOOL", "F8_E4M3", "X"]),
        ),
        st.tuples(st.just("shape"), st.integers(0, 1000), st.lists(st.integers(0, 64), max_size=3)),
        st.tuples(st.just("config"), st.sampled_from(CONFIG_FIELDS), values),
        st.tuples(
            st.just("extra"),
            st.sampled_from(["notes.txt", "math/adapter_config.json", "sub/x.bin"]),
            st.binary(max_size=64),
        ),
    )
    return st.lists(mutation, min_size=1, max_size=3)


def _mutate(work, mutation, secret_path):
    """Apply one edit to the adapter directory `work`; an edit that does not apply (its file is gone) does nothing."""
    import json
    import shutil
    import struct

    kind, *args = mutation
    path = work / args[0] if kind not in ("dtype", "shape") else work / "adapter_model.safetensors"
    regular = path.is_file() and not path.is_symlink()
    if kind == "truncate" and regular:
        data = path.read_bytes()
        path.write_bytes(data[: int(len(data) * args[1])])
    elif kind == "flip" and regular and path.stat().st_size:
        data = bytearray(path.read_bytes())
        data[min(int(len(data) * args[1]), len(data) - 1)] ^= 1 << args[2]
        path.write_bytes(bytes(data))
    elif kind == "swap" and regular and (work / args[1]).is_file() and not (work / args[1]).is_symlink():
        other = work / args[1]
        a, b = path.read_bytes(), other.read_bytes()
        path.write_bytes(b)
        other.write_bytes(a)
    elif kind == "link" and os.path.lexists(path):
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
        target = args[1]
        path.symlink_to(
            secret_path
            if target == "secret"
            else target
            if target.startswith("/")
            else os.path.relpath(work / target, path.parent)
        )
    elif kind == "delete" and os.path.lexists(path):
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    elif kind == "directory" and os.path.lexists(path):
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
        path.mkdir()
    elif kind in ("dtype", "shape") and regular:
        data = path.read_bytes()
        try:
            (length,) = struct.unpack("<Q", data[:8])
            header = json.loads(data[8 : 8 + length])
            key = sorted(k for k in header if k != "__metadata__")[args[0] % (len(header) - 1)]
        except Exception:
            return
        header[key]["dtype" if kind == "dtype" else "shape"] = args[1]
        raw = json.dumps(header).encode()
        path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + length :])
    elif kind == "config" and regular:
        try:
            config = json.loads(path.read_text())
        except Exception:
            return
        if isinstance(config, dict):
            config[args[1]] = args[2]
            path.write_text(json.dumps(config))
    elif kind == "extra":
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(args[1])
        except OSError:
            pass


def _fuzz(rank, world, adapter, base, scratch, examples):
    import collections
    import contextlib
    import io
    import json
    import shutil
    import tempfile
    from pathlib import Path

    import huggingface_hub.constants
    import torch
    from hypothesis import HealthCheck, given, settings

    from megatron_peft_export import ExportError, load_hf_adapter
    from megatron_peft_export.cli import main
    from tests.e2e.test_outputs import tree
    from tests.support.fake_hub import FakeHub
    from tests.support.tiny_gpt import TinyGPTConfig, apply_modelopt_lora, build_gpt, init_parallel

    init_parallel(1)
    model = apply_modelopt_lora(build_gpt(TinyGPTConfig()))
    lora = {n: p for n, p in model.named_parameters() if "lora" in n}
    token = "hf_" + secrets.token_hex(16)
    os.environ["HF_TOKEN"] = token
    huggingface_hub.constants.HF_TOKEN_PATH = str(Path(scratch) / "no-stored-login")
    huggingface_hub.constants.HF_HUB_OFFLINE = False
    hub = FakeHub(token)
    huggingface_hub.constants.ENDPOINT = hub.endpoint
    secret = Path(scratch) / "secret"
    secret.write_text("hf_" + secrets.token_hex(16))
    work, out = Path(scratch) / "adapter", Path(scratch) / "out"
    seen = collections.Counter()

    def cli(argv):
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            status = main(argv)
        err = err.getvalue()
        assert "Traceback" not in err, err
        if status == 2:
            errors = [line for line in err.splitlines() if line.startswith("error: ")]
            assert len(errors) == 1 and err.endswith(errors[0] + "\n"), err
        return status

    @settings(
        max_examples=examples, derandomize=True, database=None, deadline=None, suppress_health_check=list(HealthCheck)
    )
    @given(_strategies())
    def prop(mutations):
        for path in (work, out):
            shutil.rmtree(path, ignore_errors=True)
        shutil.copytree(adapter, work, symlinks=True)
        (work / "verification.json").unlink()
        out.mkdir()
        for mutation in mutations:
            _mutate(work, mutation, secret)
        before, staged = tree(work), set(Path(tempfile.gettempdir()).glob("hf-adapter-push-*"))

        status = cli(
            ["verify", str(work), "--base-model", str(base), "--output", str(out / "verification.json"), "--quiet"]
        )
        seen["verify", status] += 1
        assert status in (0, 1, 2)
        if status == 2:
            assert list(out.iterdir()) == [], "no result, no temporary file"
        else:
            assert [p.name for p in out.iterdir()] == ["verification.json"]
            assert json.loads((out / "verification.json").read_text())["passed"] is (status == 0)

        commits = len(hub.commits)
        status = cli(["push", str(work), "--repo-id", "me/fuzz", "--endpoint", hub.endpoint, "--retries", "0"])
        seen["push", status] += 1
        assert status in (0, 2)
        assert len(hub.commits) == commits + (status == 0), "one commit, or none"
        if status == 0:
            files = hub.files("me/fuzz")
            local = sorted(
                str(p.relative_to(work))
                for p in work.rglob("*")
                if p.is_file()
                and not p.is_symlink()
                and (p.parent == work or (p.parent / "adapter_config.json").is_file())
                and "verification" not in p.relative_to(work).parts[:-1]
            )
            assert sorted(hub.commits[-1].paths) == local
            assert all(files[name] == (work / name).read_bytes() for name in local if name != "README.md")
        assert not any(
            secret.read_bytes() in data for r in hub.repos.values() for b in r.branches.values() for data in b.values()
        )
        assert set(Path(tempfile.gettempdir()).glob("hf-adapter-push-*")) == staged, "no staging directory left"

        values = {n: p.detach().clone() for n, p in lora.items()}
        try:
            load_hf_adapter(model, work)
            seen["import", "loaded"] += 1
        except ExportError:
            seen["import", "refused"] += 1
            assert all(torch.equal(values[n], p) for n, p in lora.items()), "a refused import changes no parameter"
        assert tree(work) == before, "the adapter directory is never changed"

    prop()
    hub.close()
    return dict(seen)


def test_mutated_adapters_are_verified_pushed_and_imported_or_refused_cleanly(exported, tmp_path):  # noqa: F811
    adapter, base = exported
    seen = run_ranks(_fuzz, 1, str(adapter), str(base), str(tmp_path), EXAMPLES, timeout=800)[0]
    print("outcomes:", sorted(seen.items()))
    for command in ("verify", "push"):  # the suite reaches both sides of every command (not only refusals)
        assert seen.get((command, 2), 0) > 0 and seen.get((command, 0), 0) + seen.get((command, 1), 0) > 0, seen
    assert seen.get(("import", "loaded"), 0) > 0 and seen.get(("import", "refused"), 0) > 0, seen
    assert sum(n for (command, _), n in seen.items() if command == "verify") == EXAMPLES
