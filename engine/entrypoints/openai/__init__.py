"""The OpenAI-compatible HTTP server (`pagedllm serve`, `python -m engine.entrypoints.openai`)."""
