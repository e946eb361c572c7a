"""Bad requests get the right 4xx with OpenAI's error body, and the server keeps serving;
--api-key gates every route but /health; bodies over --max-request-bytes get 413."""
from __future__ import annotations

import httpx
import pytest

from server_process import API_KEY, MODEL_NAME

OK_COMPLETION = {"model": MODEL_NAME, "prompt": "Hello", "max_tokens": 2}
OK_CHAT = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}

# (route, raw body or JSON value, status, param the error names)
CASES = [
    ("/v1/completions", b'{"prompt": "Hello",', 400, None),                     # malformed JSON
    ("/v1/completions", b"", 400, None),                                        # no body
    ("/v1/completions", [1, 2], 400, None),                                     # not an object
    ("/v1/completions", {"max_tokens": 3}, 400, "prompt"),                      # missing field
    ("/v1/completions", {**OK_COMPLETION, "max_tokens": "5"}, 400, "max_tokens"),  # ill-typed
    ("/v1/completions", {**OK_COMPLETION, "max_tokens": 2.5}, 400, "max_tokens"),
    ("/v1/completions", {**OK_COMPLETION, "n": True}, 400, "n"),
    ("/v1/completions", {**OK_COMPLETION, "temperature": "hot"}, 400, "temperature"),
    ("/v1/completions", {**OK_COMPLETION, "prompt": [1, "a"]}, 400, "prompt"),
    ("/v1/completions", {**OK_COMPLETION, "prompt": []}, 400, "prompt"),
    ("/v1/completions", {**OK_COMPLETION, "prompt": ""}, 400, "prompt"),
    ("/v1/completions", {**OK_COMPLETION, "prompt": [5, 99999]}, 400, "prompt"),  # not in vocab
    ("/v1/completions", {**OK_COMPLETION, "temperature": -1}, 400, "temperature"),
    ("/v1/completions", {**OK_COMPLETION, "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {**OK_COMPLETION, "top_k": -5}, 400, "top_k"),
    ("/v1/completions", {**OK_COMPLETION, "min_p": 2}, 400, "min_p"),
    ("/v1/completions", {**OK_COMPLETION, "presence_penalty": 3}, 400, "presence_penalty"),
    ("/v1/completions", {**OK_COMPLETION, "frequency_penalty": -9}, 400, "frequency_penalty"),
    ("/v1/completions", {**OK_COMPLETION, "repetition_penalty": 0}, 400, "repetition_penalty"),
    ("/v1/completions", {**OK_COMPLETION, "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {**OK_COMPLETION, "n": 0}, 400, "n"),
    ("/v1/completions", {**OK_COMPLETION, "min_tokens": 5, "max_tokens": 2}, 400, "min_tokens"),
    ("/v1/completions", {**OK_COMPLETION, "logprobs": 50}, 400, "logprobs"),
    ("/v1/completions", {**OK_COMPLETION, "stop": [""]}, 400, "stop"),
    ("/v1/completions", {**OK_COMPLETION, "stop": 5}, 400, "stop"),
    ("/v1/completions", {**OK_COMPLETION, "model": "gpt-4"}, 400, "model"),      # unknown model
    ("/v1/completions", {**OK_COMPLETION, "prompt": "word " * 200}, 400, "prompt"),  # > max_model_len
    ("/v1/completions", {**OK_COMPLETION, "max_tokens": 500}, 400, "prompt"),
    ("/v1/completions", {**OK_COMPLETION, "stream_options": {"include_usage": "yes"}}, 400,
     "stream_options.include_usage"),
    ("/v1/chat/completions", {**OK_CHAT, "messages": []}, 400, "messages"),
    ("/v1/chat/completions", {**OK_CHAT, "messages": "hi"}, 400, "messages"),
    ("/v1/chat/completions", {**OK_CHAT, "messages": [{"content": "no role"}]}, 400, "messages.0.role"),
    ("/v1/chat/completions", {**OK_CHAT, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "x"}}]}]}, 400, "messages.0.content"),
    ("/v1/chat/completions", {**OK_CHAT, "top_logprobs": 2}, 400, "top_logprobs"),
    ("/v1/chat/completions", {**OK_CHAT, "logprobs": True, "top_logprobs": 99}, 400, "logprobs"),
    ("/v1/chat/completions", {**OK_CHAT, "max_completion_tokens": -1}, 400, "max_tokens"),
    ("/v1/chat/completions", {**OK_CHAT, "model": "nope"}, 400, "model"),
    ("/tokenize", {"tokens": [1]}, 400, "prompt"),
    ("/detokenize", {"tokens": ["a"]}, 400, "tokens.0"),
    ("/detokenize", {"tokens": [100000]}, 400, "tokens"),
    ("/generate", {"prompt": "Hello", "stream": True}, 400, "stream"),
    ("/generate", {"prompt": "Hello", "n": 2}, 400, "n"),
    ("/v1/nothing-here", {}, 404, None),
]


