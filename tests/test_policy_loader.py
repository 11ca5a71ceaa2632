"""The policy loader and ``check``: positions, messages, every error at once, no crashes."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import trio
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway._check import explain_route, policy_json_schema, run_check
from gateway._policy import parse_size
from gateway._policy_loader import (
    MAX_FILE_BYTES,
    LoadedPolicy,
    PolicyError,
    PolicyIssue,
    format_path,
    load_policy_file,
    load_policy_text,
)

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "tests" / "policy_corpus"
CORPUS_FILES = sorted(CORPUS.glob("*.yaml"))
GOOD_POLICIES = sorted([*(ROOT / "policies").glob("*.yaml"),
                        *(ROOT / "policies" / "examples").glob("*.yaml")])

MINIMAL = """\
version: 1
upstreams:
  users: {url: "http://127.0.0.1:9001"}
routes:
  - path: /api/users/{id}
    proxy: {upstream: users, path: "/users/{id}"}
"""


def _issues(text: str) -> list[str]:
    with pytest.raises(PolicyError) as caught:
        load_policy_text(text, "p.yaml")
    return [str(issue) for issue in caught.value.issues]


# --------------------------------------------------------------------------- corpus


def test_corpus_is_large_and_paired() -> None:
    assert len(CORPUS_FILES) >= 25
    for file in CORPUS_FILES:
        assert file.with_suffix(".expected").exists(), f"{file.name} has no .expected"


@pytest.mark.parametrize("file", CORPUS_FILES, ids=[f.stem for f in CORPUS_FILES])
def test_corpus_output(file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    relative = file.relative_to(ROOT).as_posix()
    out = io.StringIO()
    status = run_check([relative], out=out)
    expected = file.with_suffix(".expected").read_text()
    assert out.getvalue() == expected
    last = expected.splitlines()[-1]
    assert status == (0 if ": ok" in last else 1)


def test_warning_only_file_passes_with_its_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    loaded = load_policy_file("tests/policy_corpus/28-warning-timeout-above-deadline.yaml")
    (warning,) = loaded.warnings
    assert warning.severity == "warning"
    assert warning.path == "routes[0].proxy.timeout"
    assert (warning.line, warning.column) == (8, 55)


def test_cli_check_runs_as_a_module(monkeypatch: pytest.MonkeyPatch) -> None:
    if not (ROOT / "gateway" / "__main__.py").exists():
        pytest.skip("gateway/__main__.py does not exist yet: no CLI to run")
    corpus_file = "tests/policy_corpus/01-bad-duration.yaml"
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "check", "policies/demo.yaml", corpus_file],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 1, result.stderr
    expected = (CORPUS / "01-bad-duration.expected").read_text()
    assert expected.splitlines()[0] in result.stdout.splitlines()
    assert any(line.startswith("policies/demo.yaml: ok (version ")
               for line in result.stdout.splitlines())


# --------------------------------------------------------------------------- good policies


@pytest.mark.parametrize("file", GOOD_POLICIES, ids=[f.name for f in GOOD_POLICIES])
def test_shipped_policies_check_clean(file: Path) -> None:
    out = io.StringIO()
    assert run_check([str(file)], out=out) == 0, out.getvalue()
    assert out.getvalue().count("\n") == 1, out.getvalue()  # the summary, nothing else


@pytest.mark.parametrize("file", GOOD_POLICIES, ids=[f.name for f in GOOD_POLICIES])
def test_shipped_policies_name_the_schema(file: Path) -> None:
    first = file.read_text().splitlines()[0]
    schema = "./policy.schema.json" if file.parent.name == "policies" else "../policy.schema.json"
    assert first == f"# yaml-language-server: $schema={schema}"


def test_committed_schema_matches_the_models() -> None:
    committed = json.loads((ROOT / "policies" / "policy.schema.json").read_text())
    assert committed == policy_json_schema(), (
        "policies/policy.schema.json is stale; regenerate it with `python -m gateway schema`")


def test_schema_has_editor_metadata() -> None:
    schema = policy_json_schema()
    assert schema["$schema"].startswith("https://json-schema.org/")
    assert schema["$id"]
    assert schema["title"]
    assert schema["additionalProperties"] is False
    assert "routes" in schema["required"]


# --------------------------------------------------------------------------- loader API


def test_loaded_policy_fields() -> None:
    loaded = load_policy_text(MINIMAL, "mem.yaml")
    assert isinstance(loaded, LoadedPolicy)
    assert loaded.file == "mem.yaml"
    assert len(loaded.version) == 12
    assert all(c in "0123456789abcdef" for c in loaded.version)
    assert loaded.warnings == ()
    assert loaded.loaded_at > 0
    assert loaded.policy.routes[0].proxy is not None
    # The same bytes give the same version, str or bytes alike.
    assert load_policy_text(MINIMAL.encode(), "mem.yaml").version == loaded.version
    assert load_policy_text(MINIMAL + "\n", "mem.yaml").version != loaded.version


def test_missing_file_is_a_policy_error_at_line_zero(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(PolicyError) as caught:
        load_policy_file(missing)
    (issue,) = caught.value.issues
    assert issue.line == 0
    assert str(issue) == f"{missing}: cannot read the policy file: No such file or directory"


def test_directory_is_a_policy_error(tmp_path: Path) -> None:
    with pytest.raises(PolicyError) as caught:
        load_policy_file(tmp_path)
    assert caught.value.issues[0].line == 0


def test_oversized_file_is_refused(tmp_path: Path) -> None:
    big = tmp_path / "big.yaml"
    big.write_text(MINIMAL + "#" * MAX_FILE_BYTES)
    with pytest.raises(PolicyError, match="larger than 1024 KiB"):
        load_policy_file(big)


def test_issue_str_and_error_str() -> None:
    error = PolicyIssue("p.yaml", 3, 7, "routes[0].deadline", "bad")
    warning = PolicyIssue("p.yaml", 4, 1, "x", "meh", "warning")
    assert str(error) == "p.yaml:3:7: routes[0].deadline: bad"
    assert str(warning) == "p.yaml:4:1: x: warning: meh"
    assert str(PolicyIssue("p.yaml", 2, 1, "", "syntax")) == "p.yaml:2:1: syntax"
    assert str(PolicyError([error, warning])) == f"{error}\n{warning}"


def test_format_path() -> None:
    assert format_path(("routes", 2, "fanout")) == "routes[2].fanout"
    assert format_path(("server", "trusted_proxies", 0)) == "server.trusted_proxies[0]"
    assert format_path(()) == ""


def test_all_errors_are_reported_not_only_the_first() -> None:
    issues = _issues(MINIMAL.replace("version: 1", "version: 1\nserver: {max_inflight: 0}")
                     .replace('path: "/users/{id}"}', 'path: "/users/{id}", timeout: 5}'))
    assert issues == [
        "p.yaml:2:24: server.max_inflight: 0 is below the minimum of 1",
        'p.yaml:7:60: routes[0].proxy.timeout: 5 is not a duration (e.g. 250ms, 2s, 1m)',
    ]


def test_on_stays_a_key_not_yaml_boolean_true() -> None:
    text = MINIMAL.replace('path: "/users/{id}"}',
                           'path: "/users/{id}", retries: {attempts: 2, on: [connect, 503]}}')
    retries = load_policy_text(text, "p.yaml").policy.routes[0].proxy.retries
    assert retries is not None
    assert retries.on == ("connect", 503)


def test_merge_keys_and_aliases_are_allowed() -> None:
    text = """\
