"""validate_parallel: a model that cannot be split as asked is refused with the numbers;
partition_layers: uneven pipeline splits and the FASTLLM_PP_LAYER_PARTITION override."""
from __future__ import annotations

import pytest

from fastllm.config import ModelConfig, ParallelConfig
from fastllm.distributed import partition_layers, validate_parallel
from fastllm.distributed.sharding import head_split


def config(**overrides) -> ModelConfig:
    fields = dict(architecture="LlamaForCausalLM", vocab_size=383, hidden_size=64,
                  intermediate_size=128, num_hidden_layers=5, num_attention_heads=8,
                  num_key_value_heads=2, head_dim=8)
    return ModelConfig(**{**fields, **overrides})


@pytest.mark.parametrize("overrides, tp, pp, message", [
    ({}, 3, 1, "num_attention_heads=8 is not divisible by tensor_parallel_size=3"),
    ({"num_attention_heads": 12, "num_key_value_heads": 3}, 2, 1,
     "num_key_value_heads=3 cannot be split over tensor_parallel_size=2"),
    ({"num_attention_heads": 12, "num_key_value_heads": 3}, 4, 1,
     "num_key_value_heads=3 cannot be split over tensor_parallel_size=4"),
    ({"intermediate_size": 100}, 8, 1, "intermediate_size=100 is not divisible by tensor_parallel_size=8"),
    ({}, 1, 6, "num_hidden_layers=5 is fewer than pipeline_parallel_size=6"),
])
def test_unsplittable_models_are_refused_with_the_numbers(overrides, tp, pp, message):
    with pytest.raises(ValueError, match=message):
        validate_parallel(config(**overrides), ParallelConfig(tp, pp))


@pytest.mark.parametrize("tp, pp", [(1, 1), (2, 1), (4, 1), (8, 1), (2, 5), (1, 2)])
def test_splittable_models_pass(tp, pp):
    validate_parallel(config(), ParallelConfig(tp, pp))     # 8 heads, 2 KV heads (replicated at 4, 8)


def test_kv_heads_split_or_replicated_to_the_q_heads_that_read_them():
    c = config()                                            # 8 q heads, 2 KV heads: 4 q per KV
    assert [head_split(c, 2, r) for r in range(2)] == [(4, 1, 0, 0), (4, 1, 4, 1)]
    # tp 4: q heads 0-1, 2-3 read KV head 0; 4-5, 6-7 read KV head 1.
    assert [head_split(c, 4, r).kv_start for r in range(4)] == [0, 0, 1, 1]
    assert [head_split(c, 8, r).kv_start for r in range(8)] == [0, 0, 0, 0, 1, 1, 1, 1]


def test_partition_layers_uneven_and_override(monkeypatch):
    monkeypatch.delenv("FASTLLM_PP_LAYER_PARTITION", raising=False)
    assert partition_layers(5, 2) == [(0, 3), (3, 5)]
    assert partition_layers(7, 3) == [(0, 3), (3, 5), (5, 7)]
    assert partition_layers(4, 4) == [(0, 1), (1, 2), (2, 3), (3, 4)]
    monkeypatch.setenv("FASTLLM_PP_LAYER_PARTITION", "1,4")
    assert partition_layers(5, 2) == [(0, 1), (1, 5)]
    for bad in ("1,3", "5,0", "2,2,1", "a,b"):
        monkeypatch.setenv("FASTLLM_PP_LAYER_PARTITION", bad)
        with pytest.raises(ValueError, match="FASTLLM_PP_LAYER_PARTITION"):
            partition_layers(5, 2)
