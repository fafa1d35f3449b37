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

from pdserve.client.connect import add_connect_args, connect_kwargs
from pdserve.errors import InvalidRequestError, PdserveError

EXIT_USAGE = 2


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="HF model directory or GGUF file (default: SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", default=None, help="bfloat16 | float32 | float16; default bfloat16, float32 on a CPU without native bf16")
    p.add_argument("--quantization", choices=("int4", "int8"), default=None,
                   help="weight-only int4 | int8 decoder linears, int8 LM head (CPU only; default: dense)")
    p.add_argument("--device", default="cpu", help="cpu (default) | cuda | cuda:N")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    add_compile_arg(p)


def add_compile_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--compile-max-batch", type=int, default=0, metavar="N",
                   help="decode steps of up to N sequences run a torch.compile'd layer, "
                        "compiled at start-up (CPU; 0: eager)")


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line on stderr (and exit code 2), not a usage dump."""

    def error(self, message: str):
        print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(EXIT_USAGE)


def add_up_args(p: argparse.ArgumentParser, port: int = 50051) -> None:
    p.add_argument("--prefill", type=int, default=1, help="prefill workers (0: decode workers prefill themselves)")
    p.add_argument("--decode", type=int, default=1, help="decode workers")
    p.add_argument("--port", type=int, default=port, help="router port on 127.0.0.1 (0: any free one)")
    p.add_argument("--model", default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--quantization", choices=("int4", "int8"), default=None,
                   help="weight-only int4 | int8 decoder linears, int8 LM head (CPU only; default: dense)")
    p.add_argument("--device", default="cpu")
    add_compile_arg(p)
    p.add_argument("--kv-cache-gib", type=float, default=None, help="per worker (default: a share of free memory)")
    p.add_argument("--log", default=None, help="append the daemons' logs to this file")
    p.add_argument("--http-port", type=int, default=None,
                   help="the router also serves the OpenAI-compatible HTTP API on 127.0.0.1:PORT (0: any free one)")
    p.add_argument("--api-key", action="append", default=[], help="clients must send this key (repeatable)")
    p.add_argument("--tls", action="store_true", help="mutual TLS everywhere, with a throwaway CA (printed)")


def cluster_spec(args: argparse.Namespace):
    """The ClusterSpec of `pdserve up` flags."""
    from pdserve.cluster import ClusterSpec

    if args.prefill < 0 or args.decode < 1:
        raise InvalidRequestError("--decode", "a cluster needs at least one decode worker")
    return ClusterSpec(num_prefill=args.prefill, num_decode=args.decode, model=args.model, dtype=args.dtype,
                       quantization=args.quantization, compile_max_batch=args.compile_max_batch,
                       device=args.device, router_listen=f"127.0.0.1:{args.port}",
                       kv_cache_gib=args.kv_cache_gib, log_path=args.log, http_port=args.http_port, api_keys=tuple(args.api_key), tls=args.tls)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="pdserve", description="Prefill/decode-disaggregated LLM serving")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    gen = sub.add_parser("generate", help="generate text for one prompt")
    gen.add_argument("prompt", help="the prompt text")
    gen.add_argument("--local", action="store_true", help="run the engine in this process")
    gen.add_argument("--chat", action="store_true", help="apply the model's chat template to the prompt")
    add_model_args(gen)
    add_sampling_args(gen)
    gen.add_argument("--kv-cache-gib", type=float, default=0.5)
    gen.add_argument("--router", default=None, help="router address (instead of --local)")
    add_connect_args(gen)

    up = sub.add_parser("up", help="start a local cluster: a router, prefill and decode workers")
    add_up_args(up)
    up.add_argument("--demo", default=None, metavar="PROMPT",
                    help="send PROMPT through the cluster, print the answer, stop (make run)")

    from pdserve.bench.cli import add_bench_args

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
    from pdserve.bench.cli import run_bench

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
