"""Helpers to build engines over tiny models and run them to completion."""

from __future__ import annotations

import torch

from pdserve.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from pdserve.engine.engine import LLMEngine
from pdserve.engine.outputs import RequestOutput


def make_engine(loaded, *, num_blocks: int = 256, block_size: int = 4, max_num_batched_tokens: int = 512,
                max_num_seqs: int = 64, prefix_caching: bool = True, num_cached_logits: int = 32,
                compile_max_batch: int = 0) -> LLMEngine:
    config = EngineConfig(
        compile_max_batch=compile_max_batch,
        cache=CacheConfig(num_blocks=num_blocks, block_size=block_size, enable_prefix_caching=prefix_caching,
                          num_cached_logits=num_cached_logits),
        scheduler=SchedulerConfig(max_num_batched_tokens=max_num_batched_tokens, max_num_seqs=max_num_seqs),
    )
    return LLMEngine(config, loaded)


def run_to_completion(engine: LLMEngine, on_step=None) -> dict[str, list[RequestOutput]]:
    outputs: dict[str, list[RequestOutput]] = {}
    while engine.has_unfinished():
        for out in engine.step():
            outputs.setdefault(out.request_id, []).append(out)
        if on_step is not None:
            on_step(engine)
    return outputs


def tokens_of(outputs: list[RequestOutput]) -> list[int]:
    return [t for out in outputs for t in out.token_ids]


def random_prompts(lengths, vocab: int = 512, seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


def hf_greedy(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    """The oracle: transformers' generate, greedy; stops after EOS like the engine."""
    out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, len(prompt):].tolist()
