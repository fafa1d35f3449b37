"""Command-line flags that several programs share: the engine's, sampling's, a local cluster's,
and a parser whose errors are one line."""

from __future__ import annotations

import argparse
import sys

from pdserve.errors import InvalidRequestError

EXIT_USAGE = 2


class Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line on stderr (and exit code 2), not a usage dump."""

    def error(self, message: str):
        print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(EXIT_USAGE)


def add_engine_args(p: argparse.ArgumentParser, threads: bool = True) -> None:
    """The model and how it runs: pdserve generate --local, the workers, pdserve up (without --threads)."""
    p.add_argument("--model", default=None, help="HF model directory or GGUF file (default: SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", default=None,
                   help="bfloat16 | float32 | float16; default bfloat16, float32 on a CPU without native bf16")
    p.add_argument("--quantization", choices=("int4", "int8"), default=None,
                   help="weight-only int4 | int8 decoder linears, int8 LM head (CPU only; default: dense)")
    p.add_argument("--device", default="cpu", help="cpu (default) | cuda | cuda:N")
    p.add_argument("--compile-max-batch", type=int, default=0, metavar="N",
                   help="decode steps of up to N sequences run a torch.compile'd layer, "
                        "compiled at start-up (CPU; 0: eager)")
    if threads:
        p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def add_up_args(p: argparse.ArgumentParser, port: int = 50051) -> None:
    p.add_argument("--prefill", type=int, default=1, help="prefill workers (0: decode workers prefill themselves)")
    p.add_argument("--decode", type=int, default=1, help="decode workers")
    p.add_argument("--port", type=int, default=port, help="router port on 127.0.0.1 (0: any free one)")
    add_engine_args(p, threads=False)
    p.add_argument("--kv-cache-gib", type=float, default=None, help="per worker (default: a share of free memory)")
    p.add_argument("--log", default=None, help="append the daemons' logs to this file")
    p.add_argument("--http-port", type=int, default=None,
                   help="the router also serves the OpenAI-compatible HTTP API on 127.0.0.1:PORT (0: any free one)")
    p.add_argument("--tool-call-parser", choices=("hermes",), default=None,  # pdserve-router's, passed through
                   help="the router reads tool calls in this format out of the output (HTTP tool_choice \"auto\")")
    p.add_argument("--api-key", action="append", default=[], help="clients must send this key (repeatable)")
    p.add_argument("--tls", action="store_true", help="mutual TLS everywhere, with a throwaway CA (printed)")


def cluster_spec(args: argparse.Namespace):
    """The ClusterSpec of `pdserve up` flags."""
    from pdserve.cluster import ClusterSpec

    if args.prefill < 0 or args.decode < 1:
        raise InvalidRequestError("--decode", "a cluster needs at least one decode worker")
    return ClusterSpec(num_prefill=args.prefill, num_decode=args.decode, model=args.model, dtype=args.dtype,
                       quantization=args.quantization, compile_max_batch=args.compile_max_batch,
                       device=args.device, router_listen=f"127.0.0.1:{args.port}", kv_cache_gib=args.kv_cache_gib,
                       log_path=args.log, http_port=args.http_port, api_keys=tuple(args.api_key), tls=args.tls,
                       extra_args={"router": ["--tool-call-parser", args.tool_call_parser]} if args.tool_call_parser
                       else {})
