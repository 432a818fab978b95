"""The event envelope's fields as the wire contract (DESIGN §2.1) lists them.

Written out by hand, not read from `schemas`: the tests compare the models
against these lists, and the hostile-record makers drop or break each field.
"""

from __future__ import annotations

ENVELOPE_REQUIRED = (
    "event_id",
    "event_type",
    "schema_version",
    "service",
    "service_version",
    "deployment_id",
    "occurred_at",
    "payload",
)
ENVELOPE_OPTIONAL = ("correlation_id", "causation_id", "key")
