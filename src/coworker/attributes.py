"""Every span attribute key, metric name and baggage key that coworker emits.

This module is the contract with collector configs (``collector-config/``), Grafana dashboards
(``dashboards/``) and the audit record: nothing else in the package spells a key as a string
literal. Keys follow OpenTelemetry semantic conventions where one exists (``user.id``,
``session.id``, ``gen_ai.*``, ``error.type``, ``exception.*``) and are dotted lower case
otherwise.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Final

# -- the flow chain (names fixed by the product) -------------------------------------------
FLOW_TYPE: Final = "flow.type"
"""Kind of flow: ``workflow``, ``ai-conversation``, ``batch-job``, ``api-request``, or any
lower-case name."""
FLOW_ID: Final = "flow.id"
"""One user intent; a new id on every start and every break."""
FLOW_DEFINITION_ID: Final = "flow.definition.id"
"""The workflow template the flow was started from."""
FLOW_PREVIOUS_ID: Final = "flow.previous.id"
"""The flow this one broke from."""
FLOW_BREAK_REASON: Final = "flow.break.reason"
"""Why the previous flow was broken (``topic-change``, ``timeout``, ...)."""
FLOW_METADATA_PREFIX: Final = "flow.metadata."
"""Prefix of the ``**metadata`` given to :func:`coworker.flow`."""
STEP_ID: Final = "step.id"
"""Position in the flow: from a workflow definition or assigned at run time."""

# -- the run -------------------------------------------------------------------------------
RUN_ID: Final = "coworker.run.id"
RUN_PARENT_ID: Final = "coworker.run.parent_id"
CHAIN_ID: Final = "coworker.chain.id"
"""The id of the root run of a tree of nested runs."""
OPERATION: Final = "coworker.operation"
DOCTYPE: Final = "coworker.doctype"
INPUT: Final = "coworker.input"
"""Redacted, size-limited JSON of the bound arguments (only with ``capture_input``)."""
OUTPUT: Final = "coworker.output"
"""Redacted, size-limited JSON of the return value (only with ``capture_output``)."""
CODE_FUNCTION: Final = "code.function.name"
"""OTel semconv: the fully qualified name of the decorated callable."""

# -- audit classification --------------------------------------------------------------------
AUDITED: Final = "coworker.audited"
"""``True`` when the span belongs to the audit trail (a real boolean, never the string).

Not ``coworker.audit``: that name is the namespace of ``coworker.audit.category`` and
``coworker.audit.intent_seq``, and a backend that nests dotted keys (an Elasticsearch/OpenSearch
mapping, Phoenix's attribute store) cannot keep a value and a namespace under one path. No key
here is the prefix of another (tests/test_attributes.py)."""
AUDITED_LEGACY: Final = "coworker.audit"
"""The flag's name in coworker 0.1.0: read (never written) by ``coworker audit serve`` and
the shipped collector configs, so that spans from older senders still reach the audit trail."""
AUDIT_CATEGORY: Final = "coworker.audit.category"
CATEGORY_STATE_CHANGE: Final = "state-change"
CATEGORY_AUTHORIZATION_FAILURE: Final = "authorization-failure"
CATEGORY_VALIDATION_VIOLATION: Final = "validation-violation"
CATEGORY_SENSITIVE_READ: Final = "sensitive-read"
CATEGORY_POLICY_VIOLATION: Final = "policy-violation"
"""A rate limit or other policy rule that is not a permission (issue: ACL)."""
AUDIT_CATEGORIES: Final = (
    CATEGORY_STATE_CHANGE,
    CATEGORY_AUTHORIZATION_FAILURE,
    CATEGORY_VALIDATION_VIOLATION,
    CATEGORY_SENSITIVE_READ,
    CATEGORY_POLICY_VIOLATION,
)

# -- OpenInference (Arize Phoenix): spec/semantic_conventions.md of Arize-ai/openinference ---
# at 1fe497f (2026-08-21; openinference-semantic-conventions 0.1.32); docs/observability.md.
OPENINFERENCE_SPAN_KIND: Final = "openinference.span.kind"
"""What Phoenix files a span as: ``TOOL`` for runs an agent performs, ``CHAIN`` for other
runs (and for flows and steps), ``AGENT`` for turns an agent handles."""
OPENINFERENCE_CHAIN: Final = "CHAIN"
OPENINFERENCE_AGENT: Final = "AGENT"
OPENINFERENCE_TOOL: Final = "TOOL"
OPENINFERENCE_LLM: Final = "LLM"
OPENINFERENCE_EMBEDDING: Final = "EMBEDDING"
OPENINFERENCE_RETRIEVER: Final = "RETRIEVER"
INPUT_VALUE: Final = "input.value"
"""The captured input again, for Phoenix's input pane (only with ``capture_input``; the same
string as ``coworker.input``, redacted and dropped with it on export)."""
INPUT_MIME_TYPE: Final = "input.mime_type"
OUTPUT_VALUE: Final = "output.value"
"""The captured output again, for Phoenix's output pane (only with ``capture_output``)."""
OUTPUT_MIME_TYPE: Final = "output.mime_type"
MIME_JSON: Final = "application/json"
MIME_TEXT: Final = "text/plain"
"""The mime type of a capture cut off by the size limit (no longer valid JSON)."""

