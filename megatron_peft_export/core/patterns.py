"""Module-name patterns as peft reads them, matched at a bounded cost: the one matcher every command uses.

peft looks up `rank_pattern` / `alpha_pattern` with `re.match(rf"(.*\\.)?({key})$", module)` (the first key that
matches wins) and matches a string `target_modules` with `re.fullmatch`. Python's backtracking engine takes
exponential time on keys such as `(.*)*q_proj_x`, and polynomial but long on `.*.*.*x`; a config is input from
anyone. Here the same regular expressions run without backtracking:

- a key that is a fixed-width run of characters, dots and character classes (every module name, e.g.
  `model.layers.0.self_attn.q_proj`) can only match the one suffix of its width: keys are grouped by width and
  literal positions, so a lookup costs a few dict lookups per name whatever the number of keys;
- the other keys run together on one automaton built from Python's own parse of them (Thompson's construction),
  whose sets of states and transitions are cached as they are met (a lazy DFA): a name costs one dict lookup per
  character, and building a new set costs its size.

Semantics are `re`'s for the regular subset: no back-references, lookarounds, atomic groups, possessive repeats,
word boundaries or flags (a key with one is refused, as is a key longer than MAX_PATTERN_LENGTH or whose automaton
exceeds MAX_STATES). Keys on which peft's and vLLM's own backtracking engine would take exponential time (a repeat
or an alternation inside a repeat, more than MAX_UNBOUNDED_REPEATS unbounded repeats) are refused too: the adapter
could not be loaded there. Each PatternSet (and each `fullmatch` call) counts its work and stops at MAX_WORK units
(about a second), so no input makes a command spend long on patterns. Refusals are AdapterFileError: bad input.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Generic, TypeVar

from ..errors import AdapterFileError

try:
    from re import _constants as _c  # Python >= 3.11
    from re import _parser as _p
except ImportError:  # pragma: no cover
    import sre_constants as _c  # type: ignore[no-redef]
    import sre_parse as _p  # type: ignore[no-redef]

MAX_PATTERN_LENGTH = 256
MAX_UNBOUNDED_REPEATS = 3
MAX_STATES = 4096
"""Automaton states per key (a bounded repeat such as `a{1000}` expands into copies)."""
MAX_WORK = 5_000_000
"""Work one PatternSet (or one fullmatch call) may do, in units of roughly 0.1 microsecond of Python."""
V = TypeVar("V")
_NO_MATCH = 1 << 62
_MID = (False, False, False)
_CATEGORIES = {
    getattr(_c, f"CATEGORY_{name}"): re.compile(expr).fullmatch
    for name, expr in (
        ("DIGIT", r"\d"),
        ("NOT_DIGIT", r"\D"),
        ("SPACE", r"\s"),
        ("NOT_SPACE", r"\S"),
        ("WORD", r"\w"),
        ("NOT_WORD", r"\W"),
    )
}
_AT = {_c.AT_BEGINNING: 0, _c.AT_BEGINNING_STRING: 0, _c.AT_END: 1, _c.AT_END_STRING: 2}
"""`^` and `\\A` hold at the start; `$` at the end and before a final newline; `\\Z` at the end."""


class _Refused(ValueError):
    pass


class _Budget:
    def __init__(self) -> None:
        self.left = MAX_WORK

    def spend(self, units: int) -> None:
        self.left -= units
        if self.left < 0:
            raise _Refused(f"matching would take more than {MAX_WORK} steps")


def _char_test(op: Any, av: Any) -> Callable[[str], bool] | None:
    """A predicate for one character-consuming node (None for other nodes)."""
    if op is _c.LITERAL:
        return chr(av).__eq__
    if op is _c.NOT_LITERAL:
        return chr(av).__ne__
    if op is _c.ANY:
        return "\n".__ne__
    if op is not _c.IN:
        return None
    negate, tests = False, []
    for item_op, item in av:
        if item_op is _c.NEGATE:
            negate = True
        elif item_op is _c.LITERAL:
            tests.append(chr(item).__eq__)
        elif item_op is _c.RANGE:
            tests.append(lambda ch, lo=item[0], hi=item[1]: lo <= ord(ch) <= hi)
        elif item_op is _c.CATEGORY and item in _CATEGORIES:
            tests.append(lambda ch, f=_CATEGORIES[item]: f(ch) is not None)
        else:
            raise _Refused(f"character class item {item_op} is not supported")
    return lambda ch: any(t(ch) for t in tests) != negate


def _parse(pattern: str) -> list[tuple[Any, Any]]:
    try:
        parsed = _p.parse(pattern)
    except (re.error, RecursionError, OverflowError) as exc:
        raise _Refused(f"not a valid regular expression ({exc})") from None
    if parsed.state.flags & ~_c.SRE_FLAG_UNICODE:
        raise _Refused("inline flags such as (?i) are not supported")
    return list(parsed.data)


class _Automaton:
    """Thompson's construction of several regular expressions with one start: ("char", test, next),
    ("split", [next...]), ("at", which, next), ("match", index of the expression)."""

    def __init__(self, patterns: list[str], budget: _Budget) -> None:
        self.states: list[list[Any]] = []
        starts = []
        for index, pattern in enumerate(patterns):
            first = len(self.states)
            budget.spend(500)  # parsing
            starts.append(self._build(_parse(pattern), self._new(["match", index], first), 0, first))
            budget.spend(10 * (len(self.states) - first))
        self.states.append(["split", starts])
        self.start = len(self.states) - 1

    def _new(self, state: list[Any], first: int) -> int:
        if len(self.states) - first >= MAX_STATES:
            raise _Refused(f"its automaton would have more than {MAX_STATES} states")
        self.states.append(state)
        return len(self.states) - 1

    def _build(self, nodes: list[tuple[Any, Any]], nxt: int, depth: int, first: int) -> int:
        """The start state of `nodes` followed by state `nxt` (built back to front)."""
        if depth > 100:
            raise _Refused("nested too deeply")
        for op, av in reversed(nodes):
            test = _char_test(op, av)
            if test is not None:
                nxt = self._new(["char", test, nxt], first)
            elif op is _c.SUBPATTERN:
                if av[1] or av[2]:
                    raise _Refused("inline flags such as (?i:...) are not supported")
                nxt = self._build(list(av[3].data), nxt, depth + 1, first)
            elif op is _c.BRANCH:
                nxt = self._new(["split", [self._build(list(alt.data), nxt, depth + 1, first) for alt in av[1]]], first)
            elif op in (_c.MAX_REPEAT, _c.MIN_REPEAT):  # greedy or lazy: the same set of matches
                low, high, sub = av
                body = list(sub.data)
                if high == _c.MAXREPEAT:
                    loop = self._new(["split", []], first)
                    self.states[loop][1] = [self._build(body, loop, depth + 1, first), nxt]
                    nxt = loop
                else:
                    for _ in range(high - low):  # optional copies, each may stop here
                        nxt = self._new(["split", [self._build(body, nxt, depth + 1, first), nxt]], first)
                for _ in range(low):
                    nxt = self._build(body, nxt, depth + 1, first)
            elif op is _c.AT and av in _AT:
                nxt = self._new(["at", _AT[av], nxt], first)
            else:
                raise _Refused(
                    f"{str(op).lower()} is not supported (back-references, lookarounds, atomic groups, "
                    "possessive repeats, word boundaries)"
                )
        return nxt


class _Matcher:
    """re.match (or re.fullmatch) of every expression of an automaton at once; the sets of states met and their
    transitions are cached, so a name costs one dict lookup per character once its sets are known."""

    def __init__(self, automaton: _Automaton, budget: _Budget) -> None:
        self.a, self.budget = automaton, budget
        self.ids: dict[tuple[tuple[int, ...], int], int] = {}
        self.chars: list[tuple[int, ...]] = []  # set id -> its character-consuming states
        self.best: list[int] = []  # set id -> the smallest expression index whose match state it holds
        self.fast: list[dict[str, int]] = []  # set id -> {character: next set id} where no assertion holds
        self.closures: dict[tuple[frozenset[int], tuple[bool, bool, bool]], int] = {}

    def _closure(self, core: frozenset[int], flags: tuple[bool, bool, bool]) -> int:
        """The set reachable from `core` without consuming a character where (start, `$`, end) hold as `flags` say."""
        key = (core, flags)
        found = self.closures.get(key)
        if found is None:
            holds = (flags[0], flags[1] or flags[2], flags[2])
            states, seen, todo = self.a.states, set(core), list(core)
            while todo:
                state = states[todo.pop()]
                if state[0] == "split":
                    targets = state[1]
                elif state[0] == "at" and holds[state[1]]:
                    targets = (state[2],)
                else:
                    continue
                for n in targets:
                    if n not in seen:
                        seen.add(n)
                        todo.append(n)
            self.budget.spend(20 * len(seen) + 50)
            chars = tuple(sorted(s for s in seen if states[s][0] == "char"))
            best = min((states[s][1] for s in seen if states[s][0] == "match"), default=_NO_MATCH)
            found = self.ids.get((chars, best))
            if found is None:
                found = self.ids[(chars, best)] = len(self.chars)
                self.chars.append(chars)
                self.best.append(best)
                self.fast.append({})
            self.closures[key] = found
        return found

    def run(self, name: str, full: bool) -> int:
        """The smallest index of an expression that matches at the start of `name` (`full`: matches all of it)."""
        n = len(name)
        plain = n - 1 if name.endswith("\n") else n  # below this position only `^` could hold (and only at 0)
        self.budget.spend(2 * n + 30)
        ident = self._closure(frozenset([self.a.start]), (True, n == 1 and plain == 0, n == 0))
        best, fast, states = _NO_MATCH, self.fast, self.a.states
        for pos, ch in enumerate(name):
            if not full and self.best[ident] < best:
                best = self.best[ident]
            nxt = fast[ident].get(ch) if pos + 1 < plain else None
            if nxt is None:
                chars = self.chars[ident]
                self.budget.spend(10 * len(chars) + 20)
                core = frozenset(states[s][2] for s in chars if states[s][1](ch))
                flags = _MID if pos + 1 < plain else (False, pos + 1 == n - 1, pos + 1 == n)
                nxt = self._closure(core, flags)
                if flags is _MID:
                    fast[ident][ch] = nxt
            ident = nxt
            if not self.chars[ident]:  # nothing more can match
                if full:
                    return self.best[ident] if pos + 1 == n else _NO_MATCH
                return min(best, self.best[ident])
        return min(best, self.best[ident])


def _fixed(nodes: list[tuple[Any, Any]]) -> list[tuple[Any, Any, Callable[[str], bool]]] | None:
    """(op, value, test) per position when `nodes` are a fixed-width run of characters, dots and classes."""
    todo, tests = list(nodes), []
    while todo:
        op, av = todo.pop(0)
        if op is _c.SUBPATTERN and not av[1] and not av[2]:
            todo[:0] = list(av[3].data)
            continue
        try:
            test = _char_test(op, av)
        except _Refused:
            return None
        if test is None:
            return None
        tests.append((op, av, test))
    return tests


def _key_nodes(parsed: list[tuple[Any, Any]]) -> list[tuple[Any, Any]] | None:
    r"""The key's own nodes in the parse of `(.*\.)?(key)$`, None when the key does not parse as one group."""
    if len(parsed) == 3 and parsed[1][0] is _c.SUBPATTERN and parsed[1][1][0] == 2 and parsed[2] == (_c.AT, _c.AT_END):
        return list(parsed[1][1][3].data)
    return None