version: 1
upstreams:
  users: &base {url: "http://127.0.0.1:9001", limit: {concurrency: 7}}
  orders:
    <<: *base
    url: "http://127.0.0.1:9002"
routes:
  - path: /a
    proxy: {upstream: orders, path: /a}
"""
    upstreams = load_policy_text(text, "p.yaml").policy.upstreams
    assert upstreams["orders"].url == "http://127.0.0.1:9002"
    assert upstreams["orders"].limit.concurrency == 7


def test_recursive_alias_is_an_error_not_a_hang() -> None:
    issues = _issues("version: 1\nroutes: &r [*r]\n")
    assert any("alias refers to the value that contains it" in issue for issue in issues)


def test_deep_nesting_is_refused_with_a_position() -> None:
    issues = _issues("version: 1\nroutes: " + "[" * 500 + "]" * 500 + "\n")
    assert issues == ["p.yaml:2:72: nested deeper than 64 levels"]


def test_unsupported_tag_is_reported_once() -> None:
    issues = _issues(MINIMAL.replace("version: 1", "version: !!python/object:os.system 1"))
    assert issues == ["p.yaml:1:10: version: unsupported YAML tag "
                      "'tag:yaml.org,2002:python/object:os.system'"]


def test_non_utf8_file_is_reported() -> None:
    with pytest.raises(PolicyError, match="not UTF-8") as caught:
        load_policy_text(b"version: 1\nroutes: \xff\n", "p.yaml")
    assert (caught.value.issues[0].line, caught.value.issues[0].column) == (2, 9)


def test_control_character_is_reported() -> None:
    assert _issues("version: 1\nroutes: \x00\n") == [
        "p.yaml:2:9: the file contains U+0000, which YAML does not allow"]


def test_secret_in_any_string_is_masked() -> None:
    text = MINIMAL.replace('path: "/users/{id}"}',
                           'path: "/users/{id}?next=redis://u:topsecret@cache/0"}')
    (issue,) = _issues(text)
    assert "topsecret" not in issue
    assert "secrets go in environment variables" in issue
    assert '"/users/{id}?next=redis://u:***@cache/0"' in issue


def test_password_key_is_called_a_secret() -> None:
    text = """\
version: 1
upstreams:
  db: {postgres: {dsn_env: DATABASE_URL, password: hunter2}}
routes:
  - path: /a/{id}
    sql: {upstream: db, query: "SELECT 1 WHERE $1 > 0", args: [path.id:int]}
"""
    assert _issues(text) == [
        "p.yaml:3:42: upstreams.db.postgres.password: unknown key 'password': secrets go in "
        "environment variables, never inline; name the variable in 'dsn_env'"]


def test_union_mode_with_a_mapping_reports_the_inner_error() -> None:
    text = MINIMAL.replace('    proxy: {upstream: users, path: "/users/{id}"}',
                           '    fanout: {mode: {quorum: 0}, calls: {u: {upstream: users, '
                           'path: "/users/{id}"}}}')
    assert _issues(text) == [
        "p.yaml:6:29: routes[0].fanout.mode.quorum: 0 is below the minimum of 1"]


# --------------------------------------------------------------------------- explain


def test_explain_demo_fanout_route() -> None:
    loaded = load_policy_file(ROOT / "policies" / "demo.yaml")
    text = explain_route(loaded, "/api/users/{id}/summary")
    lines = text.splitlines()
    assert lines[0].startswith("route: /api/users/{id}/summary  # routes[3]")
    assert "methods: [GET, HEAD]  # default for fanout and sql routes" in lines
    assert ("deadline: 800ms  # from the route; a client may shorten it with "
            "x-request-timeout-ms") in lines
    assert "  mode: all" in lines
    assert "  on_failure: partial" in lines
    user = lines.index("    user:")
    orders = lines.index("    orders:")
    assert user < orders
    user_block, orders_block = lines[user:orders], lines[orders:]
    assert "      upstream: users  # http://127.0.0.1:9001" in user_block
    assert "      timeout: 1s  # from defaults.call" in user_block
    assert ("      limit: {concurrency: 200, queue: 400, queue_timeout: 50ms}  "
            "# upstreams.users.limit") in user_block
    assert "      timeout: 300ms  # from the call" in orders_block
    assert "      retries: off  # built-in default" in orders_block
    assert "      circuit: off" in orders_block
    assert ("      pool: {max_connections: 100, idle_timeout: 30s, connect_timeout: 1s}"
            in orders_block)


def test_explain_matches_a_concrete_path() -> None:
    loaded = load_policy_file(ROOT / "policies" / "demo.yaml")
    assert explain_route(loaded, "/api/users/42/summary").startswith(
        "route: /api/users/{id}/summary")
    assert explain_route(loaded, "/api/users/42").startswith("route: /api/users/{id}  #")


def test_explain_picks_the_route_the_gateway_would() -> None:
    # An encoded literal matches its decoded request segment, a tail the bare prefix
    # ("/api/up/"): explain used to compare templates as text and name other routes.
    loaded = load_policy_text("""\
version: 1
upstreams:
  up: {url: "http://127.0.0.1:9"}
routes:
  - path: /api/files/my%20docs
    proxy: {upstream: up, path: /docs}
  - path: /api/up/{rest*}
    proxy: {upstream: up, path: "/{rest}"}
  - path: /{rest*}
    proxy: {upstream: up, path: "/fallback/{rest}"}
