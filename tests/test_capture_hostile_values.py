"""capture_input/capture_output: redaction and hostile values."""

from __future__ import annotations

import argparse
import dataclasses
import types
from typing import Any, NamedTuple

import coworker
from coworker import attributes as attr


@dataclasses.dataclass
class _Inner:
    api_key: str
    n: int


@dataclasses.dataclass
class _Outer:
    inner: _Inner
    Token: str
    note: str


def test_capture_redacts_nested_keys_and_dataclasses(spans: Any) -> None:
    """Redaction applies at every depth, in dicts, kwargs and (nested) dataclasses."""

    @coworker.run(capture_input=True, capture_output=True)
    def call(payload: dict, obj: _Outer, **extra: Any) -> dict:
        return {"headers": {"Authorization": "Bearer out-secret"}, "ok": True}

    call(
        {"user": {"PassWord": "p1", "profile": {"session_key": "p2", "name": "ann"}}},
        _Outer(_Inner("p3", 1), "p4", "visible"),
        client_secret="p5",
    )
    (span,) = spans.get_finished_spans()
    text = span.attributes[attr.INPUT] + span.attributes[attr.OUTPUT]
    for secret in ("p1", "p2", "p3", "p4", "p5", "out-secret"):
        assert secret not in text
    assert "ann" in text and "visible" in text and '"ok":true' in text


def test_capture_survives_hostile_and_huge_values(spans: Any) -> None:
    """Recursive, unrepresentable, huge and unserializable values never break the call."""

    class BadRepr:
        def __repr__(self) -> str:
            raise ValueError("no repr")

    class Huge:
        def __repr__(self) -> str:
            return "x" * 200_000

    recursive: dict[str, Any] = {"password": "p"}
    recursive["self"] = recursive
    looped: list[Any] = []
    looped.append(looped)

    @coworker.run(capture_input=True, capture_output=True)
    def call(*values: Any) -> Any:
        return values[0]

    values = (recursive, looped, BadRepr(), Huge(), 10**5000, float("nan"), b"\x00" * 10)
    assert call(*values) is recursive
    (span,) = spans.get_finished_spans()
    for key in (attr.INPUT, attr.OUTPUT):
        assert len(span.attributes[key]) <= 4096
    assert '"p"' not in span.attributes[attr.INPUT]


class _Login(NamedTuple):
    user: str
    password: str


def test_capture_redacts_namedtuple_and_namespace_fields(spans: Any) -> None:
    """Secrets in NamedTuple and SimpleNamespace fields are redacted like dict keys."""

    @coworker.run(capture_input=True)
    def login(creds: Any, ns: Any) -> None:
        pass

    login(_Login("bob", "hunter2"), types.SimpleNamespace(user="bob", api_key="k-123"))
    (span,) = spans.get_finished_spans()
    captured = span.attributes[attr.INPUT]
    assert "bob" in captured
    assert "hunter2" not in captured
    assert "k-123" not in captured


def test_capture_redacts_argparse_namespace(spans: Any) -> None:
    """Secrets in argparse.Namespace attributes are redacted like dict keys."""

    @coworker.run(capture_input=True)
    def main(options: Any) -> None:
        pass

    main(argparse.Namespace(user="bob", password="hunter2"))
    (span,) = spans.get_finished_spans()
    assert "bob" in span.attributes[attr.INPUT]
    assert "hunter2" not in span.attributes[attr.INPUT]
