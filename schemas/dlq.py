"""Dead-letter metadata carried as headers on `backout.dlq` (DESIGN §2.5)."""

from __future__ import annotations

from pydantic import Field

from schemas._base import WireModel

ERROR_HEADER = "backout-error"
SOURCE_TOPIC_HEADER = "backout-source-topic"
SOURCE_PARTITION_HEADER = "backout-source-partition"
SOURCE_OFFSET_HEADER = "backout-source-offset"

# Kafka headers are bytes; an unbounded reason (a pydantic error dump of a
# huge payload) would bloat every DLQ record, so reasons are truncated.
MAX_REASON_LENGTH = 2000


class DeadLetter(WireModel):
    """Why a record was dead-lettered, and where it came from."""

    error: str = Field(min_length=1)
    source_topic: str
    source_partition: int
    source_offset: int

    def headers(self) -> list[tuple[str, bytes]]:
        """The `backout-*` headers to add to the original record's headers."""
        reason = self.error
        if len(reason) > MAX_REASON_LENGTH:
            reason = reason[: MAX_REASON_LENGTH - 1] + "…"
        return [
            (ERROR_HEADER, reason.encode()),
            (SOURCE_TOPIC_HEADER, self.source_topic.encode()),
            (SOURCE_PARTITION_HEADER, str(self.source_partition).encode()),
            (SOURCE_OFFSET_HEADER, str(self.source_offset).encode()),
        ]

    @classmethod
    def from_headers(cls, headers: list[tuple[str, bytes]]) -> DeadLetter:
        """Read the metadata back from a DLQ record's headers."""
        found = {name: value.decode("utf-8", "replace") for name, value in headers}
        return cls(
            error=found.get(ERROR_HEADER, "unknown"),
            source_topic=found.get(SOURCE_TOPIC_HEADER, ""),
            source_partition=int(found.get(SOURCE_PARTITION_HEADER, "-1")),
            source_offset=int(found.get(SOURCE_OFFSET_HEADER, "-1")),
        )
