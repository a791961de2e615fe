"""The JSON Schema of ``report.json`` and a minimal validator for it.

:func:`validate` uses the ``jsonschema`` package when it is installed and otherwise checks
the subset of JSON Schema used here (``type``, ``required``, ``properties``, ``items``,
``additionalProperties`` given as a schema, ``minimum``) itself; ``jsonschema`` is not a
dependency.
"""

from __future__ import annotations

from typing import Any

_NUM = {"type": "number"}
_INT = {"type": "integer", "minimum": 0}
_NUMS = {"type": "array", "items": _NUM}
_INTS = {"type": "array", "items": _INT}

SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "cmdtool report.json",
    "type": "object",
    "required": [
        "report_version",
        "decomposition",
        "settings",
        "n_params",
        "n_epochs",
        "epochs",
        "n_modes",
        "mode_sizes",
        "mode_shares",
        "tensors",
        "relative_error",
        "compression",
    ],
    "properties": {
        "report_version": {"type": "integer"},
        "decomposition": {"type": "string"},
        "settings": {
            "description": "the decomposition's cmdtool_result attribute, as stored",
            "type": "object",
            "required": ["n_modes", "samples", "seed", "epochs", "rows", "relative_error"],
        },
        "n_params": _INT,
        "n_epochs": _INT,
        "epochs": {"type": "array", "items": {"type": "integer"}},
        "n_modes": _INT,
        "mode_sizes": _INTS,
        "mode_shares": _NUMS,
        "tensors": {
            "type": "array",
            "items": {
                "type": "object",
                "required": [
                    "name",
                    "shape",
                    "offset",
                    "size",
                    "mode_counts",
                    "mode_shares",
                    "relative_error",
                ],
                "properties": {
                    "name": {"type": "string"},
                    "shape": _INTS,
                    "offset": _INT,
                    "size": _INT,
                    "mode_counts": _INTS,
                    "mode_shares": _NUMS,
                    "relative_error": _NUM,
                },
            },
        },
        "relative_error": {
            "description": "sqrt(sum (w - w_hat)^2 / sum w^2) over all epochs unless "
            "'window' is in the name",
            "type": "object",
            "required": ["overall", "window", "per_mode", "per_mode_window", "per_epoch"],
            "properties": {
                "overall": _NUM,
                "window": _NUM,
                "per_mode": _NUMS,
                "per_mode_window": _NUMS,
                "per_epoch": _NUMS,
            },
        },
        "compression": {
            "type": "object",
            "required": ["stored_values", "model_values", "ratio"],
            "properties": {"stored_values": _INT, "model_values": _INT, "ratio": _NUM},
        },
        "evaluation": {
            "description": "the cmdtool_evaluation attribute, when present",
            "type": "object",
            "required": ["epochs", "metrics", "raw", "cmd"],
            "properties": {
                "epochs": {"type": "array"},
                "metrics": {"type": "array", "items": {"type": "string"}},
                "raw": {"type": "object", "additionalProperties": {"type": "array"}},
                "cmd": {"type": "object", "additionalProperties": {"type": "array"}},
            },
        },
        "sweep": {
            "description": "the cmdtool_sweep attribute, when present",
            "type": "object",
            "required": ["modes", "relative_error"],
            "properties": {
                "modes": {"type": "array"},
                "relative_error": {"type": "array"},
                "metrics": {"type": "object", "additionalProperties": {"type": "array"}},
            },
        },
        "compare": {
            "description": "the cmdtool_compare attribute (cmdtool compare), when present",
            "type": "object",
            "required": ["methods", "epochs"],
            "properties": {
                "methods": {"type": "array", "items": {"type": "object"}},
                "epochs": {"type": "array"},
            },
        },
    },
}

_TYPES: dict[str, tuple[type, ...]] = {
    "object": (dict,),
    "array": (list,),
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
    "null": (type(None),),
}


def _errors(value: Any, schema: dict[str, Any], path: str) -> list[str]:
    kind = schema.get("type")
    if kind is not None:
        ok = isinstance(value, _TYPES[kind]) and not (
            kind in ("integer", "number") and isinstance(value, bool)
        )
        if not ok:
            return [f"{path or '/'}: expected {kind}, got {type(value).__name__}"]
    found: list[str] = []
    if "minimum" in schema and isinstance(value, int | float) and value < schema["minimum"]:
        found.append(f"{path or '/'}: {value} < minimum {schema['minimum']}")
    if isinstance(value, dict):
        for key in schema.get("required", []):
            if key not in value:
                found.append(f"{path or '/'}: missing required key {key!r}")
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        for key, sub in value.items():
            if key in props:
                found += _errors(sub, props[key], f"{path}/{key}")
            elif isinstance(extra, dict):
                found += _errors(sub, extra, f"{path}/{key}")
    if isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            found += _errors(item, schema["items"], f"{path}/{i}")
    return found


def validate(instance: Any, schema: dict[str, Any] | None = None) -> list[str]:
    """Check ``instance`` against ``schema`` (default :data:`SCHEMA`).

    Parameters
    ----------
    instance : Any
        Decoded JSON.
    schema : dict, optional

    Returns
    -------
    list of str
        One message per violation; empty when ``instance`` is valid.
    """
    schema = SCHEMA if schema is None else schema
    try:
        import jsonschema
    except ImportError:
        return _errors(instance, schema, "")
    validator = jsonschema.Draft202012Validator(schema)
    return [
        f"/{'/'.join(map(str, e.absolute_path))}: {e.message}"
        for e in validator.iter_errors(instance)
    ]