def _post(server, route, body):
    if isinstance(body, bytes):
        return httpx.post(server.url + route, content=body, timeout=60,
                          headers={"Content-Type": "application/json"})
    return httpx.post(server.url + route, json=body, timeout=60)


@pytest.mark.parametrize("route,body,status,param", CASES,
                         ids=[f"{i}-{c[0]}-{c[3]}" for i, c in enumerate(CASES)])
def test_bad_input_gets_openai_error(server, route, body, status, param):
    r = _post(server, route, body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert error["type"] == ("not_found_error" if status == 404 else "invalid_request_error")
    assert error["param"] == param


def test_server_still_serves_after_bad_input(server):
    for route, body, _, _ in CASES:
        _post(server, route, body)
    assert httpx.post(server.url + "/v1/completions", json=OK_COMPLETION, timeout=60).status_code == 200
    assert httpx.post(server.url + "/v1/chat/completions", json=OK_CHAT, timeout=60).status_code == 200
    # Unknown fields are ignored and nulls mean "the default", as OpenAI clients expect.
    nulls = {**OK_COMPLETION, "frobnicate": {"x": 1}, "n": None, "stream": None, "echo": None,
             "ignore_eos": None, "logprobs": None, "stop": None, "min_tokens": None}
    r = httpx.post(server.url + "/v1/completions", json=nulls, timeout=60)
    assert r.status_code == 200 and len(r.json()["choices"]) == 1
    r = httpx.post(server.url + "/v1/chat/completions", timeout=60,
                   json={**OK_CHAT, "logprobs": None, "add_generation_prompt": None, "n": None})
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == len(httpx.post(
        server.url + "/tokenize", json={"messages": OK_CHAT["messages"]}).json()["tokens"])
    # A wrong method is a 405 in the same schema.
    r = httpx.get(server.url + "/v1/completions")
    assert r.status_code == 405 and "error" in r.json()


def test_openai_client_raises_bad_request(client):
    openai = pytest.importorskip("openai")
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL_NAME, prompt="Hi", top_p=5)
    assert e.value.body["param"] == "top_p"


def test_api_key(limited_server):
    url = limited_server.url
    good = {"Authorization": f"Bearer {API_KEY}"}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
        for method, route in (("GET", "/v1/models"), ("POST", "/v1/completions"),
                              ("GET", "/metrics"), ("POST", "/tokenize"), ("GET", "/")):
            r = httpx.request(method, url + route, json=OK_COMPLETION, headers=headers, timeout=60)
            assert r.status_code == 401, (route, headers)
            assert r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(url + "/health").status_code == 200
    assert httpx.get(url + "/v1/models", headers=good).status_code == 200
    r = httpx.post(url + "/v1/completions", json=OK_COMPLETION, headers=good, timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
    openai = pytest.importorskip("openai")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
    models = openai.OpenAI(base_url=url + "/v1", api_key=API_KEY, max_retries=0).models.list()
    assert [m.id for m in models.data] == [MODEL_NAME]


def test_body_over_limit_gets_413(limited_server):
    headers = {**limited_server.headers, "Content-Type": "application/json"}
    big = {**OK_COMPLETION, "prompt": "a" * 5000}                # over --max-request-bytes 4096
    r = httpx.post(limited_server.url + "/v1/completions", json=big, headers=headers, timeout=60)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

    def chunks():                                              # no Content-Length: counted
        yield b'{"prompt": "'
        for _ in range(10):
            yield b"a" * 1000
        yield b'"}'
    r = httpx.post(limited_server.url + "/v1/completions", content=chunks(), headers=headers,
                   timeout=60)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    ok = httpx.post(limited_server.url + "/v1/completions", json=OK_COMPLETION, headers=headers,
                    timeout=60)
    assert ok.status_code == 200


def test_max_logprobs_flag(limited_server):
    """--max-logprobs 3: the engine's limit is the server's (400 naming the field above it)."""
    headers = limited_server.headers
    for route, body in (("/v1/completions", {**OK_COMPLETION, "logprobs": 4}),
                        ("/v1/chat/completions", {**OK_CHAT, "logprobs": True, "top_logprobs": 4})):
        r = httpx.post(limited_server.url + route, json=body, headers=headers, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["param"] == "logprobs", r.text
    r = httpx.post(limited_server.url + "/v1/completions", json={**OK_COMPLETION, "logprobs": 3},
                   headers=headers, timeout=60)
    assert r.status_code == 200, r.text
    top = r.json()["choices"][0]["logprobs"]["top_logprobs"]
    # At most the 3 asked for plus the sampled token (OpenAI adds it); byte pieces that
    # all decode to U+FFFD share one key, so an entry can hold fewer.
    assert top and all(1 <= len(t) <= 4 for t in top) and max(len(t) for t in top) >= 3