def _check(
    pattern: Any, where: str, budget: _Budget, repeats: int = MAX_UNBOUNDED_REPEATS
) -> list[tuple[Any, Any, Callable[[str], bool]]] | None:
    """check_pattern's work; returns the fixed-width tests of the key, None when it needs the automaton."""
    if not isinstance(pattern, str) or not pattern:
        raise AdapterFileError(
            f"{where}: expected a module name or pattern (a non-empty string), found {pattern!r:.80}"
        )
    if len(pattern) > MAX_PATTERN_LENGTH:
        raise AdapterFileError(
            f"{where}: a pattern of {len(pattern)} characters; expected at most {MAX_PATTERN_LENGTH}"
        )
    budget.spend(500 + 20 * len(pattern))  # parsing
    try:
        parsed = _parse(_peft_key(pattern))
        key = _key_nodes(parsed)
        fixed = _fixed(key) if key is not None else None
        if fixed is None:
            _size(parsed)
            if _backtracking(key if key is not None else parsed) > repeats:
                raise _Refused(
                    f"more than {repeats} unbounded repeats can backtrack for long in peft's and vLLM's regex engine"
                )
        return fixed
    except _Refused as exc:
        raise AdapterFileError(
            f"{where}: pattern {pattern!r:.80} is refused ({exc}); use module names or simple patterns"
        ) from None


