"""pdserve-decode: KV imported into the paged cache, continuous-batching decode, tokens streamed out."""
