"""Record header names Backout reads and writes (DESIGN §2.3)."""

IDEMPOTENCY_KEY_HEADER = "backout-idempotency-key"
ROLLBACK_ID_HEADER = "backout-rollback-id"
COMPENSATES_HEADER = "backout-compensates"
TRACEPARENT_HEADER = "traceparent"
TRACESTATE_HEADER = "tracestate"
