"""A Kubernetes API simulator for tests: kube-apiserver's answers for what deployd and kubectl use.

    python -m tests.support.kubesim --port 6443 [--tls] [--token T] [--read-token R] \
        [--kubeconfig PATH]

In tests, `KubeSim().start()` runs it in a thread of the test process and
writes a kubeconfig that the real `kubectl` and deployd both use.

Bodies come as JSON or as Kubernetes' protobuf (what kubectl's typed commands send), read with
Kubernetes' own .proto files kept in proto/ (schema.py, protobuf.py); the same schemas give
/openapi/v3 (openapi.py), against which kubectl decides to leave validation to the server.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import ipaddress
import json
import ssl
import threading
from pathlib import Path

from tests.support.kubesim.server import Fault, Sim
from tests.support.threadserver import ThreadServer

__all__ = ["Fault", "KubeSim", "Sim"]


class KubeSim:
    """A running simulator on 127.0.0.1 with its kubeconfig."""

    def __init__(
        self,
        root: Path,
        *,
        tls: bool = False,
        token: str | None = None,
        read_token: str | None = None,
        namespace: str = "airflow",
    ) -> None:
        tokens: dict[str, tuple[str, set[str]]] = {}
        if token:
            tokens[token] = ("deployd", {"*"})
        if read_token:
            tokens[read_token] = ("reader", {"get", "list", "watch"})
        self.sim = Sim(tokens=tokens)
        self.root, self.tls, self.token, self.namespace = root, tls, token, namespace
        self.port = 0
        self.loop: asyncio.AbstractEventLoop | None = None
        self._server: ThreadServer | None = None
        self.kubeconfig = root / "kubeconfig"
        self.ca = root / "kubesim-ca.crt"

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    def start(self, port: int = 0) -> KubeSim:
        self.root.mkdir(parents=True, exist_ok=True)
        context = _tls_context(self.root) if self.tls else None
        self._server = ThreadServer(self.sim.app(), port, context).start()
        self.port, self.loop = self._server.port, self._server.loop
        self.write_kubeconfig(self.kubeconfig, self.token)
        return self

    def write_kubeconfig(self, path: Path, token: str | None) -> Path:
        cluster: dict[str, object] = {"server": self.url}
        if self.tls:
            cluster["certificate-authority-data"] = base64.b64encode(self.ca.read_bytes()).decode()
        user: dict[str, object] = {"token": token} if token else {}
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "current-context": "kubesim",
            "clusters": [{"name": "kubesim", "cluster": cluster}],
            "users": [{"name": "kubesim", "user": user}],
            "contexts": [
                {
                    "name": "kubesim",
                    "context": {
                        "cluster": "kubesim",
                        "user": "kubesim",
                        "namespace": self.namespace,
                    },
                }
            ],
        }
        path.write_text(json.dumps(config, indent=2))
        return path

    def call(self, fn, *args):  # type: ignore[no-untyped-def]
        """Run `fn(*args)` on the simulator's loop (its store is not thread-safe)."""
        assert self.loop is not None
        done = threading.Event()
        out: list[object] = []

        def run() -> None:
            try:
                out.append(fn(*args))
            except BaseException as exc:  # handed back to the caller
                out.append(exc)
            done.set()

        self.loop.call_soon_threadsafe(run)
        done.wait(10)
        if isinstance(out[0], BaseException):
            raise out[0]
        return out[0]

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()


def _tls_context(root: Path) -> ssl.SSLContext:
    """A self-signed CA and a server certificate for 127.0.0.1 (files in `root`)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kubesim")])
    start = datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=5)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    (root / "kubesim-ca.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (root / "kubesim.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(root / "kubesim-ca.crt", root / "kubesim.key")
    return context
