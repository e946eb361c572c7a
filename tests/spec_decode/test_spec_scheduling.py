"""The scheduler's side of speculative decoding on a hand-made case: n-gram drafts as
worked out by hand, lookahead slots, advance by the accepted tokens, rollback of the
rejected ones' KV (blocks freed, never offered to the prefix cache), acceptance stats;
and the n-gram proposer itself."""
from fastllm.config import EngineConfig
from fastllm.engine.block_manager import BlockManager
from fastllm.engine.scheduler import Scheduler
from fastllm.engine.sequence import SequenceGroup
from fastllm.engine.step_data import RunnerOutput, SampledToken
from fastllm.sampling_params import SamplingParams
from fastllm.spec_decode.ngram import NgramProposer
from fastllm.spec_decode.planner import SpecPlanner
from fastllm.utils import cdiv

BS = 2


def step(sched, sampled_ids):
    out = sched.schedule()
    [s] = out.scheduled
    result = RunnerOutput(seq_ids=[s.seq_id], sampled=[[SampledToken(t, None, None) for t in sampled_ids]])
    sched.update(out, result)
    return s


def test_hand_made_speculation():
    cfg = EngineConfig(max_model_len=64, block_size=BS, num_kv_blocks=32, speculative_config={
        "method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1, "prompt_lookup_max": 2})
    bm = BlockManager(32, BS, enable_prefix_caching=True)
    sched = Scheduler(cfg, bm, spec_planner=SpecPlanner(cfg.speculative_config))
    group = SequenceGroup("r", None, [1, 2, 3, 4, 5, 1, 2], SamplingParams(temperature=0, max_tokens=20))
    sched.add(group)
    seq = group.seqs[0]

    s = step(sched, [3])                              # prefill: no drafts
    assert (s.token_ids, s.num_lookahead, s.num_draft_tokens) == ([1, 2, 3, 4, 5, 1, 2], 0, 0)
    # Suffix [2, 3] last occurred at 1..2, followed by 4, 5, 1: fed with the last token.
    s = step(sched, [4, 5, 9])                        # 2 drafts accepted, 9 corrects the third
    assert (s.token_ids, s.start, s.num_lookahead, s.num_draft_tokens) == ([3, 4, 5, 1], 7, 3, 3)
    assert len(s.block_table) == cdiv(7 + 4, BS)
    assert seq.token_ids[7:] == [3, 4, 5, 9] and seq.num_computed_tokens == 10
    assert len(seq.block_table) == cdiv(11, BS)
    # Neither [5, 9] nor [9] occurred before: a plain decode.
    s = step(sched, [1])
    assert (s.token_ids, s.num_lookahead) == ([9], 0)
    # [9, 1] no; [1] last at 5, followed by 2, 3, 4 -- all rejected, the target says 8.
    s = step(sched, [8])
    assert (s.token_ids, s.start, s.num_draft_tokens) == ([1, 2, 3, 4], 11, 3)
    assert len(s.block_table) == cdiv(15, BS) == 8
    assert seq.token_ids[11:] == [1, 8] and seq.num_computed_tokens == 12
    assert len(seq.block_table) == cdiv(13, BS) == 7 == bm.num_used_blocks   # one block freed
    # Only blocks of computed tokens went to the prefix cache (none holding a rejected draft).
    assert seq.num_registered_blocks == 12 // BS
    assert (sched.num_spec_draft_tokens, sched.num_spec_accepted_tokens, sched.num_spec_verifications) == (6, 2, 2)
    assert (seq.num_spec_draft_tokens, seq.num_spec_accepted_tokens) == (6, 2)
    sched.abort("r")
    assert bm.num_used_blocks == 0


def test_lookahead_capped_by_max_tokens_and_stops():
    """3 output tokens left: at most 2 drafts; an accepted stop token ends the sequence
    there (the tokens after it are dropped) and frees every block."""
    cfg = EngineConfig(max_model_len=64, block_size=BS, num_kv_blocks=32, speculative_config={
        "method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1})
    bm = BlockManager(32, BS)
    sched = Scheduler(cfg, bm, spec_planner=SpecPlanner(cfg.speculative_config))
    params = SamplingParams(temperature=0, max_tokens=4, stop_token_ids=[7])
    params.update_from_tokenizer([])
    group = SequenceGroup("r", None, [5, 6, 7, 5, 6, 7, 5], params)
    sched.add(group)
    step(sched, [6])
    s = step(sched, [7, 5, 9])       # [5, 6] -> 7, 5 (2 drafts, not 4: 3 outputs left)
    assert s.token_ids == [6, 7, 5]
    seq = group.seqs[0]
    assert seq.output_token_ids == [6, 7]
    assert (seq.status.finish_reason, seq.stop_reason) == ("stop", 7)
    assert bm.num_used_blocks == 0


def test_ngram_proposer():
    ngram = NgramProposer(prompt_lookup_min=2, prompt_lookup_max=3)
    assert ngram.propose([1, 2, 3, 9, 1, 2, 3], 2) == [9, 1]        # 3-gram [1, 2, 3] at 0
    assert ngram.propose([7, 2, 3, 8, 1, 2, 3], 4) == [8, 1, 2, 3]  # only the 2-gram [2, 3]
    assert ngram.propose([2, 3, 5, 2, 3, 6, 2, 3], 1) == [6]        # the latest match wins
    assert ngram.propose([1, 2, 3, 4], 3) == []                     # no repeat
    assert ngram.propose([4, 4], 3) == []                           # shorter than min + 1
    assert ngram.propose([1, 2, 1, 2], 5) == [1, 2]                 # overlap: what is there


def test_engine_stats_rates():
    """6 of 9 drafts accepted over 3 verifying sequence-steps: rate 2/3, 1 + 6/3 = 3
    tokens per step; none verified yet: None, and format() leaves the line out."""
    from fastllm.engine.stats import EngineStats
    zeros = dict.fromkeys(("num_running", "num_waiting", "num_swapped", "kv_blocks_used",
                           "kv_block_usage", "kv_slot_utilization", "prefix_cache_hit_rate",
                           "num_preemptions", "num_swaps_out", "num_prompt_tokens_computed",
                           "num_generation_tokens", "num_steps"), 0)
    stats = EngineStats(kv_blocks_total=1, spec_num_draft_tokens=9, spec_num_accepted_tokens=6,
                        spec_num_verifications=3, **zeros)
    assert stats.spec_acceptance_rate == 6 / 9 and stats.spec_mean_accepted_length == 3.0
    assert "6/9 drafts accepted (66.7%), mean accepted length 3.00" in stats.format()
    idle = EngineStats(kv_blocks_total=1, **zeros)
    assert idle.spec_acceptance_rate is None and idle.spec_mean_accepted_length is None
    assert "speculative" not in idle.format()
