"""Unique names for Kafka topics, consumer groups and faust app ids.

Tansu keeps a group's session timeout from its first member ever, and memory
storage outlives a single test, so every test uses names of its own.
"""

from __future__ import annotations

import re
import uuid

# Kafka's legal topic characters and length limit; group ids allow more, but
# one rule for both keeps names usable everywhere.
_LEGAL = re.compile(r"[A-Za-z0-9._-]+")
_MAX_LENGTH = 249


def unique_name(prefix: str, suffix: str = "") -> str:
    """Return ``<prefix>-<uuid hex><suffix>``, unique per call.

    Args:
        prefix: Readable start of the name, e.g. ``"orders"``.
        suffix: Optional end, e.g. ``".events"`` so the name matches the default
            tracked-topic pattern ``.*\\.events``.

    Returns:
        A name that is a legal Kafka topic name.

    Raises:
        ValueError: The result would not be a legal topic name.

    Example:
        >>> unique_name("orders", ".events")  # doctest: +SKIP
        'orders-3f0c9a...e1.events'
    """
    name = f"{prefix}-{uuid.uuid4().hex}{suffix}"
    if not _LEGAL.fullmatch(name) or len(name) > _MAX_LENGTH:
        raise ValueError(f"{name!r} is not a legal Kafka topic name")
    return name