""", "p.yaml")
    assert explain_route(loaded, "/api/files/my%20docs").startswith("route: /api/files/my%20docs")
    assert explain_route(loaded, "/api/files/my%2520docs").startswith("route: /{rest*}")
    assert explain_route(loaded, "/api/up/").startswith("route: /api/up/{rest*}")
    assert explain_route(loaded, "/api/up/a?x=1").startswith("route: /api/up/{rest*}")
    # Dot segments resolve before routing: this request is served by the catch-all.
    assert explain_route(loaded, "/api/up/a/../../x").startswith("route: /{rest*}")


def test_a_route_after_a_tail_that_covers_its_trailing_slash_is_never_reached() -> None:
    loaded = load_policy_text("""\
version: 1
upstreams:
  up: {url: "http://127.0.0.1:9"}
routes:
  - path: /api/up/{rest*}
    proxy: {upstream: up, path: "/{rest}"}
  - path: /api/up/
    proxy: {upstream: up, path: /index}
""", "p.yaml")
    assert [w.message for w in loaded.warnings if "never reached" in w.message], \
        loaded.warnings


def test_explain_says_a_call_that_may_write_is_never_hedged() -> None:
    # The upstream's hedge_after and reset retries are inherited, but a statement that
    # may write runs once, like a POST: explain must not promise what never happens.
    loaded = load_policy_text("""\
version: 1
upstreams:
  db:
    postgres: {dsn_env: GATEWAY_TEST_DSN}
    call: {hedge_after: 20ms, retries: {attempts: 3, on: [connect, reset, timeout]}}
routes:
  - path: /api/log/{id}
    sql: {upstream: db, query: "INSERT INTO log VALUES ($1)", args: ["path.id:int"]}
  - path: /api/read/{id}
    sql: {upstream: db, query: "SELECT v FROM log WHERE v = $1", args: ["path.id:int"]}
""", "p.yaml")
    writes = explain_route(loaded, "/api/log/5")
    assert "hedge: off  # the statement may write, and a write is never hedged" in writes
    assert "# may write: retried only after a connect failure" in writes
    reads = explain_route(loaded, "/api/read/5")
    assert "hedge: after 20ms" in reads and "may write" not in reads


def test_explain_unknown_route(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    out = io.StringIO()
    assert run_check(["policies/demo.yaml"], explain="/nope", out=out) == 1
    assert "policies/demo.yaml: no route matches '/nope'" in out.getvalue()


def test_explain_resolution_order() -> None:
    text = """\
version: 1
defaults: {deadline: 3s, call: {timeout: 2s}}
upstreams:
  a:
    url: http://127.0.0.1:9001
    call: {timeout: 700ms, retries: {attempts: 3}, hedge_after: 50ms}
    circuit: {failure_ratio: 40%}
routes:
  - path: /x
    proxy: {upstream: a, path: /x, hedge_after: 20ms}
"""
    out = explain_route(load_policy_text(text, "p.yaml"), "/x")
    assert "deadline: 3s  # from defaults.deadline" in out
    assert "timeout: 700ms  # from upstreams.a.call" in out
    assert "retries: {attempts: 3, on: [connect, reset, 502, 503, 504], backoff: 20ms..200ms}"\
        "  # from upstreams.a.call; budget: 20% of first tries, at least 10/s, shared by " \
        "every call to a (from upstreams.a.call.retries)" in out
    assert "hedge: after 20ms, at most 1 extra  # from the call" in out
    assert "circuit: {opens at 40% failures over 10s (min 20); open for 5s, 3 probes}" in out


# --------------------------------------------------------------------------- never crash


def _check_never_crashes(text: str | bytes) -> None:
    issues: tuple[PolicyIssue, ...] = ()
    try:
        loaded = load_policy_text(text, "fuzz.yaml")
    except PolicyError as exc:
        issues = exc.issues
        assert issues
    else:
        assert loaded.policy.version == 1
    for issue in issues:
        assert str(issue).startswith("fuzz.yaml")
        assert issue.line >= 0


_yamlish = st.lists(st.sampled_from([
    *"ab01 :-[]{},\n\t\"'&*!|>#%@.?/\x00",
    "version: 1\n", "routes:\n", "  - path: /a\n", "    proxy: {upstream: u, path: /a}\n",
    "upstreams: {u: {url: http://h}}\n", "mode: ", "timeout: 1s", "&a ", "*a", "<<: ",
    "!!set ", "!!binary ", "2001-12-14", "on: ", "\n  ", "\n    ",
]), max_size=60).map("".join)

_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False),
                     st.text(max_size=20), st.sampled_from(["1s", "20%", "/a/{id}", "all",
                                                            "20ms..1s", "http://h:1"]))
_keys = st.one_of(st.text(max_size=10), st.sampled_from(
    ["version", "routes", "upstreams", "server", "defaults", "path", "proxy", "fanout", "sql",
     "calls", "upstream", "url", "mode", "timeout", "retries", "on", "limit", "postgres"]))
_structures = st.recursive(
    _scalars,
    lambda children: st.one_of(st.lists(children, max_size=4),
                               st.dictionaries(_keys, children, max_size=5)),
    max_leaves=30)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_yamlish)
def test_yamlish_text_never_crashes(text: str) -> None:
    _check_never_crashes(text)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_structures)
def test_arbitrary_structures_never_crash(value: object) -> None:
    _check_never_crashes(yaml.safe_dump(value, allow_unicode=True))
    if isinstance(value, dict):
        _check_never_crashes(yaml.safe_dump({"version": 1, **value}))


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_never_crash(data: bytes) -> None:
    _check_never_crashes(data)


def test_version_is_sha256_prefix_of_file_bytes(tmp_path: Path) -> None:
    import hashlib

    path = tmp_path / "p.yaml"
    path.write_bytes(MINIMAL.encode())
    loaded = load_policy_file(os.fspath(path))
    assert loaded.version == hashlib.sha256(MINIMAL.encode()).hexdigest()[:12]


def test_schema_defaults_are_written_as_a_policy_file_writes_them() -> None:
    # An editor completing from the schema offered `queue_timeout: 0.05`, which the
    # loader refuses: durations, percents and ranges are text with their unit.
    schema = policy_json_schema()
    wrong = [f"{model}.{name}: {prop['default']!r}"
             for model, definition in schema["$defs"].items()
             for name, prop in definition.get("properties", {}).items()
             if prop.get("type") == "string" and "default" in prop
             and not (isinstance(prop["default"], str)
                      and re.search(prop.get("pattern", ""), prop["default"]))]
    assert not wrong
    limit = schema["$defs"]["LimitPolicy"]["properties"]
    retries = schema["$defs"]["RetryPolicy"]["properties"]
    assert (limit["queue_timeout"]["default"], retries["budget"]["default"],
            retries["backoff"]["default"]) == ("50ms", "20%", "20ms..200ms")
    text = f"""version: 1
