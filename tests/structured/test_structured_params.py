"""StructuredOutputsParams: exactly one constraint, shapes checked, and it rides in
SamplingParams through a pickle (SchedulerOutput.new_requests to a worker process)."""
from __future__ import annotations

import pickle

import numpy as np
import pytest

from fastllm import SamplingParams, StructuredOutputsParams
from fastllm.engine.step_data import NewRequest, SchedulerOutput

from schemas import PERSON_SCHEMA


@pytest.mark.parametrize("kwargs, field", [
    ({}, "exactly one"),
    ({"json": PERSON_SCHEMA, "regex": "a+"}, "exactly one"),
    ({"choice": ["a"], "json_object": True}, "exactly one"),
    ({"json": 5}, "StructuredOutputsParams.json"),
    ({"regex": ""}, "StructuredOutputsParams.regex"),
    ({"grammar": 3}, "StructuredOutputsParams.grammar"),
    ({"choice": []}, "StructuredOutputsParams.choice"),
    ({"choice": "ab"}, "StructuredOutputsParams.choice"),
    ({"choice": ["a", ""]}, "StructuredOutputsParams.choice"),
    ({"json_object": "yes"}, "StructuredOutputsParams.json_object"),
    ({"regex": "a", "disable_any_whitespace": 1}, "disable_any_whitespace"),
])
def test_bad_params_raise_value_error_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        StructuredOutputsParams(**kwargs)


def test_sampling_params_refuses_a_non_params_value():
    with pytest.raises(ValueError, match="SamplingParams.structured_outputs"):
        SamplingParams(structured_outputs={"json": PERSON_SCHEMA})


@pytest.mark.parametrize("kwargs, kind", [({"json": PERSON_SCHEMA}, "json"), ({"regex": "a+"}, "regex"),
                                          ({"choice": ("x", "y")}, "choice"),
                                          ({"grammar": 'root ::= "a"'}, "grammar"),
                                          ({"json_object": True}, "json_object")])
def test_kind_and_pickle_round_trip(kwargs, kind):
    params = SamplingParams(max_tokens=8, structured_outputs=StructuredOutputsParams(**kwargs))
    assert params.structured_outputs.kind == kind
    out = SchedulerOutput(new_requests=[NewRequest("r", [1, 2], params)],
                          grammar_bitmask=np.arange(6, dtype=np.int32).reshape(2, 3), grammar_seq_ids=[4, 7])
    back = pickle.loads(pickle.dumps(out))
    assert back.new_requests[0].sampling_params == params
    assert back.new_requests[0].sampling_params.clone().structured_outputs == params.structured_outputs
    np.testing.assert_array_equal(back.grammar_bitmask, out.grammar_bitmask)
    assert back.grammar_seq_ids == [4, 7]