# -- who acts (OTel semantic conventions) ----------------------------------------------------
USER_ID: Final = "user.id"
SESSION_ID: Final = "session.id"
AGENT_ID: Final = "gen_ai.agent.id"
AGENT_NAME: Final = "gen_ai.agent.name"
CONVERSATION_ID: Final = "gen_ai.conversation.id"
GEN_AI_OPERATION_NAME: Final = "gen_ai.operation.name"
GEN_AI_TOOL_NAME: Final = "gen_ai.tool.name"
GEN_AI_OP_EXECUTE_TOOL: Final = "execute_tool"
GEN_AI_OP_INVOKE_AGENT: Final = "invoke_agent"
GEN_AI_OP_INVOKE_WORKFLOW: Final = "invoke_workflow"
OPENINFERENCE_KIND_OF_OPERATION: Final = MappingProxyType(
    {
        GEN_AI_OP_EXECUTE_TOOL: OPENINFERENCE_TOOL,
        GEN_AI_OP_INVOKE_AGENT: OPENINFERENCE_AGENT,
        GEN_AI_OP_INVOKE_WORKFLOW: OPENINFERENCE_CHAIN,
        "chat": OPENINFERENCE_LLM,
        "text_completion": OPENINFERENCE_LLM,
        "generate_content": OPENINFERENCE_LLM,
        "embeddings": OPENINFERENCE_EMBEDDING,
        "retrieval": OPENINFERENCE_RETRIEVER,
    }
)
"""The OpenInference span kind of a run whose ``gen_ai.operation.name`` the application set
itself, matched by the two specs' definitions (an LLM call, a tool, an agent...); an operation
not listed: ``CHAIN``."""
GEN_AI_WORKFLOW_NAME: Final = "gen_ai.workflow.name"
"""The workflow definition id on an ``invoke_workflow`` span (low cardinality, per the spec)."""
SESSION_PREVIOUS_ID: Final = "session.previous_id"
"""OTel semconv: the session before ``session.id`` changed (a ``new-session`` break)."""

