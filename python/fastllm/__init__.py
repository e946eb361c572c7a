"""fastllm: a small, fast LLM inference engine (vLLM's API names, C++/CUDA core)."""
__version__ = "0.1.0"

from fastllm.openmp_env import prefer_passive_openmp

prefer_passive_openmp()   # before anything imports torch (see fastllm.openmp_env)

_LAZY = {
    "LLM": "fastllm.llm",
    "SamplingParams": "fastllm.sampling_params",
    "RequestOutputKind": "fastllm.sampling_params",
    "StructuredOutputsParams": "fastllm.sampling_params",
    "RequestOutput": "fastllm.outputs",
    "CompletionOutput": "fastllm.outputs",
}


def __getattr__(name):
    # Lazy so that `import fastllm` stays cheap (torch is imported only when needed).
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fastllm' has no attribute {name!r}")


__all__ = list(_LAZY)
