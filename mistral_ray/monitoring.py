"""A local Prometheus for the local Ray cluster: the same rules and metric names as on Kubernetes.

Ray exports every process's metrics (Serve, vLLM engines, our router) on each node's metrics export port;
locally that is one node, so one static target. The `ray_io_cluster` label that KubeRay's PodMonitor adds
on a cluster is added here as a static label, so dashboards and rules work unchanged.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import yaml

from mistral_ray.config import PROJECT_ROOT, STATE_DIR

RULES = PROJECT_ROOT / "k8s" / "monitoring" / "prometheus" / "rules.yaml"
DASHBOARD = PROJECT_ROOT / "k8s" / "monitoring" / "grafana" / "mistral-ray-dashboard.json"
LOCAL_CLUSTER = "local"


def prometheus_config(metrics_port: int, scrape_interval: str = "5s") -> dict:
    return {
        "global": {"scrape_interval": scrape_interval, "evaluation_interval": scrape_interval},
        "rule_files": [str(RULES)],
        "scrape_configs": [
            {
                "job_name": "ray",
                "static_configs": [
                    {"targets": [f"127.0.0.1:{metrics_port}"], "labels": {"ray_io_cluster": LOCAL_CLUSTER}}
                ],
            }
        ],
    }


def start_prometheus(metrics_port: int, port: int = 9090, data_dir: Path | None = None,
                     scrape_interval: str = "5s") -> subprocess.Popen:
    """Start Debian's `prometheus` on 127.0.0.1:`port` scraping the local Ray node; caller stops it."""
    binary = shutil.which("prometheus")
    if binary is None:
        raise FileNotFoundError("prometheus is not installed (Debian: apt-get install prometheus; or `make monitor`)")
    data_dir = data_dir or STATE_DIR / "prometheus"
    data_dir.mkdir(parents=True, exist_ok=True)
    config = data_dir / "prometheus.yml"
    config.write_text(yaml.safe_dump(prometheus_config(metrics_port, scrape_interval), sort_keys=False))
    return subprocess.Popen(
        [binary, f"--config.file={config}", f"--storage.tsdb.path={data_dir / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,  # its own process group: stopped by PID, never by name
    )


def prometheus_rule(name: str = "mistral-ray") -> dict:
    """The rules file as a prometheus-operator PrometheusRule (kube-prometheus-stack's default selector
    picks rules labelled `release: kube-prometheus-stack`; change the label to your release's name)."""
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": name, "labels": {"app.kubernetes.io/name": "mistral-ray",
                                                "release": "kube-prometheus-stack"}},
        "spec": {"groups": yaml.safe_load(RULES.read_text())["groups"]},
    }


def prometheus_rule_yaml() -> str:
    header = "# Generated from prometheus/rules.yaml by `mistral-ray k8s rules`; a test fails if they drift.\n"
    return header + yaml.safe_dump(prometheus_rule(), sort_keys=False, width=120)