upstreams:
  a:
    url: "http://127.0.0.1:1"
    limit: {{queue_timeout: {limit['queue_timeout']['default']}}}
    call: {{retries: {{budget: {retries['budget']['default']},
                       backoff: {retries['backoff']['default']}}}}}
routes:
  - path: /x
    proxy: {{upstream: a, path: /x}}
"""
    assert load_policy_text(text, "p.yaml").policy.upstreams["a"].limit.queue_timeout == 0.05


MINIMAL = """\
version: 1
upstreams:
  users: {url: "http://127.0.0.1:9001"}
routes:
  - path: /api/users/{id}
    proxy: {upstream: users, path: "/users/{id}"}
"""


def test_a_mapping_that_merges_itself_is_a_policy_error_not_a_crash() -> None:
    # README: anchors, aliases and merge keys are allowed; the loader promises that a
    # recursive alias fails "with a message instead of eating the worker". A merge key
    # naming its own mapping recursed until RecursionError: `gateway check` printed a
    # 1,000-frame traceback, and a reload failed with "RecursionError".
    text = MINIMAL + "server: &x {<<: *x}\n"
    with pytest.raises(PolicyError) as caught:
        load_policy_text(text, "p.yaml")
    issues = [str(issue) for issue in caught.value.issues]
    assert any(issue.startswith("p.yaml:7:") for issue in issues), issues


def _merge_bomb(levels: int) -> str:
    """A few hundred bytes: each level merges the one below ten times; the bottom is an
    empty mapping, so no value is ever converted (and none is counted)."""
    lines = [MINIMAL.rstrip("\n"), "defaults:", "  a0: &a0 {}"]
    for level in range(1, levels + 1):
        refs = ", ".join([f"*a{level - 1}"] * 10)
        lines.append(f"  a{level}: &a{level} {{<<: [{refs}]}}")
    return "\n".join(lines) + "\n"


async def test_a_merge_key_bomb_is_refused_quickly(tmp_path: Path) -> None:
    # The file is capped at 100 000 values "aliases counted each time they are used",
    # so alias bombs fail with a message. Merges of an empty mapping are not counted:
    # a 700-byte file of 10 levels makes `gateway check` (and a reload, holding the
    # reload lock in a thread) run for hours (10x longer per level; 6 levels: ~0.4 s).
    path = tmp_path / "bomb.yaml"
    text = _merge_bomb(10)
    assert len(text) < 1000
    path.write_text(text)
    with trio.fail_after(20):
        result = await trio.run_process(
            [sys.executable, "-m", "gateway", "check", str(path)], cwd=ROOT,
            capture_stdout=True, capture_stderr=True, check=False)
    output = result.stdout.decode()
    assert result.returncode == 1, output + result.stderr.decode()
    assert "bomb.yaml:" in output


def test_explain_does_not_promise_hedges_for_a_route_that_only_takes_post() -> None:
    # `check --explain` prints "what a request meets". A proxy route whose methods are
    # all non-idempotent (POST) is never hedged (_attempts: hedge only for idempotent
    # methods) and retried only after a connect failure, as explain already says for a
    # fan-out POST call ("hedge: off  # the call may write"). For the proxy route it
    # prints "hedge: after 100ms, at most 1 extra" and plain retries, which never happen.
    text = """\
version: 1
upstreams:
  orders: {url: "http://127.0.0.1:9002"}
routes:
  - path: /api/orders
    methods: [POST]
    proxy: {upstream: orders, path: /orders, hedge_after: 100ms, retries: {attempts: 3}}
"""
    explained = explain_route(load_policy_text(text, "p.yaml"), "/api/orders")
    hedge = next(line for line in explained.splitlines() if "hedge:" in line)
    assert "after 100ms" not in hedge, explained


def test_the_schema_uses_only_json_schema_keywords() -> None:
    # policies/policy.schema.json (what `gateway schema` prints) gives routes[].deadline
    # a pydantic constraint, "gt": 0, as if it were a JSON Schema keyword. There is no
    # such keyword (exclusiveMinimum, and it is for numbers; the value is a string):
    # strict validators (ajv, the default of ajv-cli) refuse to compile the schema, so a
    # CI step validating policy files against it fails. defaults.deadline, with the same
    # constraint, has none.
    stray: list[str] = []

    def walk(node: object, where: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key in {"gt", "ge", "lt", "le"}:
                    stray.append(f"{where}.{key}")
                walk(value, f"{where}.{key}")
        elif isinstance(node, list):
            for index, value in enumerate(node):
                walk(value, f"{where}[{index}]")

    walk(policy_json_schema(), "$")
    walk(json.loads((ROOT / "policies" / "policy.schema.json").read_text()), "file")
    assert stray == []


def _schema_accepts(node: dict, value: object) -> bool:
    """Whether a field's schema (its keywords the policy schema uses for values with a
    unit: ``anyOf``, ``type``, ``minimum``, ``maximum``, ``pattern``, ``not``) takes
    ``value``."""
    for branch in node.get("anyOf", [node]):
        if branch.get("type") == "integer" and type(value) is int:
            if branch.get("minimum", value) <= value <= branch.get("maximum", value):
                return True
        elif (branch.get("type") == "string" and isinstance(value, str)
              # ECMA-262's \d, as editors read the schema, is ASCII only
              and re.search(branch.get("pattern", ""), value, re.ASCII)
              and not re.search(branch.get("not", {}).get("pattern", "(?!)"), value,
                                re.ASCII)):
            return True
    return False


def _loads(text: str) -> bool:
    try:
        load_policy_text(text, "p.yaml")
    except PolicyError:
        return False
    return True


_UPSTREAM = """\
version: 1
upstreams:
  users: {url: "http://127.0.0.1:9001", SETTING}
routes:
  - path: /api/users/{id}
    ROUTEproxy: {upstream: users, path: "/users/{id}"PROXY}
