"""The OpenAPI description stays true: every route is in it, every error code the code can raise for a route is
listed for that route (found by walking the package's call graph), and docs/openapi.json is up to date."""

from __future__ import annotations

import ast
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from flask import Flask

from chatproxy import create_app
from chatproxy.callers import GUARDED_PREFIXES, identify_caller
from chatproxy.limits import hold_slots
from chatproxy.openapi import OPERATIONS, STREAM_ERRORS, app_operations, build_spec, docs_spec, dumps, openapi_path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "chatproxy"
# Errors that come from Flask/werkzeug rather than an ApiError(...) in our code, where a route can answer them.
FRAMEWORK = {(500, "internal_error"), (413, "payload_too_large")}
STATIC = {(404, "not_found")}  # Flask's static view
MODULES = frozenset(".".join(p.relative_to(PACKAGE).with_suffix("").parts) for p in PACKAGE.rglob("*.py"))
ADAPTERS = frozenset({"adapter", "writer"})  # pipeline.py and relay.py's names for the view's wire adapter
LIBRARY_NAMES = frozenset(
    {
        "update",
        "close",
        "values",
        "execute",
        "insert",
        "delete",
        "select",
        "get",
        "open",
        "create",
        "retrieve",
        "content",
        "read",
        "write",
        "begin",
        "connect",
        "dispose",
        "where",
        "status",
        "results",
        "parse",
        "run",
        "send",
        "start",
        "stop",
        "set",
        "pop",
        "items",
    }
)


@pytest.fixture
def full_app(settings_for) -> Flask:
    """An app with every optional part on: tokens, admin tokens, Redis not needed."""
    return create_app(settings_for(CHATPROXY_API_TOKENS="admin=sha256:" + "0" * 64, CHATPROXY_ADMIN_TOKENS="admin"))


# --- a small static call graph of the package ------------------------------------------------------------------


def _package_of(module: str, level: int) -> str:
    """The package a relative import of `level` dots in `module` starts from ("" is chatproxy itself)."""
    parts = module.split(".")[:-1]  # api.chat and api.__init__ are both in the package api
    return ".".join(parts[: len(parts) - (level - 1)] if level > 1 else parts)


def _join(package: str, name: str) -> str:
    """A module name inside `package`; a package's own names live in its __init__."""
    return f"{package}.{name}" if package else name


