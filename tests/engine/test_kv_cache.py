"""KV cache memory: the GPU profile step through the real step path (run here on the
CPU), the seed after it, and the swap space's layout."""
import torch

from fake_engine import VOCAB, FakeModel, FakeTokenizer, make_engine, run_all
from fastllm.config import EngineConfig, ModelConfig
from fastllm.engine.llm_engine import LLMEngine
from fastllm.sampling_params import SamplingParams


def test_kv_sizing_profiles_the_sampler_at_its_peak(monkeypatch):
    """The GPU profile samples max_num_seqs rows of the whole vocab with every filter,
    penalty and logprobs on, over non-empty token lists: a real step's peak."""
    from fastllm.engine import kv_cache
    from fastllm.model.layers import allocate_kv_caches
    engine = make_engine(max_num_seqs=7, max_num_batched_tokens=1100)
    runner = engine.runner
    seen = []
    sampler = runner.sampler
    monkeypatch.setattr(runner, "sampler",
                        lambda logits, batch: seen.append((logits.shape, batch)) or sampler(logits, batch))
    fed = runner.model.tokens_fed
    out, num_blocks = kv_cache.profile_step(engine.config, VOCAB)
    result = runner.profile_step(out, allocate_kv_caches(engine.model_config, num_blocks, 4))
    # max_model_len 512: prompts of 512, 512 and 76 tokens, all fed through the real path.
    assert [s.num_tokens for s in out.scheduled] == [512, 512, 76]
    assert runner.model.tokens_fed - fed == 1100
    assert sum(len(t) for t in result.sampled) == 7 and len(runner.requests) == 0
    (shape, batch), = seen
    assert tuple(shape) == (7, VOCAB)
    assert batch.top_p is not None and batch.top_k is not None and batch.min_p is not None
    assert not batch.all_greedy and batch.max_num_logprobs == 20
    for penalty in (batch.presence_penalty, batch.frequency_penalty, batch.repetition_penalty):
        assert penalty is not None and bool((penalty != 0).all())
    assert bool((batch.repetition_penalty != 1).all())
    for rows, ids in (batch.prompt_tokens, batch.output_tokens):
        assert sorted(set(rows.tolist())) == list(range(7)) and len(ids) >= 7


def test_the_seed_does_not_depend_on_the_startup_profile(monkeypatch):
    """torch.manual_seed(seed) runs after the runner is built: the KV profile (here run
    on CPU as on a GPU) draws as many random numbers as max_num_seqs asks for, and must
    not change the unseeded samples."""
    from fastllm.engine import kv_cache
    from fastllm.engine.model_runner import ModelRunner
    from fastllm.model.layers import allocate_kv_caches

    def profiled(self):
        out, num_blocks = kv_cache.profile_step(self.config, VOCAB)
        self.profile_step(out, allocate_kv_caches(self.model_config, num_blocks, self.config.block_size))
        return 64
    monkeypatch.setattr(ModelRunner, "_auto_num_blocks", profiled)
    samples = []
    for max_num_seqs in (3, 5):
        engine = make_engine(num_kv_blocks=None, max_num_seqs=max_num_seqs, max_model_len=64, seed=11)
        for i in range(3):
            engine.add_request(str(i), [5 + i, 6, 7], SamplingParams(temperature=50.0, max_tokens=8,
                                                                     ignore_eos=True))
        out = run_all(engine)
        samples.append([out[str(i)].outputs[0].token_ids for i in range(3)])
    assert samples[0] == samples[1]
    assert len({t for seq in samples[0] for t in seq}) > 5        # really random draws


def test_swap_space_is_one_tensor_with_per_layer_views():
    model_config = ModelConfig(architecture="LlamaForCausalLM", vocab_size=VOCAB, hidden_size=8,
                               intermediate_size=8, num_hidden_layers=3, num_attention_heads=2,
                               num_key_value_heads=2, head_dim=4, max_position_embeddings=512)
    engine = LLMEngine(FakeModel(), model_config,
                       EngineConfig(block_size=4, num_kv_blocks=16, swap_space=0.0001),
                       FakeTokenizer(), device=torch.device("cpu"), dtype=torch.float32)
    kv = engine.runner.kv
    n = kv.num_swap_blocks
    assert n == int(0.0001 * (1 << 30)) // kv.bytes_per_block > 0
    assert kv.bytes_per_block == 2 * 3 * 4 * 2 * 4 * 4          # K+V, layers, block, heads, dim, fp32
    assert engine.block_manager.num_swap_blocks == n             # the ids are the block manager's
    assert tuple(kv.swap_tensor.shape) == (3, 2, n) + tuple(kv.kv_caches[0][0].shape[1:])
    assert len(kv.swap_caches) == 3
    base = kv.swap_tensor.untyped_storage().data_ptr()
    for layer, (k, v) in enumerate(kv.swap_caches):
        assert k.untyped_storage().data_ptr() == v.untyped_storage().data_ptr() == base
        assert k.data_ptr() == kv.swap_tensor[layer, 0].data_ptr()
        assert v.data_ptr() == kv.swap_tensor[layer, 1].data_ptr()
        assert k.shape == (n,) + kv.kv_caches[layer][0].shape[1:]
