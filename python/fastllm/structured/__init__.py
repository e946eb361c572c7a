"""Structured outputs: grammars compiled ahead of the step (xgrammar), one matcher per
sample advanced after sampling, and a token bitmask the sampler applies.

    manager = StructuredOutputManager(tokenizer, vocab_size)   # the engine owns it
    request = manager.submit(StructuredOutputsParams(json=schema))   # ValueError if invalid
    grammar = manager.grammar_for(request)      # None until its compilation is done
    bitmask = manager.fill_bitmask([grammar])   # [rows, ceil(vocab/32)] int32, bit set = allowed

See fastllm.structured.manager for where each piece runs.
"""
from fastllm.structured.grammar import StructuredOutputGrammar
from fastllm.structured.manager import StructuredOutputManager, StructuredOutputRequest

__all__ = ["StructuredOutputGrammar", "StructuredOutputManager", "StructuredOutputRequest"]