class CallGraph:
    """Functions of the chatproxy package by module, the names they call, and the error codes they raise."""

    def __init__(self) -> None:
        self.modules: dict[str, ast.Module] = {}
        self.functions: dict[tuple[str, str], list[ast.AST]] = {}  # (module, name) -> module-level defs
        self.methods: dict[str, list[tuple[str, ast.AST]]] = {}  # name -> [(module, def)] for class methods
        self.imports: dict[str, dict[str, tuple[str, str | None]]] = {}  # module -> alias -> (module, name|None)
        for path in sorted(PACKAGE.rglob("*.py")):
            module = ".".join(path.relative_to(PACKAGE).with_suffix("").parts)  # api.chat, batches.service
            tree = ast.parse(path.read_text(encoding="utf-8"))
            self.modules[module] = tree
            self.imports[module] = {}
            for node in tree.body:
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    self.functions.setdefault((module, node.name), []).append(node)
                elif isinstance(node, ast.ClassDef):
                    for item in node.body:
                        if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                            self.methods.setdefault(item.name, []).append((module, item))
                            self.functions.setdefault((module, f"{node.name}.{item.name}"), []).append(item)
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom) and node.level >= 1:
                    base = _package_of(module, node.level)
                    for alias in node.names:
                        source = _join(base, node.module) if node.module else base
                        if node.module is None or (source and f"{source}.{alias.name}" in MODULES):
                            # from . import usage / from ..batches import service: a module
                            self.imports[module][alias.asname or alias.name] = (_join(source, alias.name), None)
                        else:  # from .usage import Ledger
                            self.imports[module][alias.asname or alias.name] = (source, alias.name)

    def callees(self, module: str, node: ast.AST, root: str) -> Iterator[tuple[str, ast.AST]]:
        """The package functions `node` may call: by name through the module's imports, by method name otherwise.

        The pipeline calls the wire adapter the view handed it (`adapter.reply(...)`, `writer.done(...)`): those
        resolve to the classes of the view's own module, `root`, not to every adapter of the package."""
        for call in ast.walk(node):
            if not isinstance(call, ast.Call):
                continue
            func = call.func
            if isinstance(func, ast.Name):
                target = self.imports[module].get(func.id, (module, func.id))
                if target[1] is not None:
                    yield from ((target[0], n) for n in self.functions.get((target[0], target[1]), []))
                    yield from ((target[0], n) for n in self.functions.get((target[0], f"{target[1]}.__init__"), []))
            elif isinstance(func, ast.Attribute):
                owner = func.value.id if isinstance(func.value, ast.Name) else None
                imported = self.imports[module].get(owner) if owner else None
                if owner in ADAPTERS:
                    yield from ((m, n) for m, n in self.methods.get(func.attr, []) if m == root)
                    continue
                if imported is not None and imported[1] is None:  # cooldowns.of(...): a module's function
                    yield from ((imported[0], n) for n in self.functions.get((imported[0], func.attr), []))
                elif not func.attr.startswith("__"):  # meter.attempt(...): a method of that name
                    # Names that libraries use too (SQLAlchemy's table.update(), a stream's close()) only resolve
                    # to classes of the module itself or of modules it imports.
                    known = {module} | {source for source, _ in self.imports[module].values()}
                    yield from (
                        (m, n)
                        for m, n in self.methods.get(func.attr, [])
                        if m in known or func.attr not in LIBRARY_NAMES
                    )

    @staticmethod
    def is_generator(node: ast.AST) -> bool:
        """Its code runs after the response started: its errors are stream events, not HTTP statuses."""
        decorators = {getattr(d, "id", getattr(d, "attr", None)) for d in getattr(node, "decorator_list", [])}
        return "contextmanager" not in decorators and any(
            isinstance(n, (ast.Yield, ast.YieldFrom)) for n in ast.walk(node)
        )

    @staticmethod
    def raised(node: ast.AST) -> set[tuple[int, str]]:
        """ApiError(status, "code", ...) and invalid(...) written in `node`."""
        found = set()
        for call in ast.walk(node):
            if not isinstance(call, ast.Call):
                continue
            name = call.func.id if isinstance(call.func, ast.Name) else getattr(call.func, "attr", None)
            if name == "invalid":
                found.add((400, "invalid_request"))
            elif (
                name == "ApiError"
                and len(call.args) >= 2
                and isinstance(call.args[0], ast.Constant)
                and isinstance(call.args[1], ast.Constant)
            ):
                found.add((call.args[0].value, call.args[1].value))
        return found

    @staticmethod
    def event_codes(node: ast.AST) -> set[str]:
        """Codes of error events: error_event("code", ...) and ApiError(..., "code", ...) inside a generator."""
        codes = set()
        for call in ast.walk(node):
            if isinstance(call, ast.Call):
                name = call.func.id if isinstance(call.func, ast.Name) else getattr(call.func, "attr", None)
                if name == "error_event" and call.args and isinstance(call.args[0], ast.Constant):
                    codes.add(call.args[0].value)
        return codes

    def reachable(self, entries: list[tuple[str, ast.AST]]) -> tuple[set[tuple[int, str]], set[str]]:
        """HTTP errors raised before a response starts, and the codes of stream error events, from `entries`."""
        http, events, seen, todo = set(), set(), set(), [(m, n, False, m) for m, n in entries]
        while todo:
            module, node, streaming, root = todo.pop()
            if (id(node), streaming) in seen:
                continue
            seen.add((id(node), streaming))
            streaming = streaming or self.is_generator(node)
            if streaming:
                events |= self.event_codes(node) | {code for _, code in self.raised(node)}
            else:
                http |= self.raised(node)
            todo += [(m, n, streaming, root) for m, n in self.callees(module, node, root)]
        return http, events

    def definition(self, function) -> tuple[str, ast.AST] | None:
        """The AST of a live function object of the package."""
        if not function.__module__.startswith("chatproxy"):
            return None
        module = function.__module__.removeprefix("chatproxy").removeprefix(".") or "__init__"
        nodes = self.functions.get((module, function.__qualname__.replace(".<locals>.", ".")), [])
        return (module, nodes[0]) if nodes else None


