"""The server against the official `openai` client, checked against fastllm's offline LLM,
HF transformers (token ids, logprobs) and transformers' tokenizer (usage)."""
from __future__ import annotations

import httpx
import pytest
import torch

from checkpoints import hf_greedy, load_hf_model
from server_process import MODEL_NAME
from fastllm import SamplingParams

PROMPTS = ["The capital of France is", "Hello world! How are", "Once upon a time"]


def offline(llm, prompt, **kw):
    out = llm.generate(prompt, SamplingParams(**kw), use_tqdm=False)[0].outputs[0]
    return out


def hf_chat_ids(tokenizer, messages) -> list:
    """transformers' rendering of the chat template (its own jinja), as token ids."""
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"]) if hasattr(ids, "keys") else list(ids)   # BatchEncoding in v5


def offline_chat(llm, messages, **kw):
    return llm.chat(messages, SamplingParams(**kw), use_tqdm=False)[0].outputs[0]


@pytest.fixture(scope="module")
def hf(model_path):
    return load_hf_model(model_path)


def test_completion_greedy_matches_offline_llm(client, offline_llm, hf_tokenizer):
    for prompt in PROMPTS:
        ref = offline(offline_llm, prompt, temperature=0, max_tokens=12)
        resp = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=12,
                                         temperature=0)
        assert resp.object == "text_completion" and resp.model == MODEL_NAME
        assert [c.index for c in resp.choices] == [0]
        assert resp.choices[0].text == ref.text
        assert resp.choices[0].finish_reason == ref.finish_reason
        assert resp.usage.prompt_tokens == len(hf_tokenizer.encode(prompt))
        assert resp.usage.completion_tokens == len(ref.token_ids)
        assert resp.usage.total_tokens == resp.usage.prompt_tokens + len(ref.token_ids)


def test_generate_token_ids_match_hf_greedy(server, hf, hf_tokenizer):
    prompt = "The quick brown fox"
    body = httpx.post(server.url + "/generate", json={"prompt": prompt, "max_tokens": 10,
                                                      "temperature": 0}, timeout=60).json()
    ids = hf_tokenizer.encode(prompt)
    assert body["tokens"] == hf_greedy(hf, ids, 10)
    assert body["text"] == hf_tokenizer.decode(body["tokens"], skip_special_tokens=True)
    assert body["usage"] == {"prompt_tokens": len(ids), "completion_tokens": len(body["tokens"]),
                             "total_tokens": len(ids) + len(body["tokens"])}


def test_prompt_forms_and_n(client, offline_llm, hf_tokenizer):
    ids = [hf_tokenizer.encode(p) for p in PROMPTS[:2]]
    refs = [offline(offline_llm, p, temperature=0, max_tokens=6).text for p in PROMPTS[:2]]
    for prompt in (PROMPTS[:2], ids):
        resp = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=6,
                                         temperature=0, n=2)
        choices = sorted(resp.choices, key=lambda c: c.index)
        assert [c.index for c in choices] == [0, 1, 2, 3]
        assert [c.text for c in choices] == [refs[0], refs[0], refs[1], refs[1]]
        assert resp.usage.prompt_tokens == len(ids[0]) + len(ids[1])
    single = client.completions.create(model=MODEL_NAME, prompt=ids[1], max_tokens=6, temperature=0)
    assert single.choices[0].text == refs[1]


def test_chat_greedy_matches_offline_llm_and_n2(client, offline_llm, hf_tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]
    ref = offline_chat(offline_llm, messages, temperature=0, max_tokens=10)
    resp = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=10,
                                          temperature=0, n=2)
    assert resp.object == "chat.completion"
    assert [c.index for c in resp.choices] == [0, 1]
    for c in resp.choices:
        assert c.message.role == "assistant" and c.message.content == ref.text
        assert c.finish_reason == ref.finish_reason
    assert resp.usage.prompt_tokens == len(hf_chat_ids(hf_tokenizer, messages))
    assert resp.usage.completion_tokens == 2 * len(ref.token_ids)
    # max_completion_tokens wins over max_tokens, as OpenAI documents.
    short = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=10,
                                           max_completion_tokens=3, temperature=0)
    assert short.usage.completion_tokens == min(3, len(ref.token_ids))


def _stream_completion(client, **kw):
    texts, finish, usage, chunks = {}, {}, None, 0
    for chunk in client.completions.create(model=MODEL_NAME, stream=True, **kw):
        chunks += 1
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
            if c.finish_reason is not None:
                finish[c.index] = c.finish_reason
    return texts, finish, usage, chunks


