"""Load a policy file and say exactly where it is wrong: ``file:line:col: path: message``.

The YAML is composed node by node (PyYAML's composer on the safe loader) so every value
keeps the position it was written at; the plain Python value built from the nodes goes
through :class:`~gateway._policy.Policy` and then :func:`~gateway._policy.cross_check`.
Every error of the file is reported at once, each pointing at the nearest line the
operator wrote, in words about the file rather than about pydantic.

Guards on hostile input: the file is capped at :data:`MAX_FILE_BYTES`, the node count
(aliases expanded) at :data:`MAX_NODES` and the nesting at :data:`MAX_DEPTH`, so that
alias bombs and runaway nesting fail with a message instead of eating the worker.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
import os
import re
import time
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ValidationError
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from ._connections import OUT_OF_DESCRIPTORS
from ._policy import Policy, PolicyPath, cross_check, format_size, is_size_with_unit

__all__ = [
    "MAX_DEPTH",
    "MAX_FILE_BYTES",
    "MAX_NODES",
    "LoadedPolicy",
    "PolicyError",
    "PolicyIssue",
    "format_path",
    "load_policy_file",
    "load_policy_text",
]

#: Largest policy file accepted (bytes). Real policies are a few kilobytes.
MAX_FILE_BYTES = 1024 * 1024
#: Most YAML nodes a file may expand to, aliases counted every time they are used.
MAX_NODES = 100_000
#: Deepest nesting of mappings and lists accepted.
MAX_DEPTH = 64

Severity = Literal["error", "warning"]
_Position = tuple[int, int]

_STR_TAG = "tag:yaml.org,2002:str"
_MAP_TAG = "tag:yaml.org,2002:map"
_SEQ_TAG = "tag:yaml.org,2002:seq"
_MERGE_TAG = "tag:yaml.org,2002:merge"
#: ``scheme://user:password@`` anywhere in a string value.
_CREDENTIALS_RE = re.compile(
    r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<user>[^\s/:@]*):(?P<password>[^\s/@]+)@")
#: Keys an operator might reach for to put a secret inline.
_SECRET_KEYS = frozenset({"dsn", "password", "passwd", "secret", "token", "api_key", "apikey"})


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class PolicyIssue:
    """One finding, located in the file: ``file:line:col: path: message``.

    ``line`` and ``column`` are 1-based; line 0 means the issue concerns the file as a
    whole (it could not be read) and is printed without a position.
    """

    file: str
    line: int
    column: int
    path: str
    message: str
    severity: Severity = "error"

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}:{self.column}" if self.line > 0 else self.file
        what = f"{self.path}: " if self.path else ""
        prefix = "warning: " if self.severity == "warning" else ""
        return f"{where}: {what}{prefix}{self.message}"


class PolicyError(Exception):
    """A policy file that cannot be used; ``issues`` holds every error found, in order."""

    def __init__(self, issues: tuple[PolicyIssue, ...] | list[PolicyIssue]) -> None:
        self.issues = tuple(issues)
        super().__init__("\n".join(str(issue) for issue in self.issues))

    def __str__(self) -> str:
        return "\n".join(str(issue) for issue in self.issues)


class PolicyReadError(PolicyError):
    """The file could not be read. ``transient``: for want of descriptors or memory,
    so nothing is known of its content and a watcher tries it again, rather than
    taking it as rejected (a file it may not read, or a directory, is rejected)."""

    def __init__(self, issues: tuple[PolicyIssue, ...] | list[PolicyIssue], *,
                 transient: bool) -> None:
        super().__init__(issues)
        self.transient = transient


@dataclass(frozen=True)
class LoadedPolicy:
    """A validated policy with where it came from; what a reload swaps in atomically."""

    policy: Policy
    file: str
    #: First 12 hex digits of the SHA-256 of the file's bytes.
    version: str
    warnings: tuple[PolicyIssue, ...] = ()
    #: ``time.time()`` when it was loaded.
    loaded_at: float = field(default_factory=time.time)
    #: The bytes it was loaded from (a replacement worker may start from them).
    text: bytes = field(default=b"", repr=False, compare=False)


def format_path(path: PolicyPath) -> str:
    """``("routes", 2, "fanout")`` → ``"routes[2].fanout"``."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


