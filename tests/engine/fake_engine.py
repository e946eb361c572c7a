"""A fake model and tokenizer that make LLMEngine's paging observable (shared by the
engine tests: from fake_engine import ...).

The fake model writes each token's id (K) and position (V) into the paged KV cache
through slot_mapping, then reads every sequence's whole history back through its
block table: positions must come back as 0..seq_len-1 and the next token is a hash of
the token ids *read from the cache*. So any slot_mapping / block_table / prefix-cache /
fork / swap / preemption bug changes the outputs, which are checked against a plain
Python reference that knows nothing about paging (reference_generate). Fast enough for
hundreds of requests.
"""
import torch

from fastllm import reference
from fastllm.config import EngineConfig, ModelConfig
from fastllm.engine.llm_engine import LLMEngine

VOCAB, EOS = 64, 2


NEWLINE = 10      # FakeTokenizer: decodes to "\n"; every other id to one letter


def next_token(tokens):
    h = 0
    for t in tokens:
        h = (h * 1000003 + t + 1) % 2_147_483_647
    return h % VOCAB


def reference_generate(prompt, max_tokens, ignore_eos=False, stop_token_ids=(), min_tokens=0):
    tokens, out = list(prompt), []
    stops = set(stop_token_ids) | (set() if ignore_eos else {EOS})
    while len(out) < max_tokens:
        t = next_token(tokens)
        if len(out) < min_tokens and t in stops:
            t = 0        # the sampler bans stop ids; the best of the all-zero logits is id 0
        tokens.append(t)
        out.append(t)
        if len(out) >= min_tokens and ((t == EOS and not ignore_eos) or t in stop_token_ids):
            break
    return out


class FakeTokenizer:
    """Just what the engine needs: eos ids (the tokenizer is their only source) and
    decode() for the incremental detokenizer. Token t is one character."""
    eos_token_ids = [EOS]

    def decode(self, ids, skip_special_tokens=True, clean_up_tokenization_spaces=False):
        return "".join("\n" if t == NEWLINE else chr(ord("a") + t % 26) for t in ids
                       if not (skip_special_tokens and t == EOS))


class FakeModel:
    def __init__(self):
        self.tokens_fed = 0
        self.calls = []

    def __call__(self, input_ids, positions, kv_caches, meta):
        k_cache, v_cache = kv_caches[0]
        num_tokens = input_ids.shape[0]
        self.tokens_fed += num_tokens
        self.calls.append(num_tokens)
        key = input_ids.float().view(num_tokens, 1, 1).expand(num_tokens, 1, 2)
        value = positions.float().view(num_tokens, 1, 1).expand(num_tokens, 1, 2)
        reference.reshape_and_cache(key.contiguous(), value.contiguous(), k_cache, v_cache,
                                    meta.slot_mapping)
        logits = torch.zeros(len(meta.seq_lens), VOCAB)
        for s, seq_len in enumerate(meta.seq_lens.tolist()):
            toks = reference.gather_kv(k_cache, meta.block_tables[s], seq_len)[:, 0, 0]
            pos = reference.gather_kv(v_cache, meta.block_tables[s], seq_len)[:, 0, 0]
            assert pos.tolist() == list(range(seq_len)), "KV cache positions scrambled"
            logits[s, next_token([int(t) for t in toks.tolist()])] = 10.0
        return logits


def make_engine(model=None, **kw):
    model_config = ModelConfig(architecture="LlamaForCausalLM", vocab_size=VOCAB, hidden_size=8,
                               intermediate_size=8, num_hidden_layers=1, num_attention_heads=1,
                               num_key_value_heads=1, head_dim=2, max_position_embeddings=512)
    kw.setdefault("block_size", 4)
    kw.setdefault("num_kv_blocks", 64)
    return LLMEngine(model or FakeModel(), model_config, EngineConfig(**kw), FakeTokenizer(),
                     device=torch.device("cpu"), dtype=torch.float32)


def run_all(engine):
    finished = {}
    for _ in range(100_000):
        if not engine.has_unfinished_requests():
            break
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
    assert not engine.has_unfinished_requests()
    return finished


def assert_clean(engine):
    """Every block free, every ref count zero, counters consistent."""
    bm = engine.block_manager
    alloc = bm.allocator
    assert alloc.num_in_use == 0
    assert alloc.num_free == bm.num_blocks
    assert all(alloc.ref_count(b) == 0 for b in range(bm.num_blocks))
    sch = engine.scheduler
    assert not sch.running and not sch.waiting and not sch.swapped and not sch.groups
    assert engine.block_manager.num_swap_blocks_used == 0


def random_prompts(n, rng, lo=1, hi=40):
    return [[rng.randrange(3, VOCAB) for _ in range(rng.randint(lo, hi))] for _ in range(n)]