"""


def _upstream(setting: str = "", route: str = "", proxy: str = "") -> str:
    return (_UPSTREAM.replace("SETTING", setting).replace("ROUTE", route)
            .replace("PROXY", proxy))


#: Where each bounded field with a unit is written: (its model in the schema, the field,
#: a policy writing it as VALUE).
_BOUNDED_FIELDS = [
    ("LimitsPolicy", "max_header_bytes", MINIMAL + "server: {limits: {max_header_bytes: VALUE}}\n"),
    ("LimitsPolicy", "max_upstream_header_bytes",
     MINIMAL + "server: {limits: {max_upstream_header_bytes: VALUE}}\n"),
    ("LimitsPolicy", "max_body", MINIMAL + "server: {limits: {max_body: VALUE}}\n"),
    ("LimitsPolicy", "body_timeout", MINIMAL + "server: {limits: {body_timeout: VALUE}}\n"),
    ("LimitsPolicy", "response_timeout",
     MINIMAL + "server: {limits: {response_timeout: VALUE}}\n"),
    ("LimitsPolicy", "discard_body",
     MINIMAL + "server: {limits: {discard_body: VALUE, lingering_bytes: 1GiB}}\n"),
    ("LimitsPolicy", "lingering_bytes", MINIMAL + "server: {limits: {lingering_bytes: VALUE, "
     "discard_body: 0}}\n"),
    ("LimitsPolicy", "lingering_time", MINIMAL + "server: {limits: {lingering_time: VALUE}}\n"),
    ("ServerPolicy", "send_timeout", MINIMAL + "server: {send_timeout: VALUE}\n"),
    ("ServerPolicy", "log_sample", MINIMAL + "server: {log_sample: VALUE}\n"),
    ("ServerPolicy", "max_loop_lag", MINIMAL + "server: {max_loop_lag: VALUE}\n"),
    ("DefaultsPolicy", "deadline", MINIMAL + "defaults: {deadline: VALUE}\n"),
    ("PoolPolicy", "connect_timeout", _upstream("pool: {connect_timeout: VALUE}")),
    ("PoolPolicy", "idle_timeout", _upstream("pool: {idle_timeout: VALUE}")),
    ("CircuitPolicy", "failure_ratio", _upstream("circuit: {failure_ratio: VALUE}")),
    ("CircuitPolicy", "window", _upstream("circuit: {window: VALUE}")),
    ("CircuitPolicy", "open_for", _upstream("circuit: {open_for: VALUE}")),
    ("Route", "deadline", _upstream(route="deadline: VALUE\n    ")),
    ("Route", "max_body", _upstream(route="max_body: VALUE\n    ")),
    ("ProxyAction", "timeout", _upstream(proxy=", timeout: VALUE")),
]
_SIZES = [0, 1, 1023, 1024, "0", "0B", "1", "1023", "1024", "01024B", "1023B", "0KiB",
          "1KiB", "1KB", "2KB", "16KiB", "1MB", "1GiB", "00KiB", "10 KiB", "-1", "1kib",
          # the loader's ceiling, 2**63 - 1 bytes, in each unit; fullwidth and Arabic-Indic digits
          2**63 - 1, 2**63, 10**19, str(2**63 - 1), str(2**63), "9007199254740991KiB",
          "9007199254740992KiB", "8589934591GiB", "8589934592GiB", "9223372036GB",
          "9223372037GB", "99999999999GiB", "0009223372036854775807B", "\uff11KiB", "\u0663MB",
          # a ceiling of 1GiB (discard_body, lingering_bytes), in each unit
          2**30, 2**30 + 1, "1GiB", "1024MiB", "1025MiB", "1048576KiB", "1048577KiB",
          "1073741824", "1073741825B", "1073MB", "1074MB", "1073741KB", "1073742KB", "2GB"]
_DURATIONS = ["0s", "0ms", "00s", "0.0s", "0.000h", "0.5ms", "1s", "10ms", "1.0s", "05m",
              "0.01s", "250ms", "1", "1 s", ".5s",
              # the loader's ceiling, a year, in each unit; fullwidth and Arabic-Indic digits
              "8760h", "8760.0h", "8760.000h", "8760.5h", "8760.0001h", "8761h", "9000h",
              "525600m", "525601m", "31536000s", "31536000.5s", "31536001s",
              "31536000000ms", "31536000001ms", "008760h", "\uff12s", "\u0663s", "\uff11\uff10ms",
              # a ceiling of a minute (lingering_time), in each unit: 1/60 h never ends
              "60s", "060s", "60.0s", "60.001s", "61s", "1m", "1.0m", "1.01m", "2m", "60000ms",
              "60000.5ms", "60001ms", "0.01h", "0.0166h", "0.01666666h", "0.0167h",
              "0.016667h", "0.02h", "0.1h", "1h"]
_PERCENTS = ["0%", "0.0%", "000%", "0.5%", "1%", "50%", "99.99%", "100%", "100.0%",
             "0100%", "100.5%", "101%", "150%", "1000%", ".5%", "50", "\uff15\uff10%"]


@pytest.mark.parametrize(("model", "field", "policy"), _BOUNDED_FIELDS,
                         ids=[f"{m}.{f}" for m, f, _ in _BOUNDED_FIELDS])
def test_the_schema_takes_the_values_the_loader_takes(model: str, field: str,
                                                      policy: str) -> None:
    # policies/policy.schema.json is what editors check a policy file against. A
    # field's bound on a value with a unit was lost in it (its type's schema replaces
    # the field's): it said `minimum: 0` for max_header_bytes, which the loader refuses
    # below 1KiB, and any `\d+%` for log_sample, refused above 100%; so `0s` timeouts and
    # a 0% failure_ratio. The editor showed clean what `check` refuses.
    node = policy_json_schema()["$defs"][model]["properties"][field]
    values = [*_SIZES, *_DURATIONS, *_PERCENTS]
    differ = [f"{value!r}: loader {'takes' if loads else 'refuses'} it, schema "
              f"{'takes' if accepts else 'refuses'} it"
              for value in values
              if (loads := _loads(policy.replace("VALUE", json.dumps(value))))
              != (accepts := _schema_accepts(node, value))]
    assert not differ, differ
    assert any(_schema_accepts(node, value) for value in values)


@settings(max_examples=300, deadline=None)
@given(count=st.integers(0, 5000) | st.integers(0, 2**30), zeros=st.integers(0, 2),
       unit=st.sampled_from(["", "B", "KB", "MB", "GB", "KiB", "MiB", "GiB"]))
def test_the_schema_of_a_size_with_a_floor_is_the_loader_s(count: int, zeros: int,
                                                           unit: str) -> None:
    value = "0" * zeros + f"{count}{unit}"
    for field, other in (("max_header_bytes", ""), ("max_upstream_header_bytes", ""),
                         ("max_body", ""), ("discard_body", ", lingering_bytes: 1GiB"),
                         ("lingering_bytes", ", discard_body: 0")):
        node = policy_json_schema()["$defs"]["LimitsPolicy"]["properties"][field]
        policy = MINIMAL + f"server: {{limits: {{{field}: \"{value}\"{other}}}}}\n"
        assert _loads(policy) == _schema_accepts(node, value), (field, value)


@pytest.mark.parametrize(("text", "field"), [
    ("server:\n  limits: {max_header_bytes: 0}\n", ["LimitsPolicy", "max_header_bytes"]),
    ("server:\n  limits: {max_header_bytes: 512B}\n", ["LimitsPolicy", "max_header_bytes"]),
    ("server:\n  log_sample: 150%\n", ["ServerPolicy", "log_sample"]),
], ids=["max_header_bytes: 0", "max_header_bytes: 512B", "log_sample: 150%"])
def test_the_committed_schema_refuses_what_the_loader_refuses(text: str,
                                                               field: list[str]) -> None:
    with pytest.raises(PolicyError):
        load_policy_text(MINIMAL + text, "p.yaml")
    committed = json.loads((ROOT / "policies" / "policy.schema.json").read_text())
    node = committed["$defs"][field[0]]["properties"][field[1]]
    value = yaml.safe_load(text)["server"]
    value = value.get("limits", value)
    assert not _schema_accepts(node, value[field[1]]), node


@pytest.mark.parametrize(("limits", "where"), [
    ("discard_body: 2MiB", "server.limits.discard_body"),
    ("lingering_bytes: 32KiB", "server.limits.lingering_bytes"),
    ("lingering_bytes: 32KiB, discard_body: 48KiB", "server.limits.discard_body"),
])
def test_discard_body_above_lingering_bytes_is_refused_where_it_is_written(
        limits: str, where: str) -> None:
    # A connection kept for an unread rest of discard_body would be closed (reset)
    # once lingering_bytes of it were read: the answer would have promised a connection
    # its client then loses. The error names the field the file writes, at its line.
    text = MINIMAL + f"server:\n  limits: {{{limits}}}\n"
    with pytest.raises(PolicyError) as caught:
        load_policy_text(text, "p.yaml")
    (issue,) = caught.value.issues
    assert issue.path == where, issue
    assert issue.line == len(MINIMAL.splitlines()) + 2, issue
    assert "discard_body" in issue.message and "lingering_bytes" in issue.message


@pytest.mark.parametrize("field", ["response_timeout", "body_timeout"])
def test_a_zero_limit_that_would_cut_every_answer_is_refused(field: str) -> None:
    # 0s passed check: every admin answer (the probes included) or every request body
    # was then cut at once, and an orchestrator would kill a healthy gateway.
    text = MINIMAL + f"server:\n  limits: {{{field}: 0s}}\n"
    with pytest.raises(PolicyError, match=field):
        load_policy_text(text, "p.yaml")


def test_merges_of_non_mappings_count_against_the_expansion_cap():
    # The loader bounds what a file expands to (MAX_NODES values, merges included) so
    # that a small file cannot make ``check`` or a reload run for long. A merge whose
    # source is not a mapping (``<<: [*scalar, ...]``) is reported ("'<<' merges
    # mappings only") but never counted, and neither is the mapping it sits in beyond
    # one value: a 1.5 KB file reusing such a mapping by aliases takes minutes (each
    # further level of aliases multiplies it by 10). It should be refused (or read)
    # within the cap, in well under a second of work.
    sources = ", ".join(["*s"] * 300)
    lines = ["x: &s v", f"x0: &m {{<<: [{sources}]}}"]
    for level, (name, inner) in enumerate([("a", "m"), ("b", "a"), ("c", "b"), ("d", "c"),
                                           ("e", "d")], start=1):
        lines.append(f"x{level}: &{name} [" + ", ".join([f"*{inner}"] * 10) + "]")
    text = "\n".join(lines) + "\nversion: 1\n"
    assert len(text) < 2000
    script = textwrap.dedent("""
        import sys
        from gateway._policy_loader import PolicyError, load_policy_text
        try:
            load_policy_text(sys.stdin.read(), "p.yaml")
        except PolicyError:
            pass
    """)
    try:
        subprocess.run([sys.executable, "-c", script], input=text, text=True,
                       cwd=ROOT, timeout=10, check=True,
                       capture_output=True)
    except subprocess.TimeoutExpired:
        pytest.fail("a 1.5 KB policy file was still being loaded after 10 s")


# --------------------------------------------------------------------------- edge values

_HUGE = "1" + "0" * 309  # digits enough for float() to make infinity


@pytest.mark.parametrize(("field", "value", "message"), [
    ("shed_retry_after", _HUGE + "s", "too long"),
    ("shed_retry_after", "9000h", "too long"),
    ("max_loop_lag", _HUGE + "ms", "too long"),
])
def test_a_duration_past_a_year_is_refused(field, value, message) -> None:
    # 310 digits passed check as float("inf"), and a shed request then failed with a
    # 500 (OverflowError formatting Retry-After) instead of its 503.
    text = f"version: 1\nserver:\n  {field}: {value}\nroutes: []\n"
    with pytest.raises(PolicyError) as caught:
        load_policy_text(text, "p.yaml")
    (issue,) = [i for i in caught.value.issues if i.path.startswith("server")]
    assert issue.line == 3 and issue.path == f"server.{field}" and message in issue.message


@pytest.mark.parametrize(("line", "path"), [
    ('server: {request_id_header: "x-id\\n"}', "server.request_id_header"),
    ('server: {deadline_header: "x-deadline\\n"}', "server.deadline_header"),
    ('upstreams: {users: {url: "http://127.0.0.1:9001\\n"}}', "upstreams.users.url"),
])
def test_a_header_name_or_url_ending_in_a_newline_is_refused(line, path) -> None:
    # A pattern ending in $ matches before a final newline: the name and the URL were
    # taken with the newline in them.
    with pytest.raises(PolicyError) as caught:
        load_policy_text(f"version: 1\n{line}\nroutes: []\n", "p.yaml")
    assert path in [issue.path for issue in caught.value.issues]


def test_a_size_too_large_is_refused_plainly() -> None:
    for value in ("9" * 5000 + "KiB", "9" * 30, "99999999999GiB"):
        with pytest.raises(PolicyError) as caught:
            load_policy_text(f"version: 1\nserver:\n  limits: {{max_body: {value}}}\n"
                             "routes: []\n", "p.yaml")
        (issue,) = [i for i in caught.value.issues if i.path.startswith("server")]
        assert "too large" in issue.message and "sys.set_int" not in issue.message
        assert len(str(issue)) < 200, str(issue)


def test_a_size_with_leading_zeros_is_its_value() -> None:
    assert parse_size("00000000000000000001KiB") == 1024


def test_routes_that_differ_only_in_encoding_shadow_each_other() -> None:
    # Routing compares decoded segments: /a%2Db is /a-b, and was never reached unwarned.
    loaded = load_policy_text("""\