# --------------------------------------------------------------------------- entry points


def load_policy_file(path: str | os.PathLike[str]) -> LoadedPolicy:
    """Read and load a policy file (blocking: callers run it in ``trio.to_thread``)."""
    file = os.fspath(path)
    try:
        with open(file, "rb") as stream:
            data = stream.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        reason = exc.strerror or exc.__class__.__name__
        raise PolicyReadError(
            [PolicyIssue(file, 0, 0, "", f"cannot read the policy file: {reason}")],
            transient=exc.errno in OUT_OF_DESCRIPTORS) from None
    return load_policy_text(data, file)


def load_policy_text(text: str | bytes, file: str) -> LoadedPolicy:
    """Parse, validate and cross-check a policy; raises :class:`PolicyError` with every error."""
    data = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else bytes(text)
    version = hashlib.sha256(data).hexdigest()[:12]
    if len(data) > MAX_FILE_BYTES:
        raise PolicyError([PolicyIssue(
            file, 0, 0, "",
            f"the file is larger than {MAX_FILE_BYTES // 1024} KiB; a policy is a few kilobytes")])
    if isinstance(text, str):
        source = text
    else:
        try:
            source = data.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            line, column = _offset_position(data, exc.start)
            raise PolicyError([PolicyIssue(file, line, column, "",
                                           "the file is not UTF-8 text")]) from None

    document = _Document(file)
    value = document.parse(source)
    issues = list(document.issues)
    policy: Policy | None = None
    if value is not _UNSET:
        secrets = list(document.scan_secrets())
        issues.extend(secrets)
        # A secret is reported once, masked: never again by a validator quoting it whole.
        # Nor is a value the YAML could not give (an unknown tag) reported twice.
        skip = {issue.path for issue in secrets} | {format_path(p) for p in document.voided}
        try:
            policy = Policy.model_validate(value)
        except ValidationError as exc:
            issues.extend(issue for issue in _validation_issues(exc, document)
                          if issue.path not in skip)
    warnings: list[PolicyIssue] = []
    if policy is not None:
        flagged = {issue.path for issue in issues}
        for problem in cross_check(policy):
            issue = document.issue(problem.path, problem.message, problem.severity)
            if issue.path in flagged:
                continue
            (warnings if problem.severity == "warning" else issues).append(issue)
    if issues or policy is None:
        raise PolicyError(_ordered(issues + warnings))
    return LoadedPolicy(policy=policy, file=file, version=version,
                        warnings=tuple(_ordered(warnings)), loaded_at=time.time(), text=data)


def _ordered(issues: list[PolicyIssue]) -> list[PolicyIssue]:
    unique = list(dict.fromkeys(issues))
    return sorted(unique, key=lambda issue: (issue.line, issue.column))


def _offset_position(data: bytes | str, offset: int) -> _Position:
    """1-based (line, column) of a character (or byte) offset."""
    before = data[:offset].decode("utf-8", "replace") if isinstance(data, bytes) else data[:offset]
    return before.count("\n") + 1, offset - (before.rfind("\n") + 1) + 1


# --------------------------------------------------------------------------- YAML


class _Unset:
    def __repr__(self) -> str:
        return "<unset>"


_UNSET: Any = _Unset()


class _TooBig(Exception):
    """The document expands past :data:`MAX_NODES` or :data:`MAX_DEPTH`."""


