"""Request fields -> StructuredOutputsParams: OpenAI's response_format, vLLM's
structured_outputs (extra_body) and its older guided_json / guided_regex / guided_choice /
guided_grammar. At most one may constrain a request; errors are 400s naming the field."""
from __future__ import annotations

from typing import Optional

from fastllm.sampling_params import StructuredOutputsParams
from fastllm.serve.errors import APIError

_GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice",
           "guided_grammar": "grammar"}


def structured_field(req) -> Optional[str]:
    """The one request field that constrains the output, or None; APIError when several do."""
    given = []
    fmt = getattr(req, "response_format", None)
    if fmt is not None and fmt.type != "text":
        given.append("response_format")
    if getattr(req, "structured_outputs", None) is not None:
        given.append("structured_outputs")
    given += [name for name in _GUIDED if getattr(req, name, None) is not None]
    if len(given) > 1:
        raise APIError(f"only one of {', '.join(given)} may constrain the output", param=given[1])
    return given[0] if given else None


def structured_outputs_params(req, disable_any_whitespace: bool = False) -> Optional[StructuredOutputsParams]:
    """The request's StructuredOutputsParams (None: unconstrained). Shapes are checked
    here; whether a schema, regex or grammar is valid, the engine checks (xgrammar).
    disable_any_whitespace: the server's default (--disable-any-whitespace)."""
    field = structured_field(req)
    if field is None:
        return None
    try:
        if field == "response_format":
            return _from_response_format(req.response_format, disable_any_whitespace)
        if field == "structured_outputs":
            so = req.structured_outputs
            if so.disable_any_whitespace is not None:
                disable_any_whitespace = so.disable_any_whitespace
            return StructuredOutputsParams(json=so.json_, regex=so.regex, choice=so.choice,
                                           grammar=so.grammar, json_object=bool(so.json_object),
                                           disable_any_whitespace=disable_any_whitespace)
        return StructuredOutputsParams(**{_GUIDED[field]: getattr(req, field)},
                                       disable_any_whitespace=disable_any_whitespace)
    except ValueError as e:
        raise APIError(f"{field}: {e}", param=field) from None


def _from_response_format(fmt, disable_any_whitespace: bool) -> StructuredOutputsParams:
    if fmt.type == "json_object":
        return StructuredOutputsParams(json_object=True, disable_any_whitespace=disable_any_whitespace)
    spec = fmt.json_schema
    if spec is None or spec.json_schema is None:
        raise APIError('response_format: type "json_schema" needs json_schema.schema',
                       param="response_format.json_schema")
    # strict is OpenAI's promise that the output follows the schema; a grammar keeps that
    # promise either way, so strict false is served the same.
    return StructuredOutputsParams(json=spec.json_schema, disable_any_whitespace=disable_any_whitespace)
