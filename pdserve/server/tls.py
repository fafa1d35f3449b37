"""TLS for every daemon: server certificates, and mutual TLS between router, prefill and decode.

`--tls-cert`/`--tls-key` make a daemon serve TLS (gRPC, and the router's HTTP API);
with `--tls-ca` it also requires clients to present a certificate signed by that CA,
and uses its own certificate and that CA when it calls the other daemons. So with
a CA every connection of the cluster is mutually authenticated, the SDK's included
(`Client(address, credentials=TlsFiles(...).channel_credentials())`).
`make_local_pki` writes a throwaway CA and one certificate for 127.0.0.1/localhost,
used as server and client certificate (`pdserve up --tls`).
"""

from __future__ import annotations

import argparse
import datetime
import pathlib
import ssl
from dataclasses import dataclass

import grpc


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tls-cert", default=None, help="PEM certificate chain this daemon presents")
    p.add_argument("--tls-key", default=None, help="PEM private key of --tls-cert")
    p.add_argument("--tls-ca", default=None, help="PEM CA: require and verify peer certificates (mutual TLS)")


@dataclass(frozen=True)
class TlsFiles:
    cert: str
    key: str
    ca: str | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> TlsFiles | None:
        if not args.tls_cert and not args.tls_key:
            if args.tls_ca:
                raise ValueError("--tls-ca needs --tls-cert and --tls-key")
            return None
        if not (args.tls_cert and args.tls_key):
            raise ValueError("--tls-cert and --tls-key go together")
        return cls(args.tls_cert, args.tls_key, args.tls_ca)

    def _read(self) -> tuple[bytes, bytes, bytes | None]:
        ca = pathlib.Path(self.ca).read_bytes() if self.ca else None
        return pathlib.Path(self.cert).read_bytes(), pathlib.Path(self.key).read_bytes(), ca

    def server_credentials(self) -> grpc.ServerCredentials:
        cert, key, ca = self._read()
        return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=ca is not None)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """What a daemon (or a client) calls its peers with: the CA to verify them, its certificate to show."""
        cert, key, ca = self._read()
        return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)

    def http_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(self.cert, self.key)
        if self.ca:
            ctx.load_verify_locations(self.ca)
            ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx


def make_local_pki(directory: str | pathlib.Path, name: str = "pdserve-local") -> TlsFiles:
    """A new CA and a certificate it signs for 127.0.0.1 and localhost (server and client use), as PEM files."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
    import ipaddress

    d = pathlib.Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name} CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=7))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .sign(ca_key, hashes.SHA256()))
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=7))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    (d / "ca.pem").write_bytes(ca.public_bytes(pem))
    (d / "cert.pem").write_bytes(cert.public_bytes(pem))
    key_path = d / "key.pem"
    key_path.write_bytes(key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    key_path.chmod(0o600)
    return TlsFiles(str(d / "cert.pem"), str(key_path), str(d / "ca.pem"))