class _Document:
    """One YAML document: its plain value, and the position of every value and key."""

    def __init__(self, file: str) -> None:
        self.file = file
        self.issues: list[PolicyIssue] = []
        #: path → (line, column) where the value starts.
        self.values: dict[PolicyPath, _Position] = {}
        #: path → (line, column) of the key that holds the value (mappings only).
        self.keys: dict[PolicyPath, _Position] = {}
        #: path → whether the value there is a scalar or a collection.
        self.kinds: dict[PolicyPath, Literal["scalar", "collection"]] = {}
        #: path → every string value, for the secrets scan.
        self.strings: dict[PolicyPath, str] = {}
        #: paths whose value could not be built (given to the models as null).
        self.voided: set[PolicyPath] = set()
        self._nodes = 0
        self._issues_seen: set[tuple[int, int, str]] = set()
        self._loader: yaml.SafeLoader | None = None
        self._list_strings: dict[PolicyPath, list[tuple[PolicyPath, str]]] | None = None

    def list_strings(self, loc: PolicyPath) -> list[tuple[PolicyPath, str]]:
        """The string items of the list at ``loc`` (indexed once: a file with thousands
        of errors looked through every string of the file for each)."""
        if self._list_strings is None:
            index: dict[PolicyPath, list[tuple[PolicyPath, str]]] = {}
            for path, text in self.strings.items():
                if path and isinstance(path[-1], int):
                    index.setdefault(path[:-1], []).append((path, text))
            self._list_strings = index
        return self._list_strings.get(loc, [])

    # -- parsing

    def parse(self, source: str) -> Any:
        """The document's plain value, or ``_UNSET`` when it cannot be read (issues say why)."""
        try:
            self._precheck(source)
            self._loader = yaml.SafeLoader(source)
            try:
                root = self._loader.get_single_node()
            finally:
                self._loader.dispose()
        except yaml.MarkedYAMLError as exc:
            self._syntax_issue(exc)
            return _UNSET
        except yaml.reader.ReaderError as exc:
            line, column = _offset_position(source, exc.position)
            char = f"U+{exc.character:04X}" if isinstance(exc.character, int) else "a byte"
            self.add((), f"the file contains {char}, which YAML does not allow", (line, column))
            return _UNSET
        except yaml.YAMLError as exc:  # pragma: no cover - every YAMLError above is marked
            self.add((), f"not valid YAML: {exc}", (1, 1))
            return _UNSET
        if root is None:
            self.add((), "the file is empty; a policy starts with 'version: 1'", (1, 1))
            return _UNSET
        try:
            value = self._convert(root, (), 0, ())
        except _TooBig as exc:
            self.add((), str(exc), _mark(root))
            return _UNSET
        return value

    def _precheck(self, source: str) -> None:
        """Refuse runaway nesting and node counts before composing (the composer recurses)."""
        depth = 0
        for events, event in enumerate(yaml.parse(source, Loader=yaml.SafeLoader), start=1):
            if events > MAX_NODES:
                raise yaml.MarkedYAMLError(  # C and Python Mark types differ only in stubs
                    problem=f"the file has more than {MAX_NODES} values",
                    problem_mark=event.start_mark)  # type: ignore[arg-type]
            if isinstance(event, yaml.CollectionStartEvent):
                depth += 1
                if depth > MAX_DEPTH:
                    raise yaml.MarkedYAMLError(
                        problem=f"nested deeper than {MAX_DEPTH} levels",
                        problem_mark=event.start_mark)  # type: ignore[arg-type]
            elif isinstance(event, yaml.CollectionEndEvent):
                depth -= 1

    def _syntax_issue(self, exc: yaml.MarkedYAMLError) -> None:
        mark = exc.problem_mark or exc.context_mark
        position = _mark_of(mark) if mark is not None else (1, 1)
        problem = exc.problem or "not valid YAML"
        context = exc.context
        if context and exc.context_mark is not None and mark is not exc.context_mark:
            context += f" started on line {exc.context_mark.line + 1}"
        anchor = re.match(r"found duplicate anchor (\S+);", exc.context or "")
        if "'\\t'" in problem:
            message = "a tab character; YAML indents with spaces only"
        elif anchor is not None:
            first = ("" if exc.context_mark is None
                     else f" (first on line {exc.context_mark.line + 1})")
            message = f"duplicate anchor {anchor[1]}{first}"
        elif problem == "but found another document":
            message = ("a second YAML document: a policy file is one document (remove this "
                       "'---' and what follows it)")
        elif context and problem.startswith(("expected", "found", "could not", "did not")):
            message = f"{problem} ({context})"
        elif context:
            message = f"{context}: {problem}"
        else:
            message = problem
        self.add((), message, position)

    def _count(self, depth: int) -> None:
        """One more value (or merge) read: the file's expansion stays bounded."""
        self._nodes += 1
        if self._nodes > MAX_NODES:
            raise _TooBig(f"the file expands to more than {MAX_NODES} values "
                          "(check the aliases and merge keys)")
        if depth > MAX_DEPTH:
            raise _TooBig(f"nested deeper than {MAX_DEPTH} levels")

    def _convert(self, node: Node, path: PolicyPath, depth: int,
                 active: tuple[int, ...]) -> Any:
        self._count(depth)
        if id(node) in active:
            self.add(path, "an alias refers to the value that contains it", _mark(node))
            self.voided.add(path)
            return None
        self.values.setdefault(path, _mark(node))
        if isinstance(node, ScalarNode):
            self.kinds.setdefault(path, "scalar")
            return self._scalar(node, path)
        self.kinds.setdefault(path, "collection")
        inner = (*active, id(node))
        if isinstance(node, SequenceNode):
            if node.tag != _SEQ_TAG:
                self.add(path, f"unsupported YAML tag {node.tag!r}", _mark(node))
            return [self._convert(item, (*path, index), depth + 1, inner)
                    for index, item in enumerate(node.value)]
        if isinstance(node, MappingNode):
            if node.tag != _MAP_TAG:
                self.add(path, f"unsupported YAML tag {node.tag!r}", _mark(node))
            return self._mapping(node, path, depth, inner)
        raise AssertionError(f"unexpected YAML node {node!r}")  # pragma: no cover

    def _scalar(self, node: ScalarNode, path: PolicyPath) -> Any:
        constructor = yaml.SafeLoader.yaml_constructors.get(node.tag)
        if constructor is None or node.tag in {"tag:yaml.org,2002:omap",
                                               "tag:yaml.org,2002:pairs",
                                               "tag:yaml.org,2002:set"}:
            self.add(path, f"unsupported YAML tag {node.tag!r}", _mark(node))
            self.voided.add(path)
            return None
        try:
            value = constructor(self._loader, node)
        except (yaml.YAMLError, ValueError, TypeError, OverflowError) as exc:
            detail = getattr(exc, "problem", None) or str(exc)
            self.add(path, f"cannot read {_quote(node.value)}: {detail}", _mark(node))
            self.voided.add(path)
            return None
        if isinstance(value, str):
            self.strings[path] = value
        return value

    def _mapping(self, node: MappingNode, path: PolicyPath, depth: int,
                 active: tuple[int, ...], given: frozenset[str] = frozenset(),
                 ) -> dict[str, Any]:
        """The mapping's keys and values; ``given``: keys a merging mapping has already
        (its own, or an earlier merge's), which win, so they are not read here at all:
        their positions and written values stay the ones errors must point at."""
        result: dict[str, Any] = {}
        seen: dict[str, _Position] = {}
        merges: list[Node] = []
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE_TAG:
                merges.append(value_node)
                continue
            # A pair reported and skipped below is never converted (nor counted there);
            # behind aliases, such pairs would multiply unbounded.
            self._count(depth + 1)
            if not isinstance(key_node, ScalarNode):
                self.add(path, "a key must be a plain name, not a list or mapping",
                         _mark(key_node))
                continue
            # Keys are names: take them as written, so that ``on:`` stays the string
            # "on" instead of YAML 1.1's boolean true.
            key = str(key_node.value)
            key_path = (*path, key)
            if key in given:
                continue
            if key in seen:
                first_line = seen[key][0]
                self.add(key_path, f"duplicate key '{key}' (first given on line {first_line})",
                         _mark(key_node))
                continue
            seen[key] = _mark(key_node)
            self.keys[key_path] = _mark(key_node)
            result[key] = self._convert(value_node, key_path, depth + 1, active)
        for merge in merges:
            sources = merge.value if isinstance(merge, SequenceNode) else [merge]
            for source in sources:
                # Each merge counts, even of an empty mapping or a scalar: merges of
                # merges multiply.
                self._count(depth + 1)
                if not isinstance(source, MappingNode):
                    self.add(path, "'<<' merges mappings only", _mark(source))
                    continue
                if id(source) in active:
                    self.add(path, "a merge key refers to the mapping that contains it",
                             _mark(source))
                    self.voided.add(path)
                    continue
                merged = self._mapping(source, path, depth + 1, (*active, id(source)),
                                       given | seen.keys() | result.keys())
                for key, value in merged.items():
                    result.setdefault(key, value)
        return result

    # -- positions and issues

    def position(self, path: PolicyPath) -> tuple[PolicyPath, _Position]:
        """The nearest known position of ``path`` (walking up to its parents)."""
        for cut in range(len(path), -1, -1):
            prefix = path[:cut]
            if prefix in self.values or prefix in self.keys:
                if self.kinds.get(prefix) == "collection" and prefix in self.keys:
                    return prefix, self.keys[prefix]
                if prefix in self.values:
                    return prefix, self.values[prefix]
                return prefix, self.keys[prefix]
        return (), (1, 1)

    def issue(self, path: PolicyPath, message: str, severity: Severity = "error",
              at: _Position | None = None) -> PolicyIssue:
        line, column = at if at is not None else self.position(path)[1]
        return PolicyIssue(self.file, line, column, format_path(path), message, severity)

    def add(self, path: PolicyPath, message: str, at: _Position | None = None) -> None:
        issue = self.issue(path, message, at=at)
        # The same node reached again through an alias (under another path) says the
        # same thing once, at its first path.
        key = (issue.line, issue.column, issue.message)
        if key not in self._issues_seen:
            self._issues_seen.add(key)
            self.issues.append(issue)

    def scan_secrets(self) -> Iterator[PolicyIssue]:
        """Strings holding ``scheme://user:password@``: secrets belong in the environment."""
        for path, value in self.strings.items():
            match = _CREDENTIALS_RE.search(value)
            if match is None:
                continue
            masked = value[:match.start("password")] + "***" + value[match.end("password"):]
            hint = ("; name the variable in 'dsn_env'"
                    if "dsn_env" in _field_names_at(path[:-1]) else "")
            yield self.issue(path, "secrets go in environment variables: "
                             f"{_quote(masked)} has a password inline{hint}")