# -- flow, step and turn spans (issue 13; docs/observability.md "Trace shape") ---------------
FLOW_NEXT_ID: Final = "flow.next.id"
"""On the last span of a broken flow: the flow that replaced it."""
STEP_ATTEMPT: Final = "coworker.step.attempt"
"""Which entry of the step this step span is (1, 2, ... per flow)."""
STEP_OUTCOME: Final = "coworker.step.outcome"
"""``completed``, ``failed`` (status ERROR too) or ``interrupted`` (its flow broke)."""
TURN_NUMBER: Final = "coworker.turn.number"
TURN_MESSAGE_ID: Final = "coworker.turn.message_id"
SPAN_CONTINUED: Final = "coworker.span.continued"
"""``True`` on a flow/step span ended at the configured bound while its block went on; the
continuation span links to it."""
SPAN_TYPE: Final = "coworker.span.type"
"""``flow``, ``step`` or ``turn`` on the spans of those blocks; absent on runs (the span-metrics
dashboards count runs with ``coworker_span_type=""``)."""
SPAN_SEGMENT: Final = "coworker.span.segment"
"""1 for a block's first span, 2, 3, ... for its continuation spans."""
USAGE_UNPRICED: Final = "coworker.usage.unpriced_calls"
"""On a flow/step/turn span: model calls under it without a known price (not in the cost)."""
LINK_TYPE: Final = "coworker.link.type"
"""Link attribute: ``flow-break`` (to the broken flow's last span) or ``continuation``."""

# -- errors (OTel semantic conventions) ------------------------------------------------------
ERROR_TYPE: Final = "error.type"
EXCEPTION_TYPE: Final = "exception.type"
EXCEPTION_MESSAGE: Final = "exception.message"
EXCEPTION_STACKTRACE: Final = "exception.stacktrace"
EXCEPTION_EVENT: Final = "exception"

# -- resource ----------------------------------------------------------------------------------
SERVICE_NAME: Final = "service.name"

# -- baggage keys used by coworker.inject / coworker.extract ---------------------------------
BAGGAGE_PREFIX: Final = "coworker."
"""Baggage entries are the attribute keys above prefixed with this, so that they never collide
with an application's own baggage."""

# -- metric names (OTel metric naming conventions: dotted, unit in the instrument) -----------
METRIC_RUNS: Final = "coworker.runs"
"""Counter of finished runs, by ``flow.type``, ``coworker.operation`` and ``outcome``."""
METRIC_RUN_DURATION: Final = "coworker.run.duration"
"""Histogram of run durations in seconds."""
METRIC_AUDIT_APPENDS: Final = "coworker.audit.appends"
"""Counter of audit records appended, by ``coworker.audit.category`` and ``outcome``."""
METRIC_AUDIT_APPEND_DURATION: Final = "coworker.audit.append.duration"
"""Histogram of audit append latency in seconds."""
METRIC_AUDIT_SPOOL_DEPTH: Final = "coworker.audit.spool.depth"
"""Gauge of records waiting in the local spool for the shared store."""
METRIC_ATTR_SPOOL: Final = "coworker.audit.spool.path"
"""Metric attribute of the spool-depth gauge: which spool file (a process may have several)."""
METRIC_ATTR_OUTCOME: Final = "outcome"
"""Metric attribute: ``ok`` or the error type."""
AUDIT_INTENT_SEQ: Final = "coworker.audit.intent_seq"
"""Set by the fail-closed audit gate on a live span: the seq of the intent record written
before the run's body executed (the outcome record points back at it)."""

# -- what the application cannot set -------------------------------------------------------
RESERVED_ATTRIBUTES: Final = frozenset(
    {
        USER_ID,
        SESSION_ID,
        AGENT_ID,
        AGENT_NAME,
        CONVERSATION_ID,
        FLOW_TYPE,
        FLOW_ID,
        FLOW_DEFINITION_ID,
        FLOW_PREVIOUS_ID,
        FLOW_BREAK_REASON,
        STEP_ID,
        RUN_ID,
        RUN_PARENT_ID,
        CHAIN_ID,
        AUDITED,
        AUDITED_LEGACY,
        AUDIT_CATEGORY,
        AUDIT_INTENT_SEQ,
        ERROR_TYPE,
        INPUT,
        OUTPUT,
    }
)
"""Keys that ``attributes=`` cannot set: who acts, where in the flow, which run, whether it
is audited. They come from coworker's context (``acting_as``, ``flow``, ...) only."""

SEALED_ATTRIBUTES: Final = (RESERVED_ATTRIBUTES - {OUTPUT, ERROR_TYPE}) | {OPERATION, DOCTYPE}
"""Keys whose start values an audited run's record keeps, whatever the body sets on its span
(``trace.get_current_span().set_attribute("coworker.audited", False)`` must not hide a record,
nor ``user.id`` forge one). ``coworker.output`` (``Run.set_output``) and ``error.type`` are the
body's to report."""

