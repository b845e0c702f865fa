"""`spillover deploy k8s`: the shipped models.yaml, its commented real deployments enabled,
rendered and every object validated offline against the Kubernetes API schemas
(kubernetes-validate ships them), plus what matters beyond the schema: GPUs, probes, no
secret value anywhere, and the engine argv `spillover serve` would start."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from router.cli import engine_specs, main
from router.config import Config, parse_config
from serving.engine import engine_command, engine_env
from serving.k8s import (
    DATABASE_URL_ENV,
    VLLM_IMAGE,
    K8sOptions,
    RenderError,
    cluster_catalog,
    render,
)

ROOT = Path(__file__).resolve().parents[2]
# The oldest Kubernetes release still commonly run, and the newest the validator knows.
K8S_VERSIONS = ("1.28", "1.37")
SECRET_KEY = "sk-test-9f8e7d6c5b4a-not-a-real-key"
SECRET_DB = "postgresql://spill:pw-4f3e2d1c@db.internal:5432/spillover"


def shipped_catalog_with_real_deployments() -> str:
    """models.yaml with the commented example deployments (mistral-small ... embed) on."""
    out: list[str] = []
    enabled = False
    for line in (ROOT / "models.yaml").read_text().splitlines():
        if re.fullmatch(r"  # [a-z0-9-]+:\s*(#.*)?", line):
            enabled = True  # the first example alias: every comment from here is YAML
        if enabled and line.startswith("  #"):
            line = "  " + line[4:] if line.startswith("  # ") else ""
        out.append(line)
    return "\n".join(out) + "\n"


@pytest.fixture(scope="module")
def text() -> str:
    return shipped_catalog_with_real_deployments()


@pytest.fixture(scope="module")
def cfg(text: str) -> Config:
    return parse_config(text)


@pytest.fixture(scope="module")
def objects(text: str, cfg: Config) -> list[dict[str, Any]]:
    return render(cfg, yaml.safe_load(text), K8sOptions(service_monitor=True))


def of_kind(objects: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


def test_the_real_deployments_are_enabled(cfg: Config) -> None:
    # Without them the checks below would only see the demo deployment.
    assert {"mistral-small", "mixtral-8x7b", "mistral-large", "codestral", "embed"} <= set(
        cfg.aliases)
    assert len([d for _, d in cfg.deployments()]) == 10


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_core_object_validates_against_the_kubernetes_schemas(
        objects: list[dict[str, Any]], version: str) -> None:
    checked = 0
    for obj in objects:
        if obj["kind"] == "ServiceMonitor":
            continue  # a CRD: not in the API schemas (checked below)
        # strict: an unknown or misplaced field is an error, as `kubectl apply` would say.
        kubernetes_validate.validate(obj, version, strict=True)
        checked += 1
    assert checked == len(objects) - 1


def test_the_validator_does_reject_a_broken_object(objects: list[dict[str, Any]]) -> None:
    # The validation above is not vacuous: a misplaced field and a wrong type both fail.
    engine = next(iter(of_kind(objects, "Deployment").values()))
    broken = yaml.safe_load(yaml.safe_dump(engine))
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["path"] = "/health"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, "1.37", strict=True)
    broken = yaml.safe_load(yaml.safe_dump(engine))
    broken["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, "1.37", strict=True)


def test_one_engine_deployment_and_headless_service_per_local_deployment(
        cfg: Config, objects: list[dict[str, Any]]) -> None:
    deployments = of_kind(objects, "Deployment")
    services = of_kind(objects, "Service")
    for _, dep in cfg.deployments():
        name = "vllm-" + dep.name
        d, s = deployments[name], services[name]
        assert s["spec"]["clusterIP"] == "None"
        assert s["spec"]["selector"] == d["spec"]["selector"]["matchLabels"]
        labels = d["spec"]["template"]["metadata"]["labels"]
        assert all(labels[k] == v for k, v in s["spec"]["selector"].items())
        (port,) = s["spec"]["ports"]
        assert port["port"] == dep.port and port["targetPort"] == "http"
        assert d["spec"]["replicas"] == dep.replicas
        (c,) = d["spec"]["template"]["spec"]["containers"]
        assert c["image"] == VLLM_IMAGE
        assert c["ports"] == [{"name": "http", "containerPort": dep.port, "protocol": "TCP"}]


@pytest.mark.parametrize(("name", "gpus"), [
    ("vllm-small-gpu0", 1),           # gpus: [0]
    ("vllm-mixtral-gpu01", 2),        # tensor_parallel_size: 2
    ("vllm-large-gpu0123", 4),        # tensor_parallel_size: 4
    ("vllm-codestral-gpu2", 1),
    ("vllm-demo-local", 1),
])
def test_gpu_requests_follow_gpus_and_tensor_parallel_size(
        objects: list[dict[str, Any]], name: str, gpus: int) -> None:
    (c,) = of_kind(objects, "Deployment")[name]["spec"]["template"]["spec"]["containers"]
    assert c["resources"]["requests"]["nvidia.com/gpu"] == gpus
    assert c["resources"]["limits"]["nvidia.com/gpu"] == gpus


def test_engine_probes_are_on_health_at_the_engine_port(
        cfg: Config, objects: list[dict[str, Any]]) -> None:
    deployments = of_kind(objects, "Deployment")
    for _, dep in cfg.deployments():
        (c,) = deployments["vllm-" + dep.name]["spec"]["template"]["spec"]["containers"]
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert c[probe]["httpGet"] == {"path": "/health", "port": "http"}, probe
        # Liveness must not kill an engine still loading: the startup probe covers what
        # spillover serve waits for an engine (engine_start_timeout_s).
        startup = c["startupProbe"]
        assert startup["periodSeconds"] * startup["failureThreshold"] >= (
            cfg.server.engine_start_timeout_s)
    (router,) = deployments["spillover-router"]["spec"]["template"]["spec"]["containers"]
    assert router["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert router["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}


def test_engine_argv_and_env_are_the_ones_spillover_serve_uses(
        cfg: Config, objects: list[dict[str, Any]]) -> None:
    deployments = of_kind(objects, "Deployment")
    served = engine_specs(cfg)  # what `spillover serve` starts
    assert len(served) == 10
    for spec in served:
        (c,) = deployments["vllm-" + spec.name]["spec"]["template"]["spec"]["containers"]
        # Only the bind address differs: a pod listens on its own network.
        pod = dataclasses.replace(spec, host="0.0.0.0")
        # The engine image is vLLM's GPU build whatever this host has installed.
        assert c["command"] == engine_command(pod, python="python3", cpu_build=False)
        assert "--distributed-executor-backend" not in c["command"]
        env = {e["name"]: e["value"] for e in c["env"]}
        assert "VLLM_ENABLE_V1_MULTIPROCESSING" not in env
        for k, v in engine_env(spec, base={}, cpu_build=False).items():
            assert env[k] == v, k
    (demo,) = deployments["vllm-demo-local"]["spec"]["template"]["spec"]["containers"]
    # Sanity: the flags from models.yaml are there (both sides could drop them otherwise).
    assert demo["command"][-5:] == [
        "--enable-auto-tool-choice", "--tool-call-parser", "mistral",
        "--structured-outputs-config", '{"backend":"xgrammar","disable_any_whitespace":true}']
    assert demo["command"][:3] == ["python3", "-m", "vllm.entrypoints.openai.api_server"]
    assert "--tensor-parallel-size" in deployments["vllm-large-gpu0123"]["spec"][
        "template"]["spec"]["containers"][0]["command"]


def test_no_secret_value_in_any_manifest(
        text: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("MISTRAL_API_KEY", SECRET_KEY)
    monkeypatch.setenv(DATABASE_URL_ENV, SECRET_DB)
    catalog = tmp_path / "models.yaml"
    catalog.write_text(text)
    out = tmp_path / "k8s"
    assert main(["deploy", "k8s", "--config", str(catalog), "--out", str(out),
                 "--service-monitor"]) == 0
    written = sorted(out.glob("*.yaml"))
    assert len(written) == 25  # catalog, 10 x (Deployment, Service), router x 3, monitor
    everything = "\n".join(p.read_text() for p in written)
    assert SECRET_KEY not in everything and "pw-4f3e2d1c" not in everything
    assert SECRET_KEY not in capsys.readouterr().out
    docs = [yaml.safe_load(p.read_text()) for p in written]
    assert not [d for d in docs if d["kind"] == "Secret"]
    (router,) = [d for d in docs if d["kind"] == "Deployment"
                 and d["metadata"]["name"] == "spillover-router"]
    env = {e["name"]: e for e in router["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["MISTRAL_API_KEY"] == {"name": "MISTRAL_API_KEY", "valueFrom": {
        "secretKeyRef": {"name": "spillover-providers", "key": "MISTRAL_API_KEY"}}}
    assert env[DATABASE_URL_ENV]["valueFrom"]["secretKeyRef"] == {
        "name": "spillover-database", "key": "url"}
    assert all("value" not in e for e in env.values() if e["name"] != "SPILLOVER_CONFIG")


def test_router_runs_without_engines_with_the_catalog_from_the_configmap(
        cfg: Config, objects: list[dict[str, Any]]) -> None:
    router = of_kind(objects, "Deployment")["spillover-router"]
    assert router["spec"]["replicas"] >= 2
    pod = router["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["command"][:3] == ["spillover", "serve", "--no-engines"]
    mount = next(m for m in c["volumeMounts"] if m["name"] == "catalog")
    volume = next(v for v in pod["volumes"] if v["name"] == "catalog")
    assert c["command"][c["command"].index("--config") + 1].startswith(mount["mountPath"])
    configmap = of_kind(objects, "ConfigMap")[volume["configMap"]["name"]]
    catalog = parse_config(configmap["data"]["models.yaml"])
    assert catalog.server.host == "0.0.0.0"
    assert catalog.server.database_url_env == DATABASE_URL_ENV
    for _, dep in catalog.deployments():
        # Each engine found through its headless Service, every replica by DNS.
        assert dep.discover == f"vllm-{dep.name}.spillover.svc.cluster.local"
        assert not dep.managed
    assert {a: [d.name for d in x.local] for a, x in catalog.aliases.items()} == {
        a: [d.name for d in x.local] for a, x in cfg.aliases.items()}
    service = of_kind(objects, "Service")["spillover-router"]
    assert service["spec"]["selector"] == router["spec"]["selector"]["matchLabels"]
    pdb = of_kind(objects, "PodDisruptionBudget")["spillover-router"]
    assert pdb["spec"]["selector"] == router["spec"]["selector"]
    assert pdb["spec"]["maxUnavailable"] < router["spec"]["replicas"]


def test_service_monitor_only_when_asked_and_scrapes_the_router_service(
        cfg: Config, text: str, objects: list[dict[str, Any]]) -> None:
    (monitor,) = of_kind(objects, "ServiceMonitor").values()
    service = of_kind(objects, "Service")["spillover-router"]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert all(service["metadata"]["labels"][k] == v
               for k, v in monitor["spec"]["selector"]["matchLabels"].items())
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert endpoint["path"] == "/metrics"
    assert endpoint["bearerTokenSecret"] == {"name": "spillover-metrics", "key": "token"}
    plain = render(cfg, yaml.safe_load(text), K8sOptions())
    assert not of_kind(plain, "ServiceMonitor")


def test_replicas_and_options_reach_the_manifests(cfg: Config, text: str) -> None:
    raw = yaml.safe_load(text)
    raw["aliases"]["mistral-small"]["local"][0]["replicas"] = 3
    objects = render(parse_config(yaml.safe_dump(raw)), raw, K8sOptions(
        namespace="llm", router_replicas=4, model_pvc="weights", database_secret=None))
    deployments = of_kind(objects, "Deployment")
    small = deployments["vllm-small-gpu0"]
    assert small["spec"]["replicas"] == 3
    assert small["metadata"]["namespace"] == "llm"
    assert {"name": "models", "persistentVolumeClaim": {"claimName": "weights"}} in (
        small["spec"]["template"]["spec"]["volumes"])
    assert deployments["spillover-router"]["spec"]["replicas"] == 4
    env = deployments["spillover-router"]["spec"]["template"]["spec"]["containers"][0]["env"]
    assert DATABASE_URL_ENV not in {e["name"] for e in env}
    catalog = parse_config(of_kind(objects, "ConfigMap")["spillover-catalog"]["data"][
        "models.yaml"])
    assert catalog.server.database_url_env is None
    assert catalog.aliases["demo"].local[0].discover == "vllm-demo-local.llm.svc.cluster.local"
    for obj in objects:
        kubernetes_validate.validate(obj, "1.37", strict=True)


def test_an_engine_outside_the_cluster_stays_where_it_is(text: str) -> None:
    raw = yaml.safe_load(text)
    raw["aliases"]["demo"]["local"][0]["base_url"] = "http://gpu-box.lan:8101/v1"
    cfg = parse_config(yaml.safe_dump(raw))
    names = {o["metadata"]["name"] for o in render(cfg, raw, K8sOptions())}
    assert "vllm-demo-local" not in names and "vllm-small-gpu0" in names
    demo = cluster_catalog(raw, K8sOptions())["aliases"]["demo"]["local"][0]
    assert demo["base_url"] == "http://gpu-box.lan:8101/v1" and "discover" not in demo


def test_names_kubernetes_cannot_hold_are_refused(text: str) -> None:
    raw = yaml.safe_load(text)
    raw["aliases"]["demo"]["local"][0]["name"] = "Small_GPU0"
    raw["aliases"]["mistral-small"]["local"][0]["name"] = "small-gpu0"
    raw["aliases"]["mistral-small"]["local"][0]["port"] = 8102
    cfg = parse_config(yaml.safe_dump(raw))
    with pytest.raises(RenderError, match="collide"):
        render(cfg, raw, K8sOptions())


def test_cli_reports_a_bad_catalog_without_writing(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "models.yaml"
    bad.write_text("aliases: {x: {local: [{name: a, model: m, license: nope}]}}\n")
    out = tmp_path / "k8s"
    assert main(["deploy", "k8s", "--config", str(bad), "--out", str(out)]) == 1
    assert "unknown licence" in capsys.readouterr().err
    assert not out.exists()


def test_images_engine_pinned_router_slim() -> None:
    gpu = (ROOT / "Dockerfile.gpu").read_text()
    assert re.search(rf"^FROM {re.escape(VLLM_IMAGE)}$", gpu, flags=re.MULTILINE)
    router = (ROOT / "Dockerfile.router").read_text()
    (base,) = re.findall(r"^FROM\s+(\S+)", router, flags=re.MULTILINE)
    assert "vllm" not in base
    installs = re.findall(r"pip install[^\n]*", router)
    assert installs and all("[" not in i and "vllm" not in i for i in installs)
    assert '"--no-engines"' in router
