"""The `pdserve` command line: one entry, a subcommand per job.

Only this module (and the daemons' mains) read argv and the environment.
Errors a user can fix (missing file, unsupported model, bad flag) print one
line and exit with code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import uuid

from pdserve.args import EXIT_USAGE, Parser, add_engine_args, add_sampling_args, add_up_args, cluster_spec
from pdserve.client.connect import add_connect_args, connect_kwargs
from pdserve.errors import InvalidRequestError, PdserveError

def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="pdserve", description="Prefill/decode-disaggregated LLM serving")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    gen = sub.add_parser("generate", help="generate text for one prompt")
    gen.add_argument("prompt", help="the prompt text")
    gen.add_argument("--local", action="store_true", help="run the engine in this process")
    gen.add_argument("--chat", action="store_true", help="apply the model's chat template to the prompt")
    add_engine_args(gen)
    add_sampling_args(gen)
    gen.add_argument("--kv-cache-gib", type=float, default=0.5)
    gen.add_argument("--router", default=None, help="router address (instead of --local)")
    add_connect_args(gen)

    up = sub.add_parser("up", help="start a local cluster: a router, prefill and decode workers")
    add_up_args(up)
    up.add_argument("--demo", default=None, metavar="PROMPT",
                    help="send PROMPT through the cluster, print the answer, stop (make run)")

    from pdserve.loadgen.cli import add_bench_args

    add_bench_args(sub.add_parser("bench", help="serving benchmark against a router, a local cluster or llama-server"))

    rollout = sub.add_parser("rollout", help="split traffic over worker versions (and shadow one)")
    rollout.add_argument("--router", required=True)
    rollout.add_argument("--weights", default="", metavar="V=W,...", help="e.g. v1=90,v2=10 (empty: any version)")
    rollout.add_argument("--shadow", default=None, metavar="V=FRACTION", help="e.g. v2=0.1")
    add_connect_args(rollout)

    from pdserve.top import add_top_args

    add_top_args(sub.add_parser("top", help="live view of a cluster through its router"))

    chat = sub.add_parser("chat", help="interactive chat through a router")
    chat.add_argument("--router", required=True)
    add_connect_args(chat)
    add_sampling_args(chat)
    return parser


def _sampling_kwargs(args: argparse.Namespace) -> dict:
    return dict(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                seed=args.seed, stop=args.stop or None)


def cmd_generate(args: argparse.Namespace) -> int:
    if args.router:
        return _generate_remote(args)
    if not args.local:
        raise InvalidRequestError("--local", "pass --local (engine in this process) or --router ADDR")
    # Imported here so that `pdserve --help` and argument errors stay instant.
    import torch

    from pdserve.engine.config import CacheConfig, EngineConfig
    from pdserve.engine.engine import LLMEngine
    from pdserve.engine.engine_loop import EngineLoop
    from pdserve.engine.sampling_params import SamplingParams
    from pdserve.preprocess import ChatMessage, Preprocessor

    if args.threads:
        torch.set_num_threads(args.threads)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed, stop=tuple(args.stop))
    config = EngineConfig(model=args.model, dtype=args.dtype, device=args.device, quantization=args.quantization,
                          compile_max_batch=args.compile_max_batch, cache=CacheConfig(kv_cache_gib=args.kv_cache_gib))
    engine = LLMEngine(config)
    pre = Preprocessor(engine.tokenizer)
    if args.chat:
        prompt_ids = pre(messages=[ChatMessage("user", args.prompt)])
    else:
        prompt_ids = pre(prompt=args.prompt)
    loop = EngineLoop(engine).start()
    try:
        for out in loop.generate(uuid.uuid4().hex, prompt_ids, params):
            sys.stdout.write(out.text)
            sys.stdout.flush()
            if out.finished:
                sys.stdout.write("\n")
                print(f"[{out.finish_reason}: {out.num_prompt_tokens} prompt + {out.num_output_tokens} "
                      f"generated tokens]", file=sys.stderr)
    finally:
        loop.stop()
    return 0


def _generate_remote(args: argparse.Namespace) -> int:
    from pdserve.client import Client

    with Client(args.router, **connect_kwargs(args)) as client:
        kwargs = _sampling_kwargs(args)
        if args.chat:
            stream = client.generate(messages=[{"role": "user", "content": args.prompt}], **kwargs)
        else:
            stream = client.generate(args.prompt, **kwargs)
        for delta in stream:
            sys.stdout.write(delta.text)
            sys.stdout.flush()
        sys.stdout.write("\n")
        _print_result(stream.result)
    return 0


def _print_result(result) -> None:
    if result is None:
        return
    t = result.timings
    print(f"[{result.finish_reason}: {result.usage.prompt_tokens} prompt + {result.usage.completion_tokens} "
          f"generated tokens; ttft {t.time_to_first_token_ms:.0f} ms, total {t.total_ms:.0f} ms, "
          f"prefill {result.prefill_mode or '-'} on {result.prefill_worker_id}, decode on {result.decode_worker_id}]",
          file=sys.stderr)


def cmd_up(args: argparse.Namespace) -> int:
    import signal

    from pdserve.cluster import LocalCluster

    spec = cluster_spec(args)
    print(f"starting a router, {args.prefill} prefill and {args.decode} decode workers...", file=sys.stderr)
    with LocalCluster(spec) as cluster:
        info = cluster.describe()
        http = f"; HTTP {info['http']}" if info['http'] else ""
        print(f"router {info['router']}; prefill {info['prefill']}; decode {info['decode']}{http}", file=sys.stderr)
        print(json.dumps(info), flush=True)
        if args.demo:
            return _demo(cluster.address, args.demo, cluster.api_key, cluster.credentials)
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass
    return 0


def _demo(router: str, prompt: str, api_key: str | None = None, credentials=None) -> int:
    from pdserve.client import Client

    with Client(router, api_key=api_key, credentials=credentials) as client:
        print(f"> {prompt}")
        stream = client.generate(messages=[{"role": "user", "content": prompt}], max_tokens=64, temperature=0.0)
        for delta in stream:
            sys.stdout.write(delta.text)
            sys.stdout.flush()
        sys.stdout.write("\n")
        _print_result(stream.result)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from pdserve.client import Client

    history: list[dict] = []
    with Client(args.router, **connect_kwargs(args)) as client:
        while True:
            try:
                line = input("you> ").strip()
            except (EOFError, KeyboardInterrupt):
                print()
                return 0
            if not line:
                continue
            history.append({"role": "user", "content": line})
            reply = []
            sys.stdout.write("assistant> ")
            for delta in client.generate(messages=history, **_sampling_kwargs(args)):
                reply.append(delta.text)
                sys.stdout.write(delta.text)
                sys.stdout.flush()
            sys.stdout.write("\n")
            history.append({"role": "assistant", "content": "".join(reply)})


def cmd_bench(args: argparse.Namespace) -> int:
    from pdserve.loadgen.cli import run_bench

    return run_bench(args)


def cmd_rollout(args: argparse.Namespace) -> int:
    def pair(text: str, field: str, kind):
        name, sep, value = text.partition("=")
        try:
            if not (sep and name):
                raise ValueError
            return name.strip(), kind(value)
        except ValueError:
            raise InvalidRequestError(field, f"expected VERSION=NUMBER, got {text!r}") from None

    weights = dict(pair(w, "--weights", int) for w in args.weights.split(",") if w.strip())
    shadow_version, shadow_fraction = pair(args.shadow, "--shadow", float) if args.shadow else ("", 0.0)
    from pdserve.client import Client

    with Client(args.router, **connect_kwargs(args)) as client:
        client.set_rollout(weights, shadow_version=shadow_version, shadow_fraction=shadow_fraction)
    print(json.dumps({"weights": weights, "shadow": {shadow_version: shadow_fraction} if shadow_version else {}}))
    return 0


def cmd_top(args: argparse.Namespace) -> int:
    from pdserve.top import run_top_cli

    return run_top_cli(args)


COMMANDS = {"generate": cmd_generate, "up": cmd_up, "chat": cmd_chat, "bench": cmd_bench, "top": cmd_top,
            "rollout": cmd_rollout}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except PdserveError as exc:
        print(f"pdserve: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
