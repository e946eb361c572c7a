"""Structured outputs over HTTP: the official openai client with response_format
(json_schema, json_object) and vLLM's structured_outputs / guided_* in extra_body, against a
server process on a random-weight model; bad constraints get 400 naming the field."""
from __future__ import annotations

import json
import re

import httpx
import pytest

from server_process import MODEL_NAME, ServerProcess

openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")

SCHEMA = {"type": "object",
          "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 999},
                         "kind": {"enum": ["cat", "dog"]},
                         "tags": {"type": "array", "items": {"type": "string", "pattern": "^[a-z]{1,3}$"},
                                  "maxItems": 2}},
          "required": ["id", "kind", "tags"], "additionalProperties": False}
MESSAGES = [{"role": "user", "content": "Describe a pet."}]


@pytest.fixture(scope="module")
def compact_server(model_path):
    # --disable-any-whitespace: a random model would otherwise wander in whitespace
    # until max_tokens (any whitespace is valid JSON).
    proc = ServerProcess(model_path, "--num-kv-blocks", 128, "--disable-any-whitespace")
    yield proc
    rc = proc.stop()
    assert rc == 0, proc.output()


@pytest.fixture()
def oai(compact_server):
    return openai.OpenAI(base_url=compact_server.url + "/v1", api_key="unused", max_retries=0)


def test_response_format_json_schema_validates(oai):
    fmt = {"type": "json_schema", "json_schema": {"name": "pet", "schema": SCHEMA, "strict": True}}
    for seed, temperature in ((None, 0.0), (1, 1.0), (2, 0.8)):
        resp = oai.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, response_format=fmt,
                                           max_tokens=90, temperature=temperature, seed=seed)
        choice = resp.choices[0]
        assert choice.finish_reason == "stop", choice.message.content
        jsonschema.validate(json.loads(choice.message.content), SCHEMA)


def test_response_format_json_object_streamed(oai):
    stream = oai.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=90,
                                         response_format={"type": "json_object"}, stream=True,
                                         temperature=0.0)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert isinstance(json.loads(text), dict)


def test_extra_body_structured_outputs_and_guided_aliases(oai):
    regex = r"[a-z]{2,4}-\d{2}"
    out = oai.completions.create(model=MODEL_NAME, prompt="Code:", max_tokens=20, temperature=1.0, seed=3,
                                 extra_body={"structured_outputs": {"regex": regex}})
    assert re.fullmatch(regex, out.choices[0].text)
    choices = ["yes", "no", "maybe"]
    out = oai.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=10, n=3,
                                      temperature=1.0, seed=4, extra_body={"guided_choice": choices})
    assert all(c.message.content in choices for c in out.choices)
    out = oai.completions.create(model=MODEL_NAME, prompt="x", max_tokens=90, temperature=0.0,
                                 extra_body={"guided_json": SCHEMA})
    jsonschema.validate(json.loads(out.choices[0].text), SCHEMA)


@pytest.mark.parametrize("body, param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}},
     "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format.json_schema"),
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"structured_outputs": {"regex": "(ab"}}, "structured_outputs"),
    ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs"),
    ({"structured_outputs": {"grammar": "root ::= nowhere"}}, "structured_outputs"),
    ({"guided_json": "{not json"}, "guided_json"),
    ({"guided_regex": "a+", "response_format": {"type": "json_object"}}, "guided_regex"),
])
def test_bad_constraints_get_400_naming_the_field(compact_server, body, param):
    r = httpx.post(compact_server.url + "/v1/chat/completions", timeout=30,
                   json={"model": MODEL_NAME, "messages": MESSAGES, "max_tokens": 4, **body})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error", error
    # ...and the server goes on serving constrained requests.
    ok = httpx.post(compact_server.url + "/v1/chat/completions", timeout=60,
                    json={"model": MODEL_NAME, "messages": MESSAGES, "max_tokens": 10,
                          "structured_outputs": {"choice": ["a", "b"]}})
    assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"] in ("a", "b")


def test_openai_client_raises_bad_request_for_a_bad_schema(oai):
    with pytest.raises(openai.BadRequestError) as info:
        oai.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=4,
                                    response_format={"type": "json_schema",
                                                     "json_schema": {"name": "x", "schema": {"$ref": "#/nope"}}})
    assert info.value.body["param"] == "response_format"