def _mark(node: Node) -> _Position:
    return _mark_of(node.start_mark)


def _mark_of(mark: Any) -> _Position:
    return mark.line + 1, mark.column + 1


# --------------------------------------------------------------------------- validation


_TYPE_NAMES = {
    "dict_type": "a mapping", "model_type": "a mapping", "model_attributes_type": "a mapping",
    "tuple_type": "a list", "list_type": "a list",
    "string_type": "a string", "int_type": "a whole number", "int_parsing": "a whole number",
    "int_from_float": "a whole number", "float_type": "a number", "float_parsing": "a number",
    "bool_type": "true or false", "bool_parsing": "true or false",
    "ip_v4_network": "a network (CIDR)", "ip_v6_network": "a network (CIDR)",
}
_UNION_WORDS = {
    "mode": "is not a fan-out mode: all, first or {quorum: N}",
    "on": "is not a retry condition: connect, reset, timeout or a status 500..599",
}
_ARG_SOURCE_HINT = "is not an argument source (e.g. path.id, query.limit:int, body.name:text)"


def _validation_issues(exc: ValidationError, document: _Document) -> list[PolicyIssue]:
    """One operator-readable issue per location, union noise collapsed."""
    groups: dict[PolicyPath, list[tuple[str | None, PolicyPath, dict[str, Any]]]] = {}
    for details in exc.errors(include_url=False):
        error: dict[str, Any] = dict(details)
        loc = tuple(error["loc"])
        tag_index = next((i for i, part in enumerate(loc) if _is_union_tag(part)), None)
        if tag_index is None:
            groups.setdefault(loc, []).append((None, loc, error))
        else:
            base = loc[:tag_index]
            rest = loc[tag_index + 1:]
            groups.setdefault(base, []).append((str(loc[tag_index]), (*base, *rest), error))

    # ``route:`` written for ``routes:`` is one mistake: the unknown key says it all.
    misspelt = {(loc[:-1], _suggestion(str(loc[-1]), loc[:-1]))
                for loc, members in groups.items() for _, _, error in members
                if error["type"] == "extra_forbidden" and loc}
    issues: list[PolicyIssue] = []
    for base, members in groups.items():
        if members[0][2]["type"] == "missing" and (base[:-1], base[-1]) in misspelt:
            continue
        plain = [(loc, error) for tag, loc, error in members if tag is None]
        branched = [(tag, loc, error) for tag, loc, error in members if tag is not None]
        for loc, error in plain:
            issue = _error_issue(loc, error, document)
            if issue is not None:
                issues.append(issue)
        if branched:
            issues.extend(_union_issues(base, branched, document))
    return issues


