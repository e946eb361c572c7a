"""AsyncLLM in-process: concurrent requests batch and match the offline LLM, leaving a
stream aborts its request, a failed step fails only its own requests."""
from __future__ import annotations

import asyncio
import time

import pytest

from fastllm import LLM, SamplingParams
from fastllm.engine.async_llm import AsyncLLM, EngineStepError, RequestAbortedError

PROMPTS = [[5, 17, 99, 3], [200] * 9, [7, 8, 9, 10, 11], [42]]


@pytest.fixture(scope="module")
def llm(model_path):
    return LLM(str(model_path), device="cpu", max_model_len=128, num_kv_blocks=64)


async def _drain(agen) -> tuple[list[int], str, str]:
    ids, text, finish = [], "", None
    async for out in agen:
        ids += out.outputs[0].token_ids
        text += out.outputs[0].text
        finish = out.outputs[0].finish_reason or finish
    return ids, text, finish


async def _idle(engine_llm: AsyncLLM, timeout=10.0):
    """Wait until the engine thread publishes a state with nothing running or held."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = engine_llm.latest_stats
        if s.num_running == s.num_waiting == s.kv_blocks_used == 0 and engine_llm.num_requests == 0:
            return s
        await asyncio.sleep(0.02)
    raise AssertionError(f"the engine did not go idle: {engine_llm.latest_stats}")


def test_concurrent_generate_matches_offline_and_abort_frees(llm):
    params = SamplingParams(temperature=0, max_tokens=10)
    refs = [o.outputs[0] for o in llm.generate(PROMPTS, params, use_tqdm=False)]

    async def main():
        allm = AsyncLLM(llm)
        allm.start()
        try:
            results = await asyncio.gather(*(_drain(allm.generate(p, params, f"r{i}"))
                                             for i, p in enumerate(PROMPTS)))
            for ref, (ids, text, finish) in zip(refs, results):
                assert (ids, text, finish) == (ref.token_ids, ref.text, ref.finish_reason)
            # Leave a long request after two outputs: it is aborted and its blocks freed.
            long = SamplingParams(temperature=0, max_tokens=100, ignore_eos=True)
            seen = 0
            async for _ in allm.generate([3, 4, 5], long, "long"):
                seen += 1
                if seen == 2:
                    break
            stats = await _idle(allm)
            assert stats.kv_blocks_used == 0
            assert stats.num_generation_tokens < 100 + sum(len(r.token_ids) for r in refs)
            # A refused request raises the engine's ValueError and leaves nothing behind.
            with pytest.raises(ValueError, match="max_model_len"):
                await _drain(allm.generate([1] * 127, SamplingParams(max_tokens=5), "too-long"))
            assert allm.num_unstarted == 0
        finally:
            await allm.shutdown()
    asyncio.run(main())


def test_from_path_with_text_prompt(model_path, llm):
    """DESIGN's spelling: AsyncLLM(path, **LLM kwargs).generate(text, params, id)."""
    params = SamplingParams(temperature=0, max_tokens=6)
    ref = llm.generate("Hello world", params, use_tqdm=False)[0].outputs[0]

    async def main():
        allm = AsyncLLM(str(model_path), device="cpu", max_model_len=128, num_kv_blocks=16)
        try:
            return await _drain(allm.generate("Hello world", params, "text"))
        finally:
            await allm.shutdown()
    assert asyncio.run(main()) == (ref.token_ids, ref.text, ref.finish_reason)


def test_failed_step_fails_only_its_requests(llm, monkeypatch):
    """The engine's step contract: it aborts the failed step's requests and re-raises.
    Here a step raises once after aborting request "victim" only (what LLMEngine.step
    does for the requests it scheduled); "bystander" must finish as if nothing happened."""
    engine = llm.llm_engine
    real_step = engine.step
    state = {"armed": False, "failed": 0}

    def step():
        if state["armed"] and "victim" in engine.get_unfinished_request_ids():
            state["armed"] = False
            state["failed"] += 1
            engine.abort_request("victim")
            raise RuntimeError("injected fault")
        return real_step()
    monkeypatch.setattr(engine, "step", step)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    ref = llm_generate_unpatched(real_step, llm, PROMPTS[1], params)

    async def main():
        allm = AsyncLLM(llm)
        allm.start()
        try:
            victim = allm.generate(PROMPTS[0], params, "victim")
            bystander = asyncio.ensure_future(_drain(allm.generate(PROMPTS[1], params, "bystander")))
            first = await victim.__anext__()
            assert first.outputs[0].token_ids
            state["armed"] = True
            with pytest.raises(EngineStepError, match="injected fault"):
                async for _ in victim:
                    pass
            ids, text, finish = await bystander
            assert ids == ref.token_ids and text == ref.text
            assert state["failed"] == 1
            # The loop is still serving.
            again = await _drain(allm.generate(PROMPTS[1], params, "after"))
            assert again[0] == ref.token_ids
            await _idle(allm)
        finally:
            await allm.shutdown()
    asyncio.run(main())


def llm_generate_unpatched(real_step, llm, prompt, params):
    engine = llm.llm_engine
    patched = engine.step
    engine.step = real_step
    try:
        return llm.generate([prompt], params, use_tqdm=False)[0].outputs[0]
    finally:
        engine.step = patched


def test_abort_all_gives_each_stream_the_error(llm):
    params = SamplingParams(temperature=0, max_tokens=100, ignore_eos=True)

    async def main():
        allm = AsyncLLM(llm)                 # started by the first request
        try:
            gens = [allm.generate(p, params, f"a{i}") for i, p in enumerate(PROMPTS[:3])]
            for g in gens:
                await g.__anext__()
            allm.abort_all(RequestAbortedError("shutting down"))
            for g in gens:
                with pytest.raises(RequestAbortedError, match="shutting down"):
                    async for _ in g:
                        pass
            assert (await _idle(allm)).kv_blocks_used == 0
        finally:
            await allm.shutdown()
    asyncio.run(main())
