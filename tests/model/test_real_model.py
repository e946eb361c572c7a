"""The real default model (SmolLM2-135M-Instruct, Q4_1 GGUF) end to end: fastllm's greedy
tokens against transformers loading the same GGUF (gguf_file=, dequantized to float32;
fastllm dequantized too, quantization=None), the quantized default (quantization="gguf")
against the dequantized model, and the CLI's answer to the README's first command."""
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from fastllm import LLM, SamplingParams  # noqa: E402
from fastllm import generate, ops  # noqa: E402

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]
MAX_TOKENS = 20


@pytest.fixture(scope="module")
def llm(gguf_path):
    return LLM(str(gguf_path), dtype="float32", device="cpu", quantization=None)


@pytest.fixture(scope="module")
def hf(gguf_path):
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    return model.eval(), tok


@pytest.mark.slow
def test_greedy_tokens_match_transformers(llm, hf):
    model, hf_tok = hf
    chat = llm.get_tokenizer().apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    prompts = [hf_tok(p)["input_ids"] for p in PROMPTS] + [chat]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=MAX_TOKENS), use_tqdm=False)
    eos = set(llm.get_tokenizer().eos_token_ids)
    for ids, out in zip(prompts, outs):
        with torch.no_grad():
            ref = model.generate(torch.tensor([ids]), max_new_tokens=MAX_TOKENS, do_sample=False)[0, len(ids):]
        ours = out.outputs[0].token_ids
        assert ours == ref.tolist()[:len(ours)], (ids, ours, ref.tolist())
        assert len(ours) == MAX_TOKENS or ours[-1] in eos  # stopped only at the length limit or an eos
    assert "Paris" in outs[0].outputs[0].text and "Paris" in outs[-1].outputs[0].text


@pytest.mark.slow
def test_readme_command_says_paris(gguf_path, capsys, monkeypatch):
    monkeypatch.setenv("FASTLLM_CACHE", str(gguf_path.parent))  # the default model, already cached
    assert generate.main(["--prompt", "The capital of France is", "--max-tokens", "8", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("The capital of France is") and "Paris" in out


@pytest.mark.slow
def test_quantized_default_matches_dequantized(llm, gguf_path, monkeypatch):
    """The same weights, kept in Q4_1/Q8_0 blocks: with fp32 activations only the fp32
    summation order differs, so greedy tokens agree (a near-tie may flip one prompt late;
    the Paris one must hold). With the default int8 activations (llama.cpp's rounding of
    x, 0.1-0.3 in logprob: greedy runs part at a near tie) the README's prompt still says
    Paris (the chat one does not, on this Q4_1 file, in llama.cpp either: "L'Etoile, ...")."""
    from fastllm.model.quant_linear import QuantLinear
    chat = llm.get_tokenizer().apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    prompts = PROMPTS + [chat]
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS)
    want = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    try:
        monkeypatch.setenv("FASTLLM_CPU_INT8_ACTIVATIONS", "0")    # applied when the GGUF loads
        quant = LLM(str(gguf_path), dtype="float32", device="cpu")   # quantization="auto" -> "gguf"
        assert isinstance(quant.llm_engine.runner.model.layers[0].mlp.down_proj, QuantLinear)
        ours = [o.outputs[0].token_ids for o in quant.generate(prompts, params, use_tqdm=False)]
        assert ours[0] == want[0] and ours[-1] == want[-1]
        assert sum(a == b for a, b in zip(ours, want)) >= len(prompts) - 1, (ours, want)
        monkeypatch.setenv("FASTLLM_CPU_INT8_ACTIVATIONS", "1")
        int8 = LLM(str(gguf_path), dtype="float32", device="cpu")
        assert "Paris" in int8.generate([PROMPTS[0]], params, use_tqdm=False)[0].outputs[0].text
    finally:
        ops.set_cpu_int8_activations(True)