def _is_union_tag(part: str | int) -> bool:
    return isinstance(part, str) and (
        part.startswith(("literal[", "constrained-", "function-"))
        or part in {"Quorum", "int", "str", "IPv4Network", "IPv6Network"})


def _union_issues(base: PolicyPath, branched: list[tuple[str, PolicyPath, dict[str, Any]]],
                  document: _Document) -> list[PolicyIssue]:
    # A branch whose errors lie deeper than the union itself matched the shape of the
    # value (e.g. a mapping given for ``{quorum: N}``): its errors are the real ones.
    deeper = [(loc, error) for _, loc, error in branched if len(loc) > len(base)]
    if deeper:
        issues = [_error_issue(loc, error, document) for loc, error in deeper]
        return [issue for issue in issues if issue is not None]
    value = branched[0][2]["input"]
    name = next((part for part in reversed(base) if isinstance(part, str)), "")
    words = _UNION_WORDS.get(name)
    if words is None:
        expected: list[str] = []
        for _, _, error in branched:
            if error["type"] == "literal_error":
                expected.append(error["ctx"]["expected"])
            elif error["type"] in _TYPE_NAMES:
                expected.append(_TYPE_NAMES[error["type"]])
            else:
                expected.append(_bare_message(error))
        words = "is not valid here: expected " + " or ".join(dict.fromkeys(expected))
    return [document.issue(base, f"{_quote(value)} {words}")]


