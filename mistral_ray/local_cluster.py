"""A Ray cluster of several nodes on this one machine, shaped like the RayService: a head that hosts Serve's
controller, HAProxy and the ingress router but no LLM replica, and worker nodes that host the replicas.

Each node is a raylet of its own (`ray.cluster_utils.Cluster`), so placement, a proxy talking to replicas on
other nodes, and losing a whole node can be tried without Kubernetes. The rule that keeps replicas off the
head is the one the RayService uses: the head offers no CPU and no GPU to Ray (`num-cpus: "0"`,
`num-gpus: "0"`), and every LLM replica reserves some (`scaling.replica_cpus` / `replica_gpus` > 0), while
Serve's own actors reserve none.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from mistral_ray.config import ObservabilityConfig
from mistral_ray.ports import free_port


@dataclass
class LocalCluster:
    cluster: object  # ray.cluster_utils.Cluster
    metrics_ports: list[int] = field(default_factory=list)  # head first, then each worker's

    @property
    def address(self) -> str:
        return self.cluster.address

    def add_worker(self):
        """A worker node offering this machine's cores to LLM replicas, with its own metrics port."""
        port = free_port()
        node = self.cluster.add_node(num_cpus=os.cpu_count(), metrics_export_port=port)
        self.metrics_ports.append(port)
        return node

    def shutdown(self) -> None:
        self.cluster.shutdown()


def start(obs: ObservabilityConfig, workers: int) -> LocalCluster:
    """The head (no CPU for replicas) and `workers` worker nodes; the caller connects with ray.init."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args=dict(
        num_cpus=0, num_gpus=0, include_dashboard=False, metrics_export_port=obs.metrics_export_port,
        _system_config={"metrics_report_interval_ms": obs.metrics_report_interval_ms}))
    local = LocalCluster(cluster, metrics_ports=[obs.metrics_export_port])
    for _ in range(workers):
        local.add_worker()
    cluster.wait_for_nodes()
    return local
