"""pdserve-prefill: preprocessing and prefill, the KV streamed to decode workers; test-only fault injection."""
