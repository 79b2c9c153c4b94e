"""python -m tests.support.kubesim --port PORT [--tls] [--token T] [--read-token R]
[--kubeconfig PATH]"""

from __future__ import annotations

import argparse
import signal
import tempfile
import threading
from pathlib import Path

from tests.support.kubesim import KubeSim


def main() -> None:
    parser = argparse.ArgumentParser(description="A Kubernetes API simulator for tests.")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--tls", action="store_true", help="HTTPS with a self-signed CA")
    parser.add_argument("--token", help="bearer token that may do everything")
    parser.add_argument("--read-token", help="bearer token that may only get, list and watch")
    parser.add_argument("--kubeconfig", type=Path, help="where to write the kubeconfig")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="kubesim-"))
    sim = KubeSim(root, tls=args.tls, token=args.token, read_token=args.read_token)
    sim.start(args.port)
    if args.kubeconfig:
        sim.write_kubeconfig(args.kubeconfig, args.token)
    print(
        f"kubesim listening on {sim.url}; kubeconfig {args.kubeconfig or sim.kubeconfig}",
        flush=True,
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    sim.stop()


if __name__ == "__main__":
    main()