version: 1
upstreams:
  u: {url: "http://127.0.0.1:9"}
routes:
  - path: /a-b
    proxy: {upstream: u, path: /x}
  - path: /a%2Db
    proxy: {upstream: u, path: /y}
""", "p.yaml")
    assert [w.path for w in loaded.warnings] == ["routes[1].path"], loaded.warnings


def _policy_of_routes(paths: list[tuple[str, list[str] | None]]) -> str:
    lines = ["version: 1", "upstreams:", '  u: {url: "http://127.0.0.1:9"}', "routes:"]
    for path, methods in paths:
        named = "" if methods is None else f", methods: [{', '.join(methods)}]"
        lines.append(f'  - {{path: "{path}"{named}, proxy: {{upstream: u, path: /x}}}}')
    return "\n".join(lines) + "\n"


def test_the_shadowed_route_check_does_work_in_proportion_to_the_routes(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Every route was compared with every earlier one: a valid file of 7,000 routes
    # took about 10 s to check or load (a reload held up for as long). Each route's
    # segments are now decoded once, and looked up among the earlier routes' shapes.
    import gateway._policy

    decoded = [0]
    unquote = gateway._policy.unquote

    def counting(text: str) -> str:
        decoded[0] += 1
        return unquote(text)

    monkeypatch.setattr(gateway._policy, "unquote", counting)
    paths: list[tuple[str, list[str] | None]] = [
        (f"/api/s{i}/items/{{id}}", None) for i in range(3000)]
    paths.insert(1000, ("/api/s10/items/42", ["GET"]))  # after routes[10]
    paths.insert(2000, ("/api/s20/items/{other}", None))  # after routes[20]
    paths.append(("/api/s30/items/{id}", ["POST", "DELETE"]))
    paths.append(("/{rest*}", None))
    loaded = load_policy_text(_policy_of_routes(paths), "p.yaml")
    assert [(w.path, w.message) for w in loaded.warnings] == [
        ("routes[1000].path", "never reached: routes[10] ('/api/s10/items/{id}') matches "
         "every request it would"),
        ("routes[2000].path", "never reached: routes[20] ('/api/s20/items/{id}') matches "
         "every request it would"),
        ("routes[3002].path", "never reached: routes[30] ('/api/s30/items/{id}') matches "
         "every request it would")]
    # Four segments a route (the path check decodes them too): a pairwise comparison
    # decodes some 4.5 million.
    assert decoded[0] <= 10 * len(paths), decoded[0]


def _covers_as_routing_does(general: list[str], specific: list[str]) -> bool:
    """Whether a route of ``general`` segments matches every request path ``specific``
    matches, one pair at a time (the plain definition the fast check must agree with)."""
    from urllib.parse import unquote

    param = re.compile(r"\{[A-Za-z_][A-Za-z0-9_]*(\*?)\}")
    for position, piece in enumerate(general):
        match = param.fullmatch(piece)
        if match and match[1]:
            return len(specific) > position
        if position >= len(specific):
            return False
        other = specific[position]
        other_match = param.fullmatch(other)
        if match:
            if (other_match and other_match[1]) or other == "":
                return False
            continue
        if other_match or unquote(other) != unquote(piece):
            return False
    return len(general) == len(specific)


_SEGMENTS = st.sampled_from(["a", "b", "%62", "a%2Db", "a-b", "{p}"])
_ENDS = st.sampled_from(["", "/", "/{t*}", "/{p}"])
_METHODS = st.sampled_from([None, ["GET"], ["POST"], ["GET", "POST"], ["HEAD"]])


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.lists(_SEGMENTS, max_size=3), _ENDS, _METHODS),
                min_size=1, max_size=12))
def test_the_shadowed_routes_are_those_an_earlier_route_always_answers(
        shapes: list[tuple[list[str], str, list[str] | None]]) -> None:
    paths: list[tuple[str, list[str] | None]] = []
    for segments, end, methods in shapes:
        pieces = [f"{{p{i}}}" if piece == "{p}" else piece for i, piece in enumerate(segments)]
        path = "/" + "/".join(pieces) + end.replace("{p}", "{q}")
        paths.append((path.replace("//", "/"), methods))
    loaded = load_policy_text(_policy_of_routes(paths), "p.yaml")
    expected = []
    for index, (path, methods) in enumerate(paths):
        allowed = set(methods or ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"])
        for earlier, (earlier_path, earlier_methods) in enumerate(paths[:index]):
            earlier_allowed = set(earlier_methods or ["GET", "HEAD", "POST", "PUT", "PATCH",
                                                      "DELETE", "OPTIONS"])
            if "GET" in earlier_allowed:
                earlier_allowed.add("HEAD")
            if "GET" in allowed:
                allowed.add("HEAD")
            if allowed <= earlier_allowed and _covers_as_routing_does(
                    earlier_path[1:].split("/"), path[1:].split("/")):
                expected.append((f"routes[{index}].path", f"never reached: routes[{earlier}]"))
                break
    found = [(w.path, w.message.partition(" (")[0]) for w in loaded.warnings]
    assert found == expected, paths


def _issue_texts(text: str) -> list[str]:
    with pytest.raises(PolicyError) as caught:
        load_policy_text(text, "p.yaml")
    return [str(issue) for issue in caught.value.issues]


def test_an_error_in_an_overriding_mapping_points_at_the_override_not_the_anchor() -> None:
    # routes[1] reuses routes[0] with `<<: *r` and overrides `proxy` on line 11; the
    # error pointed at line 8, routes[0]'s valid proxy.
    text = """\
