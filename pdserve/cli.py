"""The `pdserve` command line: one entry, a subcommand per job.

Only this module (and the daemons' mains) read argv and the environment.
Errors a user can fix (missing file, unsupported model, bad flag) print one
line and exit with code 2.
"""

from __future__ import annotations

import argparse
import sys
import uuid

from pdserve.errors import PdserveError

EXIT_USAGE = 2


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="HF model directory or GGUF file (default: SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", default=None, help="bfloat16 (default) | float32 | float16")
    p.add_argument("--device", default="cpu", help="cpu (default) | cuda | cuda:N")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pdserve", description="Prefill/decode-disaggregated LLM serving")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate text for one prompt")
    gen.add_argument("prompt", help="the prompt text")
    gen.add_argument("--local", action="store_true", help="run the engine in this process")
    gen.add_argument("--chat", action="store_true", help="apply the model's chat template to the prompt")
    add_model_args(gen)
    add_sampling_args(gen)
    gen.add_argument("--kv-cache-gib", type=float, default=0.5)
    return parser


def cmd_generate(args: argparse.Namespace) -> int:
    if not args.local:
        raise PdserveError("generate: pass --local (router mode comes with the daemons)")
    # Imported here so that `pdserve --help` and argument errors stay instant.
    import torch

    from pdserve.engine.config import CacheConfig, EngineConfig
    from pdserve.engine.engine import LLMEngine
    from pdserve.engine.engine_loop import EngineLoop
    from pdserve.engine.sampling import SamplingParams
    from pdserve.preprocess import ChatMessage, Preprocessor

    if args.threads:
        torch.set_num_threads(args.threads)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed, stop=tuple(args.stop))
    config = EngineConfig(model=args.model, dtype=args.dtype, device=args.device,
                          cache=CacheConfig(kv_cache_gib=args.kv_cache_gib))
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


COMMANDS = {"generate": cmd_generate}


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
