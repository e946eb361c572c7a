"""Text in and out: the HF/GGUF tokenizer, the GGUF vocabulary reader, the chat
template and the incremental (streaming) detokenizer."""
from fastllm.tokenizer.detokenizer import IncrementalDetokenizer, find_stop_string
from fastllm.tokenizer.tokenizer import Tokenizer

__all__ = ["Tokenizer", "IncrementalDetokenizer", "find_stop_string"]
