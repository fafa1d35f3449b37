"""How the command-line clients (`pdserve generate/chat/rollout/top/bench --router`) reach a router
that asks for more than an address: the API key from PDSERVE_API_KEY (not a flag, so that it
stays out of `ps` and shell history) and, for mutual TLS, `--tls-ca` with this client's own
`--tls-cert`/`--tls-key`."""

from __future__ import annotations

import argparse
import os
import pathlib

import grpc

API_KEY_ENV = "PDSERVE_API_KEY"


def add_connect_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tls-ca", default=None, help="CA that signed the router's certificate (TLS)")
    p.add_argument("--tls-cert", default=None, help="this client's certificate (mutual TLS)")
    p.add_argument("--tls-key", default=None, help="this client's private key (mutual TLS)")


def connect_kwargs(args: argparse.Namespace) -> dict:
    """`api_key` and `credentials` for Client/AsyncClient from the parsed flags and the environment."""
    return {"api_key": os.environ.get(API_KEY_ENV) or None, "credentials": credentials(args)}


def credentials(args: argparse.Namespace) -> grpc.ChannelCredentials | None:
    ca, cert, key = (getattr(args, name, None) for name in ("tls_ca", "tls_cert", "tls_key"))
    if not (ca or cert or key):
        return None
    if bool(cert) != bool(key):
        raise ValueError("--tls-cert and --tls-key go together")
    read = lambda path: pathlib.Path(path).read_bytes() if path else None  # noqa: E731
    return grpc.ssl_channel_credentials(root_certificates=read(ca), private_key=read(key),
                                        certificate_chain=read(cert))
