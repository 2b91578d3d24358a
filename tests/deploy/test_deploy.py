"""deploy/: the Kubernetes manifests against Kubernetes' own JSON schemas (kubernetes-validate,
strict: unknown fields are errors), the fields that matter checked one by one, the ConfigMap's
pensieve.toml through the real binary's configuration check, and the HAProxy configuration
through `haproxy -c`. The HAProxy setup itself runs for real in tests/haproxy.rs."""

import copy
import os
import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import tomllib
import yaml

ROOT = Path(__file__).resolve().parents[2]
MANIFEST = ROOT / "deploy" / "kubernetes" / "pensieve.yaml"
HAPROXY_CFG = ROOT / "deploy" / "haproxy" / "haproxy.cfg"
BIN = ROOT / "target" / "release" / "pensieve"
K8S = "1.33.0"


def docs():
    return {d["kind"]: d for d in yaml.safe_load_all(MANIFEST.read_text())}


def test_every_manifest_is_valid_against_the_kubernetes_schemas():
    found = docs()
    assert set(found) == {"ConfigMap", "Deployment", "Service", "PodDisruptionBudget"}
    for doc in found.values():
        kubernetes_validate.validate(doc, K8S, strict=True)
    # The validator does fail: a misspelt probe field is an error.
    broken = copy.deepcopy(found["Deployment"])
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGett"] = {"path": "/"}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S, strict=True)


def test_probes_memory_grace_and_budget_are_what_pensieve_needs():
    d = docs()
    pod = d["Deployment"]["spec"]["template"]["spec"]
    [c] = pod["containers"]
    assert c["readinessProbe"]["httpGet"]["path"] == "/health/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/health/live"
    assert c["resources"]["limits"]["memory"] == c["resources"]["requests"]["memory"]
    config = tomllib.loads(d["ConfigMap"]["data"]["pensieve.toml"])
    grace = config["server"]["shutdown_grace_secs"]
    pre_stop = int(c["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert pod["terminationGracePeriodSeconds"] > grace + pre_stop
    assert d["PodDisruptionBudget"]["spec"]["minAvailable"] >= 1
    assert d["PodDisruptionBudget"]["spec"]["selector"] == d["Deployment"]["spec"]["selector"]
    assert d["Service"]["spec"]["selector"] == d["Deployment"]["spec"]["selector"]["matchLabels"]
    # The thresholds leave the limit room for a model: 7Gi, warning well below it.
    limit_gb = int(c["resources"]["limits"]["memory"].removesuffix("Gi"))
    m = config["memory"]
    assert limit_gb > m["warning_gb"] > m["critical_gb"] > m["emergency_gb"] > 0


def test_the_configmaps_pensieve_toml_is_accepted_by_pensieve(tmp_path):
    assert BIN.exists(), f"{BIN} is missing: run `make build`"
    toml = tmp_path / "pensieve.toml"
    toml.write_text(docs()["ConfigMap"]["data"]["pensieve.toml"])
    out = subprocess.run([str(BIN), "config", "--config", str(toml)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert f'server.host = "0.0.0.0"  # file {toml}' in out.stdout
    # And a wrong key in it would have been caught.
    toml.write_text(toml.read_text().replace("warning_gb", "warning_gib"))
    out = subprocess.run([str(BIN), "config", "--config", str(toml)], capture_output=True, text=True)
    assert out.returncode != 0 and "warning_gib" in out.stderr


def test_the_haproxy_configuration_is_valid_with_its_variables_set():
    haproxy = shutil.which("haproxy")
    assert haproxy, "haproxy is missing: `make haproxy` installs it (Debian's package)"
    env = {**os.environ, "HAPROXY_BIND": "127.0.0.1:17777", "PENSIEVE_1": "127.0.0.1:17778",
           "PENSIEVE_2": "127.0.0.1:17779"}
    out = subprocess.run([haproxy, "-c", "-f", str(HAPROXY_CFG)], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    text = HAPROXY_CFG.read_text()
    for needle in ["option httpchk GET /health/ready", "retry-on conn-failure empty-response 503",
                   "balance leastconn", "option redispatch", "# balance source"]:
        assert needle in text, needle
