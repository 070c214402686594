"""The bounded pattern matcher equals Python's `re` (peft's rule) on random patterns and names, refuses what it
cannot match or what would make peft's own engine backtrack, and stops at its work budget: counted steps, not time."""

import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from megatron_peft_export.core import patterns
from megatron_peft_export.core.patterns import PatternSet, check_pattern, fullmatch
from megatron_peft_export.errors import AdapterFileError

FUZZ = settings(
    max_examples=200, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck)
)

atoms = st.sampled_from(["a", "b", "_", r"\.", ".", "[ab]", "[^a]", r"\d", r"\w", "1", "[a-c.]"])


def _regex(depth=3):
    if depth == 0:
        return atoms
    inner = _regex(depth - 1)
    group = st.builds(
        lambda parts, alt: "(" + "|".join(parts) + ")" if alt else "(?:" + "".join(parts) + ")",
        st.lists(inner, min_size=1, max_size=3),
        st.booleans(),
    )
    quantified = st.builds(
        lambda x, q: x + q,
        st.one_of(atoms, group),
        st.sampled_from(["", "", "?", "*", "+", "{0,2}", "{2}", "*?", "+?"]),
    )
    return st.builds(
        lambda parts, head, tail: head + "".join(parts) + tail,
        st.lists(quantified, min_size=1, max_size=3),
        st.sampled_from(["", "", "^", r"\A"]),
        st.sampled_from(["", "", "$", r"\Z"]),
    )


regexes = _regex()
names = st.text(alphabet="ab._1\n", max_size=10)


def _automaton_match(regex, name, full=False):
    matcher = patterns._Matcher(patterns._Automaton([regex], patterns._Budget()), patterns._Budget())
    return matcher.run(name, full=full) == 0


@FUZZ
@given(regexes, st.lists(names, min_size=1, max_size=5))
def test_the_automaton_matches_like_re_match_and_fullmatch(regex, samples):
    key = rf"(.*\.)?({regex})$"
    for name in samples:
        assert _automaton_match(key, name) == (re.match(key, name) is not None), (key, name)
        assert _automaton_match(regex, name, full=True) == (re.fullmatch(regex, name) is not None), (regex, name)


def _first(keys, name):
    return next((i for i, k in enumerate(keys) if re.match(rf"(.*\.)?({k})$", name)), None)


fixed_keys = st.builds(
    "".join, st.lists(st.sampled_from(["a", "b", ".", r"\.", "[ab]", "1", "_"]), min_size=1, max_size=5)
)


@FUZZ
@given(
    st.lists(st.one_of(fixed_keys, regexes), min_size=1, max_size=6, unique=True),
    st.lists(names, min_size=1, max_size=6),
)
def test_a_pattern_set_finds_peft_s_first_matching_key(keys, samples):
    accepted = []
    for key in keys:
        try:
            check_pattern(key, "key")
            accepted.append(key)
        except AdapterFileError:
            pass
    found = PatternSet({k: i for i, k in enumerate(accepted)})
    for name in samples:
        assert found.get(name, None) == _first(accepted, name), (accepted, name)


def test_module_names_and_moe_scale_lookups():
    """An exporter's rank_pattern on a 48-layer, 128-expert adapter: full module names as keys, 18624 modules."""
    modules = [
        f"model.layers.{i}.mlp.experts.{e}.{p}"
        for i in range(48)
        for e in range(128)
        for p in ("gate_proj", "up_proj", "down_proj")
    ]
    attention = [f"model.layers.{i}.self_attn.{p}" for i in range(48) for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
    found = PatternSet({m: 16 for m in attention})
    assert [found.get(m, 8) for m in modules + attention] == [8] * len(modules) + [16] * len(attention)
    regex = PatternSet({r"layers\.\d+\.self_attn\..*": 16, r".*experts\.1\d\..*": 4})
    values = [regex.get(m, 8) for m in modules + attention]
    assert values.count(16) == len(attention) and values.count(4) == 48 * 10 * 3


@pytest.mark.parametrize(
    "key,reason",
    [
        ("(.*)*q_proj_x", "a repeat inside a repeat"),
        ("(a|aa)+b", "an alternation inside a repeat"),
        (".*a.*b.*c.*d", "more than 3 unbounded repeats"),
        (r"(a)\1", "not supported"),
        ("(?=a)b", "not supported"),
        ("(?i:q)_proj", "inline flags"),
        (r"\bq", "not supported"),
        ("a{1,5000}", "more than 4096 states"),
        ("x" * 300, "at most 256"),
        ("(", "not a valid regular expression"),
    ],
)
def test_patterns_out_of_bounds_are_refused_with_the_reason(key, reason):
    with pytest.raises(AdapterFileError, match=re.escape(reason)):
        PatternSet({key: 1})


def test_matching_stops_at_its_work_budget(monkeypatch):
    """Thousands of regex keys against thousands of names: refused once the counted work passes the budget."""
    keys = {f"(a|b)c{i}x.*": 1 for i in range(2000)}
    found = PatternSet(keys)
    with pytest.raises(AdapterFileError, match="more than 5000000 steps"):
        for i in range(5000):
            found.get(f"model.layers.{i}.ab.c1999x", None)
    long_name = PatternSet({"[ab]+x": 1})
    with pytest.raises(AdapterFileError, match="steps"):
        for i in range(5000):
            long_name.get("ab" * 2000 + str(i), None)


def test_fullmatch_is_peft_s_rule_for_a_string_target_modules():
    names = ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.up_proj", "q_proj"]
    assert fullmatch(r".*\.(q_proj|up_proj)", names) == names[:2]
    with pytest.raises(AdapterFileError):
        fullmatch("(a+)+", names)
