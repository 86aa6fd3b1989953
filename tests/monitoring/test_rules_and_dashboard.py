"""Rules and dashboard as code: promtool checks and unit-tests the rules; every panel query parses."""

import json
import shutil
import subprocess

import pytest
import yaml

from mistral_ray.monitoring import DASHBOARD, RULES
from tests.conftest import IN_CI

PROMTOOL = shutil.which("promtool")
# CI installs promtool (`make test` -> `make prometheus`): there a missing promtool fails instead of skipping.
pytestmark = pytest.mark.skipif(
    PROMTOOL is None and not IN_CI, reason="promtool missing: `make prometheus` installs it"
)


# A panel's description opening: it has data only under that routing policy, or with LoRA adapters.
CONDITIONAL = ("With routing.policy: ", "With engine.lora only", "After a replica was lost mid-stream only")


def panel_queries(range_interval: str = "1m", cluster: str = ".*", every_policy: bool = True) -> list[tuple[str, str]]:
    """(panel title, PromQL) for every target, with Grafana's variables substituted as Grafana would;
    without `every_policy`, only the panels every app has data for."""
    dash = json.loads(DASHBOARD.read_text())
    return [
        (panel["title"], t["expr"].replace("$__rate_interval", range_interval).replace("$cluster", cluster))
        for panel in dash["panels"]
        if every_policy or not panel.get("description", "").startswith(CONDITIONAL)
        for t in panel["targets"]
    ]


def test_promtool_check_rules():
    out = subprocess.run([PROMTOOL, "check", "rules", str(RULES)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_promtool_test_rules():
    out = subprocess.run(
        [PROMTOOL, "test", "rules", "rules.test.yaml"], cwd=RULES.parent, capture_output=True, text=True
    )
    assert out.returncode == 0 and "SUCCESS" in out.stdout, out.stdout + out.stderr


def test_every_dashboard_query_parses(tmp_path):
    # promtool parses each expression when it checks a rules file: wrap every panel query as a rule.
    rules = [{"record": f"panel:q{i}", "expr": expr} for i, (_, expr) in enumerate(panel_queries())]
    path = tmp_path / "panels.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "panels", "rules": rules}]}))
    out = subprocess.run([PROMTOOL, "check", "rules", str(path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"{len(rules)} rules found" in out.stdout


def test_dashboard_shape():
    dash = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["cluster"]["type"] == "query"
    titles = " | ".join(p["title"] for p in dash["panels"]).lower()
    for needed in ["request rate", "error rate", "ttft of streamed requests", "ttft in the engine", "inter-token",
                   "end-to-end", "unary request latency", "tokens per second", "waiting requests per replica", "kv-cache usage",
                   "prefix-cache hit rate", "running vs desired", "rejected", "routing decisions",
                   "ingress router", "haproxy: retries", "cut by a replica", "kv_aware: predicted",
                   "kv_aware: kv index"]:
        assert needed in titles, needed
    for panel in dash["panels"]:
        assert panel["datasource"]["uid"] == "${datasource}"
        assert all('ray_io_cluster=~"$cluster"' in t["expr"] for t in panel["targets"]), panel["title"]


def test_promtool_check_shipped_scrape_config():
    from mistral_ray.monitoring import SCRAPE_CONFIG

    out = subprocess.run([PROMTOOL, "check", "config", str(SCRAPE_CONFIG)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