# -- usage and cost (issue 16) ---------------------------------------------------------------
# OTel GenAI semantic conventions (Development status), names as published in semconv v1.39+
# (the cached-token attributes of open-telemetry/semantic-conventions#3163):
# https://opentelemetry.io/docs/specs/semconv/gen-ai/ . ``input_tokens`` includes the cache
# read and cache creation tokens. (The GenAI SIG's unreleased main renames cache_creation to
# cache_write; see docs/usage.md.)
GEN_AI_REQUEST_MODEL: Final = "gen_ai.request.model"
GEN_AI_PROVIDER_NAME: Final = "gen_ai.provider.name"
GEN_AI_USAGE_INPUT_TOKENS: Final = "gen_ai.usage.input_tokens"
GEN_AI_USAGE_OUTPUT_TOKENS: Final = "gen_ai.usage.output_tokens"
GEN_AI_USAGE_CACHE_READ_INPUT_TOKENS: Final = "gen_ai.usage.cache_read.input_tokens"
GEN_AI_USAGE_CACHE_CREATION_INPUT_TOKENS: Final = "gen_ai.usage.cache_creation.input_tokens"
GEN_AI_TOKEN_TYPE: Final = "gen_ai.token.type"
"""Metric attribute of ``gen_ai.client.token.usage``: ``input`` or ``output``."""
GEN_AI_USAGE_REASONING_OUTPUT_TOKENS: Final = "gen_ai.usage.reasoning.output_tokens"
"""Reasoning tokens; part of ``gen_ai.usage.output_tokens``."""
# The open OTel proposal for cost (semantic-conventions issue "GenAI cost"): NOT in a
# published semconv release yet. ``gen_ai.usage.cost`` itself is never a leaf attribute.
GEN_AI_USAGE_COST_AMOUNT: Final = "gen_ai.usage.cost.amount"
GEN_AI_USAGE_COST_CURRENCY: Final = "gen_ai.usage.cost.currency"
GEN_AI_USAGE_COST_SOURCE: Final = "gen_ai.usage.cost.source"
"""The pricing version the amount was computed with (``genai-prices 0.2.3``, an override)."""
COST_CENTER: Final = "coworker.cost_center"
# The per-model split of a run's usage (coworker's own: the GenAI conventions model one
# inference span per call and give an agent's span one gen_ai.request.model). Parallel
# arrays, index i = the run's i-th distinct (model, provider); set only when a run used more
# than one. ``coworker audit serve`` prices each entry by its own model.
USAGE_BY_MODEL_MODEL: Final = "coworker.usage.by_model.model"
USAGE_BY_MODEL_PROVIDER: Final = "coworker.usage.by_model.provider"
"""Providers of :data:`USAGE_BY_MODEL_MODEL`'s entries; ``""`` for none."""
USAGE_BY_MODEL_COUNTS: Final = (
    "coworker.usage.by_model.input_tokens",
    "coworker.usage.by_model.output_tokens",
    "coworker.usage.by_model.cache_read.input_tokens",
    "coworker.usage.by_model.cache_creation.input_tokens",
    "coworker.usage.by_model.reasoning.output_tokens",
)
"""Int arrays in the order of the ``gen_ai.usage.*`` totals: input, output, cache read, cache
creation, reasoning."""
"""Who pays for a run's usage (see docs/usage.md for the precedence)."""
CATEGORY_USAGE: Final = "usage"
"""Audit category of usage ledger records (not a classification of runs: not in
``AUDIT_CATEGORIES``)."""
METRIC_GEN_AI_TOKEN_USAGE: Final = "gen_ai.client.token.usage"
"""Semconv histogram of tokens per call (``{token}``), by ``gen_ai.token.type``."""
METRIC_USAGE_COST: Final = "coworker.usage.cost"
"""Counter of cost (unit: the currency), by model, flow type, agent, user and cost center."""