GRAPH = CallGraph()


def _decorators(view) -> Iterator:
    """The factories of the access-rule decorators around a view (@token_required, @admin_required...)."""
    wrapper = view
    while hasattr(wrapper, "__wrapped__"):
        factory = wrapper.__code__.co_qualname.partition(".")[0]  # token_required.<locals>...guarded
        # functools.wraps gave the wrapper the view's module, which imports the factory by its name.
        found = getattr(sys.modules[wrapper.__module__], factory, None)
        if found is not None:
            yield found
        wrapper = wrapper.__wrapped__


def route_errors(app: Flask, rule) -> tuple[set[tuple[int, str]], set[str]]:
    """What a route can answer with: its view, the before_request hooks that run for it, the rate limiter."""
    entries = []
    blueprint = rule.endpoint.rpartition(".")[0] or None
    hooks = [*app.before_request_funcs.get(None, []), *app.before_request_funcs.get(blueprint, [])]
    guarded = rule.rule.startswith(GUARDED_PREFIXES)
    view = app.view_functions[rule.endpoint]
    for function in [view, *_decorators(view), *hooks]:
        if function in (identify_caller, hold_slots) and not guarded:  # they return at once outside /api/, /v1/
            continue
        found = GRAPH.definition(function)
        if found is not None:
            entries.append(found)
    if guarded or rule.endpoint in ("chat.page", "admin_page.sign_in"):  # limits._not_limited
        entries.append(("limits", GRAPH.functions[("limits", "_rate_limited")][0]))
    return GRAPH.reachable(entries)


def spec_errors(spec: dict, rule: str, method: str) -> set[tuple[int, str]]:
    """(status, code) pairs the spec lists for one operation."""
    responses = spec["paths"][openapi_path(rule)][method]["responses"]
    return {
        (int(status), code)
        for status, response in responses.items()
        if int(status) >= 400
        for code in response["content"]["application/json"]["schema"]["properties"]["error"]["properties"]["code"][
            "enum"
        ]
    }


# --- the tests ---------------------------------------------------------------------------------------------------


def test_every_route_is_described_and_every_description_is_a_route(full_app):
    served = app_operations(full_app)
    described = set(OPERATIONS)

    assert served - described == set(), "routes missing from chatproxy/openapi.py OPERATIONS"
    spec = build_spec(full_app)  # lists exactly what the app serves: an unregistered blueprint is left out
    assert {(path, method) for path, item in spec["paths"].items() for method in item} == {
        (openapi_path(rule), method) for rule, method in served
    }


def test_the_call_graph_finds_known_errors():
    """A guard against the analysis going blind: errors we know are raised on these paths are found."""
    app = create_app(
        {"OPENAI_API_KEY": "sk-test-graph-key", "CHATPROXY_DATABASE_URL": "sqlite://", "CHATPROXY_SECRET_KEY": "x"}
    )
    rules = {rule.rule: rule for rule in app.url_map.iter_rules()}
    http, events = route_errors(app, rules["/api/chat"])

    assert {
        (400, "invalid_request"),
        (401, "unauthorized"),
        (429, "budget_exceeded"),
        (503, "ledger_unavailable"),
        (503, "upstream_unavailable"),
        (422, "model_refused"),
        (502, "upstream_auth_failed"),
    } <= http
    assert {"upstream_truncated", "upstream_bad_response"} <= events
    assert (502, "upstream_truncated") not in http  # only ever an event: relay() is a generator


