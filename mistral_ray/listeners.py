"""Where the Serve replicas of our deployments listen: on their node's address, never on every interface.

Serve starts each replica's inter-deployment gRPC server (handle calls between deployments) on `[::]:0`, a
literal with no setting (ray/serve/_private/replica.py, Ray 2.60): on a laptop serving on 127.0.0.1 that
is a port open to the network, in a pod one on every interface. Callers reach it at the node's address,
which is where Ray's own servers listen, so binding that address loses nothing. Each of our deployments
calls `bind_replica_grpc_to_node()` in its constructor, which Serve runs before it starts that server.
"""

from __future__ import annotations

_ANY = "[::]:"


def bind_replica_grpc_to_node() -> None:
    """In a Serve replica: its gRPC server binds the node's address. Elsewhere (unit tests): nothing."""
    import ray
    from ray import serve
    from ray.serve._private import replica

    try:
        serve.get_replica_context()
    except Exception:
        return
    if getattr(replica.add_port_to_grpc_server, "_node_bound", False):
        return
    node_ip = ray.util.get_node_ip_address()
    host = f"[{node_ip}]" if ":" in node_ip else node_ip
    inner = replica.add_port_to_grpc_server

    def add_port(server, address: str):
        return inner(server, host + ":" + address[len(_ANY):] if address.startswith(_ANY) else address)

    add_port._node_bound = True
    replica.add_port_to_grpc_server = add_port
