"""The same engine on a CUDA device: skipped on machines without one."""

from __future__ import annotations

import pytest
import torch

from pdserve.engine.config import CacheConfig, EngineConfig
from pdserve.engine.engine import LLMEngine
from pdserve.engine.model_loader import load_model
from pdserve.engine.sampling_params import SamplingParams
from tests.engine_helpers import hf_greedy, random_prompts, run_to_completion, tokens_of

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine"),
]


def test_greedy_on_cuda_matches_transformers(tiny_model_dirs, tiny_oracles):
    loaded = load_model(str(tiny_model_dirs["llama"]), dtype="float32", device="cuda")
    engine = LLMEngine(EngineConfig(device="cuda", cache=CacheConfig(num_blocks=128, block_size=4)), loaded)
    prompts = random_prompts((3, 17, 40))
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, SamplingParams(max_tokens=16, temperature=0.0))
    outs = run_to_completion(engine)
    for i, p in enumerate(prompts):
        assert tokens_of(outs[str(i)]) == hf_greedy(tiny_oracles["llama"], p, 16)
    assert engine.stats().num_used == 0


def test_samples_and_structured_output_on_cuda(tiny_model_dirs):
    """n samples fork on the device's cache, and the masks apply to logits on the device (the reference)."""
    import re

    from pdserve.engine.sampling_params import StructuredOutput

    loaded = load_model(str(tiny_model_dirs["llama"]), dtype="float32", device="cuda")
    engine = LLMEngine(EngineConfig(device="cuda", cache=CacheConfig(num_blocks=128, block_size=4)), loaded)
    engine.add_request("r", random_prompts((13,))[0], SamplingParams(
        max_tokens=12, temperature=1.0, seed=1, n=3, structured_output=StructuredOutput(regex="[ab]{2,6}")))
    texts: dict[int, str] = {}
    for out in run_to_completion(engine)["r"]:
        texts[out.index] = texts.get(out.index, "") + out.text
    assert sorted(texts) == [0, 1, 2] and all(re.fullmatch("[ab]{2,6}", t) for t in texts.values())
    assert engine.stats().num_used == 0