def test_streamed_completion_equals_non_streamed(client):
    kw = dict(prompt=PROMPTS[0], max_tokens=14, temperature=0, n=2)
    whole = client.completions.create(model=MODEL_NAME, **kw)
    texts, finish, usage, chunks = _stream_completion(client, **kw,
                                                      stream_options={"include_usage": True})
    assert chunks > 2                                   # it did stream
    assert texts == {c.index: c.text for c in whole.choices}
    assert finish == {c.index: c.finish_reason for c in whole.choices}
    assert usage.model_dump() == whole.usage.model_dump()
    _, _, no_usage, _ = _stream_completion(client, **kw)
    assert no_usage is None


def test_streamed_chat_role_content_finish_usage(client, offline_llm):
    messages = [{"role": "user", "content": "Tell me a story"}]
    ref = offline_chat(offline_llm, messages, temperature=0, max_tokens=12)
    chunks = list(client.chat.completions.create(
        model=MODEL_NAME, messages=messages, max_tokens=12, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    deltas = [c.choices[0] for c in chunks if c.choices]
    assert deltas[0].delta.role == "assistant"
    assert all(d.delta.role in (None, "assistant") for d in deltas)
    assert "".join(d.delta.content or "" for d in deltas) == ref.text
    assert [d.finish_reason for d in deltas].count(None) == len(deltas) - 1
    assert deltas[-1].finish_reason == ref.finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(ref.token_ids)
    assert all(c.usage is None for c in chunks[:-1])


def test_stop_strings(client):
    base = client.completions.create(model=MODEL_NAME, prompt=PROMPTS[1], max_tokens=20,
                                     temperature=0, extra_body={"ignore_eos": True}).choices[0].text
    # A stop string from the middle of the greedy text: generation ends before it.
    stop = next(base[i:i + 2] for i in range(3, len(base) - 2) if base[i:i + 2].strip())
    cut = base[:base.index(stop)]
    resp = client.completions.create(model=MODEL_NAME, prompt=PROMPTS[1], max_tokens=20,
                                     temperature=0, stop=[stop, "never-appears"],
                                     extra_body={"ignore_eos": True})
    assert resp.choices[0].text == cut and resp.choices[0].finish_reason == "stop"
    texts, finish, _, _ = _stream_completion(client, prompt=PROMPTS[1], max_tokens=20,
                                             temperature=0, stop=stop,
                                             extra_body={"ignore_eos": True})
    assert texts == {0: cut} and finish == {0: "stop"}


def test_seed_reproducible_at_temperature_1(client):
    def sample(seed):
        resp = client.completions.create(model=MODEL_NAME, prompt=PROMPTS[2], max_tokens=16,
                                         temperature=1.0, seed=seed, n=2,
                                         extra_body={"ignore_eos": True})
        return [c.text for c in sorted(resp.choices, key=lambda c: c.index)]
    first, again, other = sample(1234), sample(1234), sample(99)
    assert first == again
    assert first != other
    assert first[0] != first[1]                         # n samples are distinct draws
    chat = [client.chat.completions.create(
        model=MODEL_NAME, messages=[{"role": "user", "content": "Hi"}], max_tokens=16,
        temperature=1.0, seed=7, extra_body={"ignore_eos": True}).choices[0].message.content
        for _ in range(2)]
    assert chat[0] == chat[1]


def _hf_logprobs(hf, prompt_ids, gen_ids):
    """log_softmax of HF's logits at each generated position (float64)."""
    ids = torch.tensor([prompt_ids + gen_ids])
    with torch.no_grad():
        logits = hf(ids).logits[0].double()
    return torch.log_softmax(logits, -1)[len(prompt_ids) - 1:-1]


def test_completion_logprobs_match_hf(client, hf, hf_tokenizer, server):
    prompt = PROMPTS[0]
    resp = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=8, temperature=0,
                                     logprobs=3, extra_body={"ignore_eos": True})
    lp = resp.choices[0].logprobs
    gen = httpx.post(server.url + "/generate", json={"prompt": prompt, "max_tokens": 8,
                                                     "temperature": 0, "ignore_eos": True},
                     timeout=60).json()["tokens"]
    ref = _hf_logprobs(hf, hf_tokenizer.encode(prompt), gen)
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(gen) == 8
    for i, tid in enumerate(gen):
        assert lp.tokens[i] == hf_tokenizer.decode([tid])
        assert lp.token_logprobs[i] == pytest.approx(ref[i, tid].item(), abs=1e-3)
        # The top 3 by HF, keyed by token text (byte pieces share the text "\ufffd").
        top3 = torch.topk(ref[i], 3).values.tolist()
        assert 1 <= len(lp.top_logprobs[i]) <= 3
        for value in lp.top_logprobs[i].values():
            assert min(abs(value - v) for v in top3) < 1e-3
        # Greedy: the sampled token is the most likely one.
        assert max(lp.top_logprobs[i].values()) == pytest.approx(lp.token_logprobs[i], abs=1e-6)
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(8)]
    streamed = [c.choices[0].logprobs for c in client.completions.create(
        model=MODEL_NAME, prompt=prompt, max_tokens=8, temperature=0, logprobs=3, stream=True,
        extra_body={"ignore_eos": True}) if c.choices and c.choices[0].logprobs]
    assert sum((s.token_logprobs for s in streamed), []) == pytest.approx(lp.token_logprobs)
    assert sum((s.text_offset for s in streamed), []) == lp.text_offset