#: pydantic's bound errors: the context key of the bound, and how the message reads.
_BOUNDS = {"greater_than_equal": ("ge", "is below the minimum of"),
           "greater_than": ("gt", "must be above"),
           "less_than_equal": ("le", "is above the maximum of"),
           "less_than": ("lt", "must be below")}


def _error_issue(loc: PolicyPath, error: dict[str, Any],
                 document: _Document) -> PolicyIssue | None:
    kind = error["type"]
    value = error.get("input")
    ctx = error.get("ctx") or {}
    if kind == "extra_forbidden":
        key = str(loc[-1]) if loc else ""
        return document.issue(loc, _unknown_key_message(key, loc[:-1]),
                              at=document.keys.get(loc))
    if kind == "missing":
        return document.issue(loc[:-1], f"missing required key '{loc[-1]}'")
    if kind == "too_short":
        if isinstance(value, (list, tuple, dict)) and len(value) >= ctx.get("min_length", 0):
            return None  # pydantic's echo of an error inside the items, reported there
        return document.issue(loc, _empty_message(loc))
    if kind == "value_error":
        message = _bare_message(error)
        item = _narrow_to_item(loc, message, document)
        if item != loc:
            loc, value = item, document.strings[item]
        return document.issue(loc, _requote(message, value))
    if kind == "literal_error" and loc == ("version",):
        return document.issue(loc, f"{_quote(value)} is not a supported version; "
                              "this gateway reads version 1")
    if kind == "literal_error":
        return document.issue(loc, f"{_quote(value)} is not one of {_choices(ctx['expected'])}")
    if kind in _BOUNDS:
        # As written ("0s"), not as parsed (0.0), when the value was text.
        shown = document.strings.get(loc, value)
        bound = ctx[_BOUNDS[kind][0]]
        # A size written with its unit is told its bound in units too ("1GiB", not
        # "1073741824").
        text = (f"{bound:g}" if isinstance(bound, float)
                else format_size(bound) if is_size_with_unit(shown) else str(bound))
        return document.issue(loc, f"{_quote(shown)} {_BOUNDS[kind][1]} {text}")
    if kind == "string_pattern_mismatch":
        if loc and "args" in loc:
            return document.issue(loc, f"{_quote(value)} {_ARG_SOURCE_HINT}")
        return document.issue(loc, f"{_quote(value)} does not match {ctx.get('pattern')}")
    if kind == "finite_number":
        return document.issue(loc, f"{_quote(value)} is not a finite number")
    if kind in _TYPE_NAMES:
        return document.issue(loc, f"expected {_TYPE_NAMES[kind]}, got {_quote(value)}")
    return document.issue(loc, _requote(_bare_message(error), value))


