"""Through the router, every turn of a conversation goes to the decode worker that holds the earlier
turns, which then takes them from its prefix cache (only the new tokens' KV moves); the answers are the
oracle's. Concurrent prompts that share nothing are still spread by load."""

from __future__ import annotations

import asyncio

import pytest

from pdserve.client import AsyncClient
from pdserve.cluster import ClusterSpec, LocalCluster
from tests.cluster_helpers import stream_all
from tests.engine_helpers import hf_greedy, random_prompts

MAX_TOKENS = 8
TURNS = 5
CONVERSATIONS = 8


@pytest.fixture(scope="module")
def cluster(tiny_dir):
    spec = ClusterSpec(num_prefill=1, num_decode=2, model=tiny_dir, dtype="float32", kv_cache_gib=0.05,
                       heartbeat_s=0.3)
    with LocalCluster(spec) as c:
        yield c


def test_conversations_stay_with_the_decode_worker_that_holds_them(cluster, tiny_oracles):
    """Eight conversations at once: by load alone their turns would hop between the two workers."""
    oracle = tiny_oracles["llama"]
    starts = random_prompts([48] * CONVERSATIONS, seed=31)
    new_turns = random_prompts([20] * (CONVERSATIONS * TURNS), seed=33)

    async def converse(client: AsyncClient, c: int):
        prompt, turns = starts[c], []
        for n in range(TURNS):
            done = await client.complete(prompt_token_ids=prompt, max_tokens=MAX_TOKENS, temperature=0.0,
                                         ignore_eos=True)
            turns.append((prompt, done))
            prompt = prompt + done.token_ids + new_turns[c * TURNS + n]  # the next turn extends this one
        return turns

    async def main():
        async with AsyncClient(cluster.address, timeout=120) as client:
            return await asyncio.gather(*(converse(client, c) for c in range(CONVERSATIONS)))

    conversations = asyncio.run(main())
    for turns in conversations:
        assert len({done.decode_worker_id for _, done in turns}) == 1
        for n, (prompt, done) in enumerate(turns):
            assert done.token_ids == hf_greedy(oracle, prompt, MAX_TOKENS)
            # A later turn finds the earlier prompt and answer in that worker's cache, in full blocks of 16
            # (the last token, never computed there, excluded): 48 + 8 tokens -> 48, 76 + 8 -> 80, ...
            earlier = len(turns[n - 1][0]) + MAX_TOKENS - 1 if n else 0
            assert done.usage.cached_prompt_tokens == earlier // 16 * 16
    assert len({turns[0][1].decode_worker_id for turns in conversations}) == 2  # spread by load at first


def test_unrelated_concurrent_prompts_are_still_spread_over_both_decode_workers(cluster):
    results = asyncio.run(stream_all(cluster.address, random_prompts([40] * 12, seed=32), 16))
    assert len({result.decode_worker_id for _, _, result in results}) == 2