version: 1
upstreams:
  users: {url: "http://127.0.0.1:9001"}
routes:
  - &r
    path: /a
    deadline: 1s
    proxy: {upstream: users, path: /a}
  - <<: *r
    path: /b
    proxy: {path: /b}
"""
    assert _issue_texts(text) == [
        "p.yaml:11:5: routes[1].proxy: missing required key 'upstream'"]


def test_a_model_error_under_a_merge_points_at_the_line_that_holds_it() -> None:
    text = """\
version: 1
upstreams:
  db1: &pg
    postgres: {dsn_env: A, pool: {min: 1, max: 5}}
  db2:
    <<: *pg
    postgres: {dsn_env: B, pool: {min: 9, max: 5}}
routes:
  - path: /a
    sql: {upstream: db2, query: "SELECT 1"}
"""
    (issue,) = _issue_texts(text)
    assert issue.startswith("p.yaml:7:"), issue


def test_a_bound_error_under_a_merge_quotes_the_value_written_there() -> None:
    # It quoted "10s", the merged value the override replaced.
    text = """\
version: 1
upstreams:
  users: &base
    url: http://127.0.0.1:9001
    pool: {idle_timeout: 10s}
  orders:
    <<: *base
    url: http://127.0.0.1:9002
    pool: {idle_timeout: 0s}