def test_chat_logprobs_match_hf(client, hf, hf_tokenizer, server):
    messages = [{"role": "user", "content": "Count: one, two"}]
    resp = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=6,
                                          temperature=0, logprobs=True, top_logprobs=2,
                                          extra_body={"ignore_eos": True})
    content = resp.choices[0].logprobs.content
    prompt_ids = httpx.post(server.url + "/tokenize", json={"messages": messages}).json()["tokens"]
    gen = httpx.post(server.url + "/generate", json={"prompt": prompt_ids, "max_tokens": 6,
                                                     "temperature": 0, "ignore_eos": True},
                     timeout=60).json()["tokens"]
    ref = _hf_logprobs(hf, prompt_ids, gen)
    assert len(content) == len(gen) == 6
    for i, entry in enumerate(content):
        assert entry.token == hf_tokenizer.decode([gen[i]])
        assert entry.logprob == pytest.approx(ref[i, gen[i]].item(), abs=1e-3)
        assert len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
        assert entry.top_logprobs[0].token == entry.token            # greedy
        assert entry.top_logprobs[1].logprob == pytest.approx(
            torch.topk(ref[i], 2).values[1].item(), abs=1e-3)
        assert entry.bytes == list(entry.token.encode())
    text = "".join(e.token for e in content)
    assert text.replace("\ufffd", "") == resp.choices[0].message.content.replace("\ufffd", "")
    without = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=6,
                                             temperature=0)
    assert without.choices[0].logprobs is None


def test_echo(client, hf_tokenizer):
    plain = client.completions.create(model=MODEL_NAME, prompt=PROMPTS[2], max_tokens=5,
                                      temperature=0).choices[0].text
    echoed = client.completions.create(model=MODEL_NAME, prompt=PROMPTS[2], max_tokens=5,
                                       temperature=0, echo=True).choices[0].text
    assert echoed == PROMPTS[2] + plain
    ids = hf_tokenizer.encode(PROMPTS[1])
    from_ids = client.completions.create(model=MODEL_NAME, prompt=ids, max_tokens=5, temperature=0,
                                         echo=True).choices[0].text
    assert from_ids.startswith(hf_tokenizer.decode(ids))
    texts, _, _, _ = _stream_completion(client, prompt=PROMPTS[2], max_tokens=5, temperature=0,
                                        echo=True)
    assert texts == {0: echoed}


def test_models_tokenize_detokenize(client, server, hf_tokenizer):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL_NAME]
    text = "Paged attention stores keys"
    tok = httpx.post(server.url + "/tokenize", json={"prompt": text}).json()
    assert tok["tokens"] == hf_tokenizer.encode(text) and tok["count"] == len(tok["tokens"])
    assert tok["max_model_len"] == 128
    back = httpx.post(server.url + "/detokenize", json={"tokens": tok["tokens"]}).json()
    assert back == {"prompt": text}
    messages = [{"role": "user", "content": "Hi"}]
    chat = httpx.post(server.url + "/tokenize", json={"messages": messages}).json()
    assert chat["tokens"] == hf_chat_ids(hf_tokenizer, messages)
    assert httpx.get(server.url + "/health").status_code == 200
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