def _size(nodes: list[tuple[Any, Any]], depth: int = 0) -> int:
    """How many states _Automaton builds for `nodes` (capped just past MAX_STATES); raises on what it cannot build."""
    if depth > 100:
        raise _Refused("nested too deeply")
    total = 0
    for op, av in nodes:
        if _char_test(op, av) is not None:
            total += 1
        elif op is _c.SUBPATTERN:
            if av[1] or av[2]:
                raise _Refused("inline flags such as (?i:...) are not supported")
            total += _size(list(av[3].data), depth + 1)
        elif op is _c.BRANCH:
            total += 1 + sum(_size(list(alt.data), depth + 1) for alt in av[1])
        elif op in (_c.MAX_REPEAT, _c.MIN_REPEAT):
            low, high, sub = av
            body = _size(list(sub.data), depth + 1)
            copies = low + (1 if high == _c.MAXREPEAT else high - low)
            total += min(copies, MAX_STATES + 1) * (body + 1)
        elif op is _c.AT and av in _AT:
            total += 1
        else:
            raise _Refused(
                f"{str(op).lower()} is not supported (back-references, lookarounds, atomic groups, "
                "possessive repeats, word boundaries)"
            )
        if total > MAX_STATES:
            raise _Refused(f"its automaton would have more than {MAX_STATES} states")
    return total


