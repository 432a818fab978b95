"""JSON Schema export of the wire models (`backout schemas export DIR`)."""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel

from schemas.envelope import EventEnvelope
from schemas.signal import RollbackSignal
from schemas.status import RollbackStatus

WIRE_MODELS: dict[str, type[BaseModel]] = {
    "event-envelope": EventEnvelope,
    "rollback-signal": RollbackSignal,
    "rollback-status": RollbackStatus,
}


def json_schemas() -> dict[str, dict[str, object]]:
    """The JSON Schema of every wire model, by file stem."""
    return {name: model.model_json_schema(mode="validation") for name, model in WIRE_MODELS.items()}


def export_json_schemas(directory: Path) -> list[Path]:
    """Write one `<name>.schema.json` per wire model into `directory`.

    Returns:
        The paths written, in a stable order.
    """
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, schema in json_schemas().items():
        path = directory / f"{name}.schema.json"
        path.write_text(json.dumps(schema, indent=2, sort_keys=True) + "\n")
        written.append(path)
    return written
