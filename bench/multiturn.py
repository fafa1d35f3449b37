"""Multi-turn chat on a disaggregated cluster: prefix-aware placement against placement by load alone.

Usage: python bench/multiturn.py [--conversations 4] [--turns 4] [--rounds 2] [--model PATH]

One cluster (`pdserve up`'s layout: 1 prefill and 2 decode workers on this machine's cores,
SmolLM2 bf16 by default) and two routers in front of the same workers: the cluster's own,
placing with prefix affinity (`--prefix-affinity-slack 8`, the default), and a second one
given the workers as static lists with `--prefix-affinity-slack -1` (load alone). The two
take turns, a phase each per round: in a phase, --conversations chats run at once, each
--turns turns long (a first user message of about 300 tokens, then about 60 per turn, each
turn sending the whole conversation so far with the model's greedy answers of 32 tokens).
Every conversation is new (its own random words), so neither router profits from the
other's phases; both share the workers' caches and load.

Measured per router:
- kv_bytes: the KV the prefill worker sent (its pdserve_kv_transfer_bytes_total, read
  before and after each phase);
- cached_share: of the prompt tokens of turns 2 and later, the share the decode worker took
  from its prefix cache (usage.cached_prompt_tokens);
- ttft: the client's time to the first token of turns 2 and later, mean and median.
Prints one JSON object: both routers' figures and the ratios prefix-aware / load-only of
kv_bytes and of the TTFTs (below 1: the prefix-aware router is better).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time

from pdserve.client import AsyncClient
from pdserve.cluster import Child, ClusterSpec, LocalCluster

WORDS = ("river stone cloud market engine garden number letter window silver answer morning bridge "
         "circle paper winter signal forest animal candle mirror planet harbor ladder orange music").split()


def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def kv_bytes_sent(prefill: Child) -> float:
    return prefill.metric_sum("pdserve_kv_transfer_bytes_total")


async def conversation(client: AsyncClient, rng: random.Random, turns: int, stats: dict) -> None:
    messages = [{"role": "user", "content": "Summarize these words: " + words(rng, 220)}]
    for turn in range(turns):
        started = time.monotonic()
        ttft = None
        text = []
        stream = client.generate(messages=messages, max_tokens=32, temperature=0.0, ignore_eos=True)
        async for delta in stream:
            ttft = ttft if ttft is not None else time.monotonic() - started
            text.append(delta.text)
        if turn:  # later turns: what the conversation so far can save
            stats["ttft"].append(ttft)
            stats["prompt_tokens"] += stream.result.usage.prompt_tokens
            stats["cached_tokens"] += stream.result.usage.cached_prompt_tokens
        messages += [{"role": "assistant", "content": "".join(text)},
                     {"role": "user", "content": "And now these: " + words(rng, 45)}]


async def phase(address: str, args: argparse.Namespace, rng: random.Random, stats: dict) -> None:
    async with AsyncClient(address, timeout=600) as client:
        await asyncio.gather(*(conversation(client, random.Random(rng.random()), args.turns, stats)
                               for _ in range(args.conversations)))


def summary(stats: dict) -> dict:
    return {"kv_bytes": int(stats["kv_bytes"]),
            "cached_share": round(stats["cached_tokens"] / max(1, stats["prompt_tokens"]), 3),
            "ttft_mean_s": round(statistics.mean(stats["ttft"]), 3),
            "ttft_p50_s": round(statistics.median(stats["ttft"]), 3)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--conversations", type=int, default=4, help="chats at once in a phase")
    p.add_argument("--turns", type=int, default=4)
    p.add_argument("--rounds", type=int, default=2, help="phases per router")
    p.add_argument("--model", default=None, help="model path (default: SmolLM2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default=None, help="default: the engine's for this CPU (bf16 only where native)")
    args = p.parse_args(argv)
    spec = ClusterSpec(num_prefill=1, num_decode=2, model=args.model, dtype=args.dtype,
                       extra_args={"prefill": ["--metrics-port", "0"]})
    rng = random.Random(args.seed)
    stats = {name: {"kv_bytes": 0.0, "prompt_tokens": 0, "cached_tokens": 0, "ttft": []}
             for name in ("prefix_aware", "load_only")}
    with LocalCluster(spec) as cluster:
        prefill = next(w for w in cluster.workers if w.role == "prefill")
        decodes = [w.address for w in cluster.workers if w.role == "decode"]
        load_only = Child("router", ["--listen", "127.0.0.1:0", "--prefix-affinity-slack", "-1",
                                     "--prefill-addr", prefill.address, "--decode-addr", *decodes])
        load_only.start(sys.stderr)
        try:
            load_only.wait_ready(30)
            time.sleep(2)  # its first polls of the static workers' load
            routers = {"prefix_aware": cluster.address, "load_only": load_only.address}
            for r in range(args.rounds):
                for name, address in (routers.items() if r % 2 == 0 else reversed(routers.items())):
                    before = kv_bytes_sent(prefill)
                    started = time.monotonic()
                    asyncio.run(phase(address, args, rng, stats[name]))
                    stats[name]["kv_bytes"] += kv_bytes_sent(prefill) - before
                    print(f"round {r} {name}: {time.monotonic() - started:.1f} s", file=sys.stderr)
        finally:
            load_only.stop(5)
    aware, blind = summary(stats["prefix_aware"]), summary(stats["load_only"])
    print(json.dumps({
        "conversations": args.conversations, "turns": args.turns, "rounds": args.rounds,
        "prefix_aware": aware, "load_only": blind,
        "kv_bytes_ratio": round(aware["kv_bytes"] / max(1, blind["kv_bytes"]), 3),
        "ttft_mean_ratio": round(aware["ttft_mean_s"] / blind["ttft_mean_s"], 3),
        "ttft_p50_ratio": round(aware["ttft_p50_s"] / blind["ttft_p50_s"], 3),
    }))


if __name__ == "__main__":
    main()