MAX_ALTERNATIVES = 1024
"""Combinations of an alternation's branches a bounded repeat may make (`(a|aa){30}` makes 2^30: peft hangs)."""
_REPEATS = (_c.MAX_REPEAT, _c.MIN_REPEAT)


def _backtracking(nodes: list[tuple[Any, Any]], inside: bool = False, copies: int = 1) -> int:
    """Unbounded repeats in `nodes` as a backtracking engine meets them (a bounded repeat's body counts once per copy:
    `(.*a){20}` is twenty `.*`); raises on what makes it take exponential time."""
    count = 0
    for op, av in nodes:
        if op in _REPEATS:
            low, high, sub = av
            unbounded = high == _c.MAXREPEAT or high > 100
            if inside and high > 1:
                raise _Refused("a repeat inside a repeat can backtrack exponentially in peft's and vLLM's regex engine")
            count += unbounded * copies + _backtracking(
                list(sub.data), inside or unbounded, copies * (1 if unbounded else high)
            )
        elif op is _c.BRANCH:
            if inside:
                raise _Refused(
                    "an alternation inside a repeat can backtrack exponentially in peft's and vLLM's regex engine"
                )
            if copies > 1 and len(av[1]) ** min(copies, 64) > MAX_ALTERNATIVES:
                raise _Refused(
                    f"an alternation repeated {copies} times can backtrack exponentially in peft's and vLLM's regex "
                    "engine"
                )
            count += sum(_backtracking(list(alt.data), inside, copies) for alt in av[1])
        elif op is _c.SUBPATTERN:
            count += _backtracking(list(av[3].data), inside, copies)
    return count


def _peft_key(key: str) -> str:
    return rf"(.*\.)?({key})$"


def check_pattern(pattern: Any, where: str, repeats: int = MAX_UNBOUNDED_REPEATS) -> str:
    """A module-name pattern, refused (AdapterFileError) unless it is a non-empty string of at most
    MAX_PATTERN_LENGTH characters in the regular subset matched here, with at most `repeats` unbounded repeats
    (peft puts `modules_to_save` and `layers_pattern` inside patterns of its own with two more: 1 for those)."""
    _check(pattern, where, _Budget(), repeats)
    return pattern


