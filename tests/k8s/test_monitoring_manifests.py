"""The monitoring manifests build, validate, and carry exactly the rules and dashboard we test."""

import json

import yaml

from mistral_ray import monitoring
from tests.k8s.schemas import kustomize, require_schemas, validate

MONITORING = monitoring.RULES.parents[1]


def test_prometheus_rule_matches_rules_file():
    on_disk = (MONITORING / "prometheusrule.yaml").read_text()
    assert on_disk == monitoring.prometheus_rule_yaml(), "run: mistral-ray k8s rules > k8s/monitoring/prometheusrule.yaml"


def test_shipped_scrape_config_is_what_make_monitor_runs():
    assert monitoring.SCRAPE_CONFIG.read_text() == monitoring.shipped_config_yaml()
    shipped = yaml.safe_load(monitoring.SCRAPE_CONFIG.read_text())
    assert shipped["scrape_configs"] == monitoring.prometheus_config(8080, 9101)["scrape_configs"]
    assert (monitoring.SCRAPE_CONFIG.parent / shipped["rule_files"][0]) == monitoring.RULES


def test_monitoring_builds_and_validates():
    require_schemas()
    objs = kustomize(MONITORING)
    kinds = sorted(o["kind"] for o in objs)
    assert kinds == ["ConfigMap", "PodMonitor", "PodMonitor", "PrometheusRule"]
    for obj in objs:
        validate(obj)
    dashboard = next(o for o in objs if o["kind"] == "ConfigMap")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(dashboard["data"]["mistral-ray-dashboard.json"]) == json.loads(monitoring.DASHBOARD.read_text())
    rule = next(o for o in objs if o["kind"] == "PrometheusRule")
    assert rule["spec"]["groups"] == yaml.safe_load(monitoring.RULES.read_text())["groups"]
    for pm in (o for o in objs if o["kind"] == "PodMonitor"):
        endpoints = pm["spec"]["podMetricsEndpoints"]
        assert [e["port"] for e in endpoints] == ["metrics", "haproxy-metrics"]  # Ray's and HAProxy's exporters
        assert all(e["relabelings"][0]["targetLabel"] == "ray_io_cluster" for e in endpoints)


def test_unknown_field_is_rejected():
    require_schemas()
    import jsonschema
    import pytest

    pm = next(o for o in kustomize(MONITORING) if o["kind"] == "PodMonitor")
    pm["spec"]["podMetricsEndpoints"][0]["prot"] = "metrics"
    with pytest.raises(jsonschema.ValidationError, match="prot"):
        validate(pm)
