"""`lctrain-launch` (`python -m lctrain.launch`): torchrun whose stores listen only where asked.

torchrun's rendezvous and worker stores are TCPStore servers that listen on every interface,
whatever ``--rdzv-endpoint`` says, and ``--standalone`` answers any unauthenticated client that
reaches the port. This launcher runs torchrun unchanged except that every store it hosts
listens on the rendezvous host's address only:

- one node (no ``--rdzv-endpoint`` / ``--master-addr`` given): rendezvous on 127.0.0.1, gloo and
  NCCL bootstrap sockets on the loopback interface: nothing listens beyond this machine;
- several nodes: the store on the node whose address ``--rdzv-endpoint`` names listens on that
  address only (use the cluster's private interface).

    python -m lctrain.launch --nproc-per-node=2 -m lctrain.train experiment=cpu_demo cp.size=2
    python -m lctrain.launch --nnodes=2 --node-rank=0 --rdzv-endpoint=10.0.0.1:29500 ... -m lctrain.train

All other torchrun options work as documented (``python -m lctrain.launch --help``).
"""

from __future__ import annotations

import ipaddress
import os
import socket
import sys

LOOPBACK = "127.0.0.1"
_ENDPOINT_FLAGS = ("--rdzv-endpoint", "--rdzv_endpoint", "--master-addr", "--master_addr", "--standalone")


def _bind_address(host: str) -> str:
    return LOOPBACK if host in ("localhost", "") else socket.gethostbyname(host)


def _bound_store_class(base):
    class BoundTCPStore(base):
        """A TCPStore server listening on its host's address only (a pre-bound socket)."""

        def __init__(self, host_name, port, *args, **kwargs):
            is_master = kwargs.get("is_master", args[1] if len(args) > 1 else False)
            if is_master and kwargs.get("master_listen_fd") is None:
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    sock.bind((_bind_address(host_name), int(port)))
                except OSError as err:
                    sock.close()
                    # Another agent on this host already serves the rendezvous (several "nodes" on one
                    # machine): torchrun retries as a client on RuntimeError, as for its own stores.
                    raise RuntimeError(f"cannot listen on {host_name}:{port}: {err}") from err
                sock.listen(1024)
                kwargs["master_listen_fd"] = sock.fileno()
                self._listen_socket = sock  # the store serves on it; keep it open
                port = sock.getsockname()[1]
            super().__init__(host_name, port, *args, **kwargs)

    return BoundTCPStore


def install_bound_stores() -> None:
    """Make every TCPStore torchrun's agent creates as a server listen on its host's address."""
    import torch.distributed as dist
    from torch.distributed.elastic.rendezvous import c10d_rendezvous_backend

    bound = _bound_store_class(dist.TCPStore)
    dist.TCPStore = bound
    c10d_rendezvous_backend.TCPStore = bound


def _is_loopback(endpoint: str) -> bool:
    host = endpoint.rsplit(":", 1)[0].strip("[]")
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def torchrun_args(argv: list[str]) -> list[str]:
    """``argv`` with a loopback rendezvous added when it names none (one node)."""
    script = next((i for i, a in enumerate(argv) if a == "-m" or a.endswith(".py")), len(argv))
    launcher_args = argv[:script]
    if any(a.split("=")[0] in _ENDPOINT_FLAGS for a in launcher_args):
        return argv
    with socket.socket() as probe:  # a free port on the loopback interface
        probe.bind((LOOPBACK, 0))
        port = probe.getsockname()[1]
    return ["--rdzv-backend=c10d", f"--rdzv-endpoint={LOOPBACK}:{port}", "--nnodes=1", *argv]


def main(argv: list[str] | None = None) -> None:
    args = torchrun_args(list(sys.argv[1:] if argv is None else argv))
    endpoint = next((a.split("=", 1)[1] for a in args if a.startswith(("--rdzv-endpoint=", "--rdzv_endpoint="))),
                    "")
    if _is_loopback(endpoint):  # one machine: the workers' sockets stay on loopback too
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        os.environ.setdefault("NCCL_SOCKET_IFNAME", "lo")
    install_bound_stores()
    from torch.distributed.run import main as torchrun_main

    torchrun_main(args)


if __name__ == "__main__":
    main()
