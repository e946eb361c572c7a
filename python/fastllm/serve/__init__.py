"""fastllm's OpenAI-compatible HTTP server: `python -m fastllm.serve --model PATH` or
`fastllm serve PATH`. See fastllm.serve.app (routes) and fastllm.serve.server (the process)."""