def test_every_error_the_code_can_raise_for_a_route_is_in_its_description(full_app):
    spec = build_spec(full_app)
    missing, extra = {}, {}
    for rule in full_app.url_map.iter_rules():
        http, _events = route_errors(full_app, rule)
        for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}):
            listed = spec_errors(spec, rule.rule, method.lower())
            if http - listed:
                missing[f"{method} {rule.rule}"] = sorted(http - listed)
            allowed = http | FRAMEWORK | (STATIC if rule.endpoint == "static" else set())
            if listed - allowed:
                extra[f"{method} {rule.rule}"] = sorted(listed - allowed)

    assert missing == {}, "codes the route can raise that chatproxy/openapi.py does not list"
    assert extra == {}, "codes chatproxy/openapi.py lists that the route cannot raise"


def test_stream_error_events_are_described(full_app):
    rules = {rule.rule: rule for rule in full_app.url_map.iter_rules()}
    _http, events = route_errors(full_app, rules["/api/chat"])
    spec = build_spec(full_app)

    error_event = spec["components"]["schemas"]["StreamEvent"]["oneOf"][-1]
    assert events <= set(error_event["properties"]["code"]["enum"]) == set(STREAM_ERRORS)


def test_every_status_the_router_raises_has_an_error_schema_with_request_id(full_app):
    spec = build_spec(full_app)
    error = spec["components"]["schemas"]["Error"]["properties"]["error"]
    assert error["required"] == ["code", "message"]
    assert set(error["properties"]) == {"code", "message", "request_id"}
    for path, item in spec["paths"].items():
        for method, operation in item.items():
            for status, response in operation["responses"].items():
                assert "X-Request-ID" in response["headers"], (path, method, status)
                if status in ("429", "503"):
                    assert "Retry-After" in response["headers"], (path, method, status)


def test_request_schemas_refuse_unknown_fields(full_app):
    spec = build_spec(full_app)
    for path, item in spec["paths"].items():
        for method, operation in item.items():
            if "requestBody" in operation:
                schema = operation["requestBody"]["content"]["application/json"]["schema"]
                assert schema["additionalProperties"] is False, (path, method)


def test_the_caps_in_the_spec_are_the_settings_in_force(settings_for):
    app = create_app(
        settings_for(
            CHATPROXY_MAX_MESSAGES=7,
            CHATPROXY_MAX_MESSAGE_CHARS=99,
            CHATPROXY_MODELS="a,b",
            CHATPROXY_DEFAULT_MODEL="a",
            CHATPROXY_FALLBACK_CHAIN="",
            CHATPROXY_MAX_IMAGES=5,
        )
    )
    body = build_spec(app)["paths"]["/api/chat"]["post"]["requestBody"]["content"]["application/json"]["schema"]

    assert body["properties"]["messages"]["maxItems"] == 7
    text, parts = body["properties"]["message"]["anyOf"]
    assert text["maxLength"] == 99
    assert "5 per request" in parts["description"]
    assert body["properties"]["messages"]["items"]["properties"]["content"]["anyOf"][0]["maxLength"] == 99
    assert body["properties"]["model"]["enum"] == ["a", "b", None]


def test_the_spec_is_served_at_api_openapi_json(client, app):
    response = client.get("/api/openapi.json")

    assert response.status_code == 200
    assert response.get_json() == json.loads(json.dumps(build_spec(app)))
    assert response.headers["Cache-Control"] == "no-store"


def test_docs_openapi_json_is_up_to_date():
    """Run `python -m chatproxy.openapi` after changing routes, schemas or OPERATIONS."""
    assert (ROOT / "docs" / "openapi.json").read_text(encoding="utf-8") == dumps(docs_spec())