class PatternSet(Generic[V]):
    """peft's lookup in a pattern dict (rank_pattern, alpha_pattern): the value of the first key that matches.

    Keys are checked (check_pattern) when the set is made; a lookup past the set's MAX_WORK raises AdapterFileError.
    """

    def __init__(self, patterns: Mapping[str, V] | None, where: str = "pattern") -> None:
        if patterns is not None and not isinstance(patterns, Mapping):
            raise AdapterFileError(
                f"{where}: expected a mapping of module patterns to values, found {type(patterns).__name__}"
            )
        self.where = where
        self.keys, self.values = list(patterns or {}), list((patterns or {}).values())
        self.budget = _Budget()
        self.groups: dict[
            tuple[int, tuple[int, ...]],
            dict[tuple[str, ...], list[tuple[int, list[tuple[int, Callable[[str], bool]]]]]],
        ] = {}
        general: list[int] = []
        for index, key in enumerate(self.keys):
            try:
                fixed = _check(key, f"{where} key", self.budget)
            except _Refused as exc:
                raise AdapterFileError(
                    f"{where}: {len(self.keys)} keys: {exc}; use module names or fewer, simpler patterns"
                ) from None
            if fixed is None:
                general.append(index)
                continue
            literal = tuple(i for i, (op, _, _) in enumerate(fixed) if op is _c.LITERAL)
            others = [(i, test) for i, (op, _, test) in enumerate(fixed) if op is not _c.LITERAL]
            self.groups.setdefault((len(fixed), literal), {}).setdefault(
                tuple(chr(fixed[i][1]) for i in literal), []
            ).append((index, others))
        self.general = general
        self._general: _Matcher | None = None
        self._every: _Matcher | None = None

    def _matcher(self, indices: list[int]) -> _Matcher:
        return _Matcher(_Automaton([_peft_key(self.keys[i]) for i in indices], self.budget), self.budget)

    def index(self, name: str) -> int | None:
        """The position of the first key matching `name`, None when none does."""
        try:
            found = self._index(name)
        except _Refused as exc:
            raise AdapterFileError(
                f"{self.where}: {len(self.keys)} key(s) against module names: {exc}; use module names "
                "or fewer, simpler patterns"
            ) from None
        return None if found == _NO_MATCH else found

    def _index(self, name: str) -> int:
        if "\n" in name:  # `.` and `$` treat a newline specially: every key through the automaton
            if self._every is None:
                self._every = self._matcher(list(range(len(self.keys))))
            return self._every.run(name, full=False)
        best, n = _NO_MATCH, len(name)
        self.budget.spend(5 * len(self.groups) + 20)
        for (width, literal), table in self.groups.items():
            start = n - width
            if start < 0 or (start > 0 and name[start - 1] != "."):
                continue
            for index, others in table.get(tuple(name[start + i] for i in literal), ()):
                if index < best and all(test(name[start + i]) for i, test in others):
                    best = index
        if self.general and self.general[0] < best:
            if self._general is None:
                self._general = self._matcher(self.general)
            found = self._general.run(name, full=False)
            if found != _NO_MATCH:
                best = min(best, self.general[found])
        return best

    def get(self, name: str, default: V) -> V:
        """The value of the first key matching `name`, else `default` (peft's rule)."""
        if not self.keys:  # the usual rank_pattern / alpha_pattern: none (one lookup per module of a MoE adapter)
            return default
        found = self.index(name)
        return default if found is None else self.values[found]


class FullMatch:
    """re.fullmatch of one pattern (peft's rule for a string target_modules), checked once, for any number of names;
    each call may spend MAX_WORK (names are at most as long as the file they come from)."""

    def __init__(self, pattern: str, where: str = "target_modules") -> None:
        check_pattern(pattern, where)
        self.pattern, self.where = pattern, where
        self.budget = _Budget()
        try:
            self.matcher = _Matcher(_Automaton([pattern], self.budget), self.budget)
        except _Refused as exc:
            raise AdapterFileError(
                f"{where}: pattern {pattern!r:.80}: {exc}; use module names or a simpler pattern"
            ) from None

    def __call__(self, name: str) -> bool:
        self.budget.left = MAX_WORK
        try:
            return self.matcher.run(name, full=True) == 0
        except _Refused as exc:
            raise AdapterFileError(f"{self.where}: pattern {self.pattern!r:.80} against {name[:80]!r}: {exc}") from None


@functools.lru_cache(maxsize=64)
def full_matcher(pattern: str, where: str = "target_modules") -> FullMatch:
    """A FullMatch per pattern, kept for reuse (its automaton's sets of states are cached as they are met)."""
    return FullMatch(pattern, where)


def fullmatch(pattern: str, names: Iterable[str], where: str = "target_modules") -> list[str]:
    """The names `pattern` matches entirely (peft's rule for a string target_modules), at a bounded cost."""
    matcher = full_matcher(pattern, where)
    return [name for name in names if matcher(name)]