routes:
  - path: /a
    proxy: {upstream: orders, path: /a}
"""
    assert _issue_texts(text) == [
        'p.yaml:9:26: upstreams.orders.pool.idle_timeout: "0s" must be above 0']


@pytest.mark.parametrize("route_path", ["/api//users", "/api/./users", "/api/v1/../users",
                                        "/api/%2e%2e/users"])
def test_a_route_path_no_request_can_match_is_refused(route_path) -> None:
    # Requests are normalised before routing, so such a route was a silent 404.
    text = f"""\
version: 1
upstreams:
  users: {{url: "http://127.0.0.1:9001"}}
routes:
  - path: {route_path}
    proxy: {{upstream: users, path: /seen}}
"""
    (issue,) = _issue_texts(text)
    assert issue.startswith("p.yaml:5:") and "routes[0].path" in issue, issue


def test_a_duplicate_anchor_is_named_in_the_message() -> None:
    # It said only "second occurrence".
    text = """\
version: 1
upstreams:
  users: &base {url: "http://127.0.0.1:9001"}
  orders: &base {url: "http://127.0.0.1:9002"}
"""
    (issue,) = _issue_texts(text)
    assert issue.startswith("p.yaml:4:")
    assert "duplicate anchor 'base' (first on line 3)" in issue, issue


def test_a_second_document_in_the_file_is_explained() -> None:
    # It said only "but found another document".
    (issue,) = _issue_texts("version: 1\n---\nversion: 1\n")
    assert issue.startswith("p.yaml:2:1: ") and "one document" in issue, issue


def test_an_sql_route_runs_a_query_not_an_http_call() -> None:
    # `sql: {upstream: users, path: ...}` passed check, then every request was a 502
    # "postgres upstream 'users' is not running".
    text = """\
version: 1
upstreams:
  users: {url: "http://127.0.0.1:9001"}
routes:
  - path: /api/users/{id}
    sql: {upstream: users, path: "/users/{id}"}
"""
    (issue,) = _issue_texts(text)
    assert issue.startswith("p.yaml:6:") and "routes[0].sql" in issue and "proxy" in issue, issue


def test_a_zero_max_loop_lag_is_refused() -> None:
    # 0ms passed check, and then an idle worker shed every request.
    text = "version: 1\nserver:\n  max_loop_lag: 0ms\nroutes: []\n"
    with pytest.raises(PolicyError) as caught:
        load_policy_text(text, "p.yaml")
    (issue,) = [i for i in caught.value.issues if i.path.startswith("server")]
    assert issue.line == 3 and "above 0" in issue.message, issue


def test_the_readme_check_sample_names_the_demo_policys_counts() -> None:
    out = io.StringIO()
    assert run_check([str(ROOT / "policies" / "demo.yaml")], out=out) == 0
    counts = out.getvalue().splitlines()[0].partition(", ")[2].rstrip(")")
    assert counts in (ROOT / "policies" / "README.md").read_text(), counts


def test_a_log_sample_above_all_requests_is_refused() -> None:
    # 150% was accepted: a share of requests is at most all of them (a slip of the
    # keyboard for 1.5%, say, would log every request).
    issues = _issues(MINIMAL.replace("version: 1", "version: 1\nserver: {log_sample: 150%}"))
    assert issues == ["p.yaml:2:22: server.log_sample: 150% is above 100%: it is a share "
                      "of requests (0% to 100%)"]
    every = load_policy_text(
        MINIMAL.replace("version: 1", "version: 1\nserver: {log_sample: 100%}"), "p.yaml")
    assert every.policy.server.log_sample == 1.0


@pytest.mark.parametrize("size", ["0", "1023", "1000B"])
def test_a_header_limit_no_request_could_meet_is_refused(size: str) -> None:
    # max_header_bytes: 0 was accepted, and every request (its Host header at least)
    # was a 431. The floor is 1KiB: a Host and the headers every client sends fit.
    text = MINIMAL.replace("version: 1",
                           f"version: 1\nserver: {{limits: {{max_header_bytes: {size}}}}}")
    shown, floor = (size, "1024") if size.isdigit() else (f'"{size}"', "1KiB")
    assert _issues(text) == [f"p.yaml:2:37: server.limits.max_header_bytes: {shown} is "
                             f"below the minimum of {floor}"]
    loaded = load_policy_text(text.replace(f"bytes: {size}", "bytes: 1KiB"), "p.yaml")
    assert loaded.policy.server.limits.max_header_bytes == 1024


@pytest.mark.parametrize(("size", "told"), [("2GiB", "1GiB"), ("1048577KiB", "1GiB"),
                                            ("1073741825", "1073741824")])
def test_a_size_past_its_ceiling_is_told_the_ceiling_in_the_units_it_was_written_in(
        size: str, told: str) -> None:
    # "2GiB is above the maximum of 1073741824" made the reader do the arithmetic.
    text = MINIMAL.replace("version: 1",
                           f"version: 1\nserver: {{limits: {{discard_body: {size}}}}}")
    shown = size if size.isdigit() else f'"{size}"'
    assert _issues(text) == [f"p.yaml:2:33: server.limits.discard_body: {shown} is "
                             f"above the maximum of {told}"]
