"""A request's structured-output fields -> the engine's ``GrammarSpec``.

The OpenAI fields: ``response_format`` ``{"type": "json_object"}`` (any JSON object) and ``{"type":
"json_schema", "json_schema": {"name", "schema", "strict"}}``. vLLM's extra fields, spelled as vLLM spells
them: ``structured_outputs`` (``{"json" | "regex" | "choice" | "grammar": ...}``) and the older
``guided_json``, ``guided_regex``, ``guided_choice``, ``guided_grammar``. At most one may be set; each is
checked here (a JSON schema against the JSON Schema meta-schema) and compiled by the engine, and whatever is
wrong is a 400 naming the field.
"""

from __future__ import annotations

import json
from typing import Any

from ..engine.grammar import GrammarError, GrammarSpec, check_schema
from .errors import APIError

# vLLM's structured_outputs keys -> the engine's grammar kinds
STRUCTURED_KEYS = {"json": "json", "regex": "regex", "choice": "choice", "grammar": "ebnf"}
GUIDED_FIELDS = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "ebnf"}


def checked_schema(schema: Any, field: str) -> dict:
    """``schema`` if it is a valid JSON Schema object, else a 400 naming ``field``."""
    try:
        return check_schema(schema, field)
    except GrammarError as exc:
        raise APIError(400, str(exc), exc.field) from None


def spec_of(kind: str, value: Any, field: str) -> GrammarSpec:
    """One constraint's value -> a spec, or a 400 naming ``field``."""
    try:
        if kind == "json":
            if isinstance(value, str):  # vLLM accepts the schema as JSON text too
                try:
                    value = json.loads(value)
                except ValueError:
                    raise APIError(400, f"{field}: not valid JSON", field) from None
            return GrammarSpec.json_schema(value, field)
        if kind == "choice":
            if not isinstance(value, list):
                raise APIError(400, f"{field}: must be a list of strings", field)
            return GrammarSpec.choice(value, field)
        if not isinstance(value, str) or not value:
            raise APIError(400, f"{field}: must be a non-empty string", field)
        return GrammarSpec(kind, value, field)  # type: ignore[arg-type]
    except GrammarError as exc:
        raise APIError(400, str(exc), exc.field) from None


def grammar_of(response_format: Any, structured_outputs: dict | None, guided: dict[str, Any]) -> GrammarSpec | None:
    """The request's one grammar, or None. ``response_format``: the parsed model (``type`` and
    ``json_schema``); ``guided``: the ``guided_*`` fields that are set."""
    found: list[GrammarSpec] = []
    if response_format is not None and response_format.type != "text":
        if response_format.type == "json_object":
            found.append(GrammarSpec.json_schema(None, "response_format"))
        else:
            js = response_format.json_schema
            if js is None:
                raise APIError(400, "response_format: type 'json_schema' needs a 'json_schema' object",
                               "response_format")
            schema = js.schema_ if js.schema_ is not None else {}
            found.append(spec_of("json", schema, "response_format"))
    if structured_outputs:
        keys = [k for k, v in structured_outputs.items() if k in STRUCTURED_KEYS and v is not None]
        unknown = [k for k in structured_outputs if k not in STRUCTURED_KEYS]
        if unknown:
            raise APIError(400, f"structured_outputs: unknown key {unknown[0]!r}; one of "
                                f"{', '.join(STRUCTURED_KEYS)}", "structured_outputs")
        if len(keys) > 1:
            raise APIError(400, "structured_outputs: set exactly one of " + ", ".join(STRUCTURED_KEYS),
                           "structured_outputs")
        for k in keys:
            found.append(spec_of(STRUCTURED_KEYS[k], structured_outputs[k], "structured_outputs"))
    for name, value in guided.items():
        found.append(spec_of(GUIDED_FIELDS[name], value, name))
    if len(found) > 1:
        names = ", ".join(sorted({s.field for s in found}))
        raise APIError(400, f"{found[1].field}: only one structured-output constraint per request (got {names})",
                       found[1].field)
    return found[0] if found else None
