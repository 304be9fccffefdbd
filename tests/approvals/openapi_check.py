"""A checker for the subset of OpenAPI 3.1 / JSON Schema the approvals API document uses.

``jsonschema`` is not a dependency, so this validates what our document
needs: local ``$ref``, ``type`` (a name or a list of names, ``null``
included), ``enum``, ``properties``/``required``/``additionalProperties``,
``items``, ``minimum``/``maximum``, ``maxLength``. A keyword it does not know
fails the check, so the document cannot silently outgrow the checker.
"""

from __future__ import annotations

import re
from typing import Any

KNOWN = {
    "$ref", "type", "enum", "properties", "required", "additionalProperties", "items",
    "minimum", "maximum", "maxLength", "description", "default",
}
TYPES = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
}


class SchemaViolation(AssertionError):
    pass


def resolve(doc: dict[str, Any], ref: str) -> Any:
    if not ref.startswith("#/"):
        raise SchemaViolation(f"only local $ref are supported: {ref}")
    node: Any = doc
    for part in ref[2:].split("/"):
        node = node[part]
    return node


def validate(doc: dict[str, Any], schema: dict[str, Any], value: Any, where: str = "$") -> None:
    unknown = set(schema) - KNOWN
    if unknown:
        raise SchemaViolation(f"{where}: the checker does not know {sorted(unknown)}")
    if "$ref" in schema:
        validate(doc, resolve(doc, schema["$ref"]), value, where)
        return
    if "type" in schema:
        names = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        if not any(TYPES[name](value) for name in names):
            raise SchemaViolation(f"{where}: {value!r} is not of type {names}")
    if "enum" in schema and value not in schema["enum"]:
        raise SchemaViolation(f"{where}: {value!r} is not one of {schema['enum']}")
    if isinstance(value, str) and "maxLength" in schema and len(value) > schema["maxLength"]:
        raise SchemaViolation(f"{where}: longer than {schema['maxLength']}")
    if TYPES["number"](value):
        if "minimum" in schema and value < schema["minimum"]:
            raise SchemaViolation(f"{where}: {value} < {schema['minimum']}")
        if "maximum" in schema and value > schema["maximum"]:
            raise SchemaViolation(f"{where}: {value} > {schema['maximum']}")
    if isinstance(value, dict):
        properties = schema.get("properties", {})
        for key in schema.get("required", []):
            if key not in value:
                raise SchemaViolation(f"{where}: missing {key!r}")
        for key, item in value.items():
            if key in properties:
                validate(doc, properties[key], item, f"{where}.{key}")
            elif schema.get("additionalProperties") is False:
                raise SchemaViolation(f"{where}: unexpected property {key!r}")
            elif isinstance(schema.get("additionalProperties"), dict):
                validate(doc, schema["additionalProperties"], item, f"{where}.{key}")
    if isinstance(value, list) and "items" in schema:
        for index, item in enumerate(value):
            validate(doc, schema["items"], item, f"{where}[{index}]")


def operation(doc: dict[str, Any], method: str, path: str) -> tuple[str, dict[str, Any]]:
    """The path template and operation that ``method path`` (without the server prefix) is."""
    for template, item in doc["paths"].items():
        pattern = "^" + re.sub(r"\\\{[^}]+\\\}", "[^/]+", re.escape(template)) + "$"
        if re.match(pattern, path) and method.lower() in item:
            return template, item[method.lower()]
    raise SchemaViolation(f"{method} {path} is not in the OpenAPI document")


def check_response(doc: dict[str, Any], method: str, path: str, status: int, body: Any) -> None:
    """``body`` (parsed JSON) is what the document says ``method path`` answers with ``status``."""
    template, op = operation(doc, method, path)
    responses = op["responses"]
    if str(status) not in responses:
        raise SchemaViolation(f"{method} {template}: status {status} is not documented")
    response = responses[str(status)]
    if "$ref" in response:
        response = resolve(doc, response["$ref"])
    schema = response["content"]["application/json"]["schema"]
    validate(doc, schema, body, f"{method} {template} {status}")


def check_request_body(doc: dict[str, Any], method: str, path: str, body: Any) -> None:
    _, op = operation(doc, method, path)
    schema = op["requestBody"]["content"]["application/json"]["schema"]
    validate(doc, schema, body, f"{method} {path} request")


def all_refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return found + [ref for value in node.values() for ref in all_refs(value)]
    if isinstance(node, list):
        return [ref for value in node for ref in all_refs(value)]
    return []