def _bare_message(error: dict[str, Any]) -> str:
    if error["type"] == "value_error":
        cause = (error.get("ctx") or {}).get("error")
        if cause is not None:
            return str(cause)
    message = str(error["msg"])
    return message.removeprefix("Value error, ").removeprefix("Assertion failed, ")


def _requote(message: str, value: Any) -> str:
    """Quote the offending value the way the file shows it: ``"25 0ms"`` for strings."""
    if isinstance(value, str) and repr(value) in message:
        return message.replace(repr(value), _quote(value), 1)
    return message


def _narrow_to_item(loc: PolicyPath, message: str, document: _Document) -> PolicyPath:
    """A list-level error that quotes one of the list's items points at that item."""
    hits = [path for path, text in document.list_strings(loc) if repr(text) in message]
    return hits[0] if len(hits) == 1 else loc


def _choices(expected: str) -> str:
    return expected.replace("'", "")


def _empty_message(loc: PolicyPath) -> str:
    name = next((part for part in reversed(loc) if isinstance(part, str)), "")
    if name == "routes":
        return "there must be at least one route"
    if name == "calls":
        return "a fan-out needs at least one call"
    return "must not be empty"


def _unknown_key_message(key: str, parent: PolicyPath) -> str:
    fields = _field_names_at(parent)
    if key.lower() in _SECRET_KEYS:
        where = "; name the variable in 'dsn_env'" if "dsn_env" in fields else ""
        return f"unknown key '{key}': secrets go in environment variables, never inline{where}"
    close = _suggestion(key, parent)
    if close:
        return f"unknown key '{key}' (did you mean '{close}'?)"
    if fields:
        return f"unknown key '{key}' (known: {', '.join(fields)})"
    return f"unknown key '{key}'"


def _suggestion(key: str, parent: PolicyPath) -> str | None:
    close = difflib.get_close_matches(key, _field_names_at(parent), n=1, cutoff=0.6)
    return close[0] if close else None


def _field_names_at(parent: PolicyPath) -> list[str]:
    """The field names of the model found at ``parent`` (walking the annotations)."""
    current: Any = Policy
    for part in parent:
        current = _step(current, part)
        if current is None:
            return []
    models = [m for m in _members(current) if isinstance(m, type) and issubclass(m, BaseModel)]
    return list(models[0].model_fields) if models else []


def _members(annotation: Any) -> list[Any]:
    """The alternatives of a union (``X | None`` included), or the annotation itself."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _members(typing.get_args(annotation)[0])
    if origin in {typing.Union, types.UnionType}:
        return [m for arg in typing.get_args(annotation) for m in _members(arg)]
    return [annotation]


def _step(annotation: Any, part: str | int) -> Any:
    for member in _members(annotation):
        if isinstance(member, type) and issubclass(member, BaseModel):
            if isinstance(part, str) and part in member.model_fields:
                return member.model_fields[part].annotation
            continue
        origin = typing.get_origin(member)
        args = typing.get_args(member)
        if origin is dict and isinstance(part, str):
            return args[1]
        if origin in {tuple, list} and isinstance(part, int) and args:
            return args[0]
    return None


def _quote(value: Any) -> str:
    """A value as an operator would write it in the file."""
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, (list, tuple)):
        return "a list"
    return json.dumps(str(value), ensure_ascii=False)


#: A file holding the policy the workers last loaded (set by ``serve`` with workers).
LAST_GOOD_ENV = "GATEWAY_POLICY_LAST_GOOD"


def record_last_good(loaded: LoadedPolicy) -> None:
    """Keep the active policy where a replacement worker can start from it (blocking)."""
    path = os.environ.get(LAST_GOOD_ENV)
    if not path or not loaded.text:
        return
    temporary = f"{path}.{os.getpid()}.tmp"
    try:
        with open(temporary, "wb") as stream:
            stream.write(loaded.text)
        os.replace(temporary, path)
    except OSError as error:
        logging.getLogger("gateway").warning(
            "cannot keep the active policy for replacement workers: %s", error)
