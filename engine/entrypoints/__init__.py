"""Ways into the engine besides the offline `LLM` API: the OpenAI-compatible server."""
