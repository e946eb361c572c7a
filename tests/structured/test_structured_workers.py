"""Constrained requests with the runner in a worker process (tensor_parallel_size=2 on
CPU): the workers get only the SchedulerOutput's bitmask, no grammar, and produce the
same tokens as one process."""
from __future__ import annotations

import json
import re

import pytest

from checkpoints import cached_checkpoint
from fastllm import LLM, SamplingParams, StructuredOutputsParams

from schemas import ITEMS_SCHEMA, PRICE_REGEX

jsonschema = pytest.importorskip("jsonschema")


def _run(llm):
    params = [SamplingParams(temperature=0, max_tokens=120, structured_outputs=StructuredOutputsParams(
                  json=ITEMS_SCHEMA, disable_any_whitespace=True)),
              SamplingParams(temperature=1.0, seed=5, max_tokens=40,
                             structured_outputs=StructuredOutputsParams(regex=PRICE_REGEX)),
              SamplingParams(temperature=0, max_tokens=12)]
    return llm.generate(["Hello world", "Once upon", "count"], params, use_tqdm=False)


def test_tp2_workers_follow_the_bitmask():
    path = str(cached_checkpoint("llama"))
    kw = dict(device="cpu", max_model_len=256, num_kv_blocks=64, seed=0)
    single = LLM(path, **kw)
    expected = [o.outputs[0].token_ids for o in _run(single)]
    single.close()
    llm = LLM(path, tensor_parallel_size=2, **kw)
    try:
        outs = _run(llm)
    finally:
        llm.close()
    assert [o.outputs[0].token_ids for o in outs] == expected
    jsonschema.validate(json.loads(outs[0].outputs[0].text), ITEMS_SCHEMA)
    assert re.fullmatch(PRICE_REGEX, outs[1].outputs[0].text)
