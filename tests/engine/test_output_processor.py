"""OutputProcessor: stop strings held back from streamed text, FINAL_ONLY outputs
built once."""
import random

import pytest
import torch

from fake_engine import (NEWLINE, VOCAB, FakeModel, assert_clean, make_engine, random_prompts,
                         reference_generate)
from fastllm.sampling_params import SamplingParams


class ScriptedModel(FakeModel):
    """Output i of every sequence is SCRIPT[i] (the prompt has PROMPT_LEN tokens)."""
    PROMPT_LEN = 3
    SCRIPT = [0, NEWLINE, NEWLINE, 1, 3]            # "a", "\n", "\n", "b", "d"

    def __call__(self, input_ids, positions, kv_caches, meta):
        super().__call__(input_ids, positions, kv_caches, meta)
        logits = torch.zeros(len(meta.seq_lens), VOCAB)
        for s, seq_len in enumerate(meta.seq_lens.tolist()):
            logits[s, self.SCRIPT[seq_len - self.PROMPT_LEN]] = 10.0
        return logits


@pytest.mark.parametrize("stop, final", [("\n\n", "a"), ("\nb", "a\n"), ("zz", "a\n\nbd")])
def test_streamed_text_never_includes_a_stop_string_cut_later(stop, final):
    """"\n" arrives one step before the "\n" that completes the stop string: the stream
    must not have sent it, so the deltas concatenate to the final text, and every
    cumulative output is a prefix of the final one."""
    from fastllm.sampling_params import RequestOutputKind
    engine = make_engine(model=ScriptedModel(), max_model_len=64)
    prompt = [5, 6, 7]
    engine.add_request("delta", prompt, SamplingParams(temperature=0, max_tokens=5, stop=stop,
                                                       ignore_eos=True), delta=True)
    engine.add_request("cumulative", prompt, SamplingParams(
        temperature=0, max_tokens=5, stop=stop, ignore_eos=True,
        output_kind=RequestOutputKind.CUMULATIVE))
    deltas, cumulative, last = [], [], {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            last[o.request_id] = o
            (deltas if o.request_id == "delta" else cumulative).append(o.outputs[0].text)
    assert last["delta"].finished and last["cumulative"].outputs[0].text == final
    assert "".join(deltas) == final
    assert all(final.startswith(text) for text in cumulative)
    reason = "length" if stop == "zz" else "stop"
    assert last["delta"].outputs[0].finish_reason == reason
    assert_clean(engine)


def test_final_only_builds_one_output_per_request(monkeypatch):
    from fastllm.sampling_params import RequestOutputKind
    engine = make_engine(max_model_len=64)
    built = []
    make_output = engine.output_processor.make_output
    monkeypatch.setattr(engine.output_processor, "make_output",
                        lambda g: built.append(g.request_id) or make_output(g))
    prompts = random_prompts(6, random.Random(11))
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, SamplingParams(temperature=0, max_tokens=6,
                                                     output_kind=RequestOutputKind.FINAL_ONLY))
    seen = []
    while engine.has_unfinished_requests():
        for o in engine.step():
            assert o.finished
            seen.append(o.request_id)
            assert o.outputs[0].token_ids == reference_generate(prompts[int(o.request_id)], 6)
    assert sorted(seen) == sorted(built) == sorted(str(i) for i in range(6))
    assert_clean(engine)
