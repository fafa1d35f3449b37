"""Model forward passes written over pdserve's paged KV cache."""
