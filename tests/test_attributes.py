"""No attribute key coworker emits is also the namespace of another one.

A backend that nests dotted keys (an Elasticsearch/OpenSearch mapping, Phoenix's attribute
store) files ``a.b = 1`` under ``{"a": {"b": 1}}`` and ``a.b.c = 2`` under
``{"a": {"b": {"c": 2}}}``: with both, the mapping conflicts or one key lands off its path.
``coworker.audit`` was both the audit flag and the prefix of ``coworker.audit.category``; the
flag is ``coworker.audited`` now.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from coworker import _demo
from coworker import attributes as a

# Constants of coworker.attributes that are not attribute keys: values (categories, operation
# names, span kinds, mime types), metric names (their own namespace in every backend),
# prefixes, an event name, and the key coworker no longer writes.
_NOT_KEYS = ("METRIC_", "CATEGORY_", "GEN_AI_OP_", "OPENINFERENCE_", "MIME_")
_KEYS_AMONG_THEM = ("METRIC_ATTR_", "OPENINFERENCE_SPAN_KIND")
_NOT_KEY_NAMES = frozenset(
    {"BAGGAGE_PREFIX", "FLOW_METADATA_PREFIX", "AUDITED_LEGACY", "EXCEPTION_EVENT"}
)


def emitted_keys() -> set[str]:
    """Every span and metric attribute key named in coworker.attributes."""
    keys = set()
    for name, value in vars(a).items():
        if not name.isupper() or not isinstance(value, str) or name in _NOT_KEY_NAMES:
            continue
        if name.startswith(_NOT_KEYS) and not name.startswith(_KEYS_AMONG_THEM):
            continue
        keys.add(value)
    return keys


def namespace_conflicts(keys: Iterable[str]) -> list[tuple[str, str]]:
    """Pairs ``(key, other)`` where ``key`` is a dotted prefix (a namespace) of ``other``."""
    keys = sorted(set(keys))
    return [(k, o) for k in keys for o in keys if o.startswith(k + ".")]


def test_no_attribute_key_in_the_contract_is_the_namespace_of_another() -> None:
    """coworker.attributes names no key that another key nests under."""
    keys = emitted_keys()
    assert {a.AUDITED, a.AUDIT_CATEGORY, a.AUDIT_INTENT_SEQ, a.USER_ID, a.INPUT_VALUE} <= keys
    assert a.OPENINFERENCE_SPAN_KIND in keys and a.OPENINFERENCE_TOOL not in keys
    assert namespace_conflicts(keys) == []


def test_no_key_on_the_demo_spans_is_the_namespace_of_another(spans: Any) -> None:
    """The demo's real spans (flows, retries, an agent, usage, captured input) carry no key
    that is also the prefix of another key on any of them."""
    _demo.process_order("ORD-1")
    _demo.assistant_chat()
    finished = spans.get_finished_spans()
    keys: set[str] = set()
    for span in finished:
        keys.update(span.attributes or {})
        for event in span.events:
            keys.update(event.attributes or {})
    assert a.AUDITED in keys and a.AUDIT_CATEGORY in keys and a.GEN_AI_USAGE_INPUT_TOKENS in keys
    assert a.AUDITED_LEGACY not in keys
    assert namespace_conflicts(keys) == []
