"""Kubernetes manifests rendered from models.yaml (`spillover deploy k8s`).

One source of truth: every local deployment becomes a vLLM Deployment running the very
argv and environment `spillover serve` would start it with (serving.engine builds both),
behind a headless Service whose DNS name the router's catalog names in `discover`, so the
router finds each engine replica itself. The router runs `--no-engines` in its own slim
image, several replicas behind a Service and a PodDisruptionBudget, with the catalog as a
ConfigMap and every secret (hosted providers' keys, the PostgreSQL URL, the metrics
token) referenced by Secret name, never written into a manifest.
"""

from __future__ import annotations

import copy
import hashlib
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from router.config import Config, LocalDeployment
from serving.engine import deployment_spec, engine_command, engine_env

# The vLLM release the CPU CI runs and Dockerfile.gpu is built on (test_release_pins and
# test_k8s check that they stay one release).
VLLM_IMAGE = "vllm/vllm-openai:v0.32.0"
ROUTER_PORT = 8000
CATALOG_PATH = "/etc/spillover/models.yaml"
# The router's writable state (SQLite ledger or spool); everything else is read-only.
STATE_DIR = "/var/lib/spillover"
# Where the engine pod mounts the model volume: relative model paths of models.yaml
# resolve inside it (the engine's working directory), hub ids come from its cache.
MODELS_DIR = "/models"
DATABASE_URL_ENV = "SPILLOVER_DATABASE_URL"
PART_OF = "spillover"

Manifest = dict[str, Any]


class RenderError(ValueError):
    """models.yaml or the options cannot become valid manifests; the message says why."""


@dataclass(frozen=True, slots=True, kw_only=True)
class K8sOptions:
    namespace: str = "spillover"
    router_image: str = "spillover-router:latest"
    router_replicas: int = 2
    # The models volume: a PersistentVolumeClaim by name, else a directory on each GPU node.
    model_pvc: str | None = None
    model_host_path: str = "/var/lib/spillover/models"
    # Secrets referenced by name: one key per provider api_key_env; the PostgreSQL URL under
    # `url` (None: each router replica keeps its own SQLite ledger, budgets not shared).
    providers_secret: str = "spillover-providers"
    database_secret: str | None = "spillover-database"
    service_monitor: bool = False
    metrics_secret: str = "spillover-metrics"  # key `token`: Prometheus's bearer token


_DNS_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$")


def k8s_name(name: str, prefix: str = "") -> str:
    """A DNS-1123 label for an object named after a models.yaml name."""
    label = re.sub(r"[^a-z0-9-]+", "-", (prefix + name).lower()).strip("-")
    if not _DNS_LABEL.fullmatch(label) or len(label) > 63:
        raise RenderError(f"{name!r} cannot be made a Kubernetes name (63 characters at most)")
    return label


def engine_service(dep: LocalDeployment) -> str:
    return k8s_name(dep.name, "vllm-")


def render(cfg: Config, raw: Mapping[str, Any], opts: K8sOptions) -> list[Manifest]:
    """Every object, in the order `kubectl apply` should create them.

    `raw` is models.yaml as parsed YAML (cfg validated from it): the catalog the routers
    read is the operator's file with only what the cluster changes, not every default.
    """
    if opts.router_replicas < 1:
        raise RenderError("the router needs at least one replica")
    k8s_name(opts.namespace)
    locals_ = [(alias, dep) for alias, dep in cfg.deployments() if dep.managed]
    names = [engine_service(dep) for _, dep in locals_]
    if len(set(names)) != len(names):
        raise RenderError(f"local deployment names collide as Kubernetes names: {names}")
    catalog = cluster_catalog(raw, opts)
    text = yaml.safe_dump(catalog, sort_keys=False)
    objects: list[Manifest] = [_catalog_map(text, opts)]
    for alias, dep in locals_:
        objects += [_engine_deployment(alias, dep, cfg, opts), _engine_service(dep, opts)]
    objects += _router(cfg, text, opts)
    return objects


def cluster_catalog(raw: Mapping[str, Any], opts: K8sOptions) -> dict[str, Any]:
    """models.yaml as the routers in the cluster read it: each managed local deployment
    found through its headless Service, the router facing the pod network, the ledger on
    the shared PostgreSQL when there is one. Validated like any models.yaml."""
    out: dict[str, Any] = copy.deepcopy(dict(raw))
    server = out.setdefault("server", {}) or {}
    out["server"] = server
    server["host"] = "0.0.0.0"
    server["port"] = ROUTER_PORT
    if opts.database_secret is not None:
        server["database_url_env"] = DATABASE_URL_ENV
    for alias in (out.get("aliases") or {}).values():
        for dep in (alias or {}).get("local") or []:
            if dep.get("base_url") is not None or dep.get("discover") is not None:
                continue  # an engine outside the cluster: reached as configured
            dep.pop("host", None)
            local = LocalDeployment.model_validate(dep)
            dep["discover"] = f"{engine_service(local)}.{opts.namespace}.svc.cluster.local"
    try:
        Config.model_validate(out)
    except ValueError as exc:
        raise RenderError(f"the cluster's catalog is not valid: {exc}") from exc
    return out


def _labels(component: str, instance: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": component, "app.kubernetes.io/instance": instance,
            "app.kubernetes.io/part-of": PART_OF}


def _meta(name: str, opts: K8sOptions, labels: dict[str, str]) -> dict[str, Any]:
    return {"name": name, "namespace": opts.namespace, "labels": labels}


def _catalog_map(text: str, opts: K8sOptions) -> Manifest:
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": _meta("spillover-catalog", opts, _labels("spillover-router", "router")),
            "data": {"models.yaml": text}}


def gpu_count(dep: LocalDeployment) -> int:
    """GPUs one engine replica holds: its tensor-parallel ranks, or the devices it names."""
    return max(len(dep.gpus), dep.tensor_parallel_size)


def _http_probe(path: str, port: int | str, *, period: int, failures: int,
                timeout: int = 5) -> dict[str, Any]:
    return {"httpGet": {"path": path, "port": port}, "periodSeconds": period,
            "timeoutSeconds": timeout, "failureThreshold": failures}


def _engine_deployment(alias: str, dep: LocalDeployment, cfg: Config,
                       opts: K8sOptions) -> Manifest:
    spec = deployment_spec(alias, dep, host="0.0.0.0")
    env = engine_env(spec, base={}, cpu_build=False)
    env["HF_HOME"] = f"{MODELS_DIR}/huggingface"
    gpus = gpu_count(dep)
    name = engine_service(dep)
    labels = _labels("vllm", name)
    # Loading weights and compiling takes minutes: the startup probe allows what
    # `spillover serve` allows (server.engine_start_timeout_s) before liveness applies.
    startup_failures = max(1, math.ceil(cfg.server.engine_start_timeout_s / 10))
    volume: dict[str, Any] = (
        {"name": "models", "persistentVolumeClaim": {"claimName": opts.model_pvc}}
        if opts.model_pvc else
        {"name": "models", "hostPath": {"path": opts.model_host_path, "type": "Directory"}})
    container = {
        "name": "vllm",
        "image": VLLM_IMAGE,
        # The full argv, not the image's entrypoint: the flags are the ones spillover uses.
        "command": engine_command(spec, python="python3", cpu_build=False),
        "workingDir": MODELS_DIR,
        "env": [{"name": k, "value": v} for k, v in sorted(env.items())],
        "ports": [{"name": "http", "containerPort": dep.port, "protocol": "TCP"}],
        # Extended resources are whole devices, requests equal to limits.
        "resources": {"requests": {"nvidia.com/gpu": gpus}, "limits": {"nvidia.com/gpu": gpus}},
        "startupProbe": _http_probe("/health", "http", period=10, failures=startup_failures),
        "readinessProbe": _http_probe("/health", "http", period=5, failures=3),
        "livenessProbe": _http_probe("/health", "http", period=10, failures=6),
        "volumeMounts": [{"name": "models", "mountPath": MODELS_DIR},
                         {"name": "dshm", "mountPath": "/dev/shm"}],
    }
    return {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": _meta(name, opts, {**labels, "spillover/alias": k8s_name(alias)}),
        "spec": {
            "replicas": dep.replicas,
            "selector": {"matchLabels": {k: labels[k] for k in _SELECT}},
            # No surge: a new pod would wait for GPUs the old one still holds.
            "strategy": {"type": "RollingUpdate",
                         "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "containers": [container],
                    # Tensor-parallel workers talk through shared memory; Docker's 64 MB
                    # /dev/shm is too small for NCCL.
                    "volumes": [volume, {"name": "dshm", "emptyDir": {"medium": "Memory"}}],
                    "terminationGracePeriodSeconds": 30,
                },
            },
        },
    }


_SELECT = ("app.kubernetes.io/name", "app.kubernetes.io/instance")


def _engine_service(dep: LocalDeployment, opts: K8sOptions) -> Manifest:
    name = engine_service(dep)
    labels = _labels("vllm", name)
    return {
        "apiVersion": "v1", "kind": "Service",
        "metadata": _meta(name, opts, labels),
        "spec": {
            # Headless: DNS answers every ready pod's address, one replica each for the router.
            "clusterIP": "None",
            "selector": {k: labels[k] for k in _SELECT},
            "ports": [{"name": "http", "port": dep.port, "targetPort": "http",
                       "protocol": "TCP"}],
        },
    }


def _secret_env(name: str, secret: str, key: str) -> dict[str, Any]:
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}


def _router(cfg: Config, catalog_text: str, opts: K8sOptions) -> list[Manifest]:
    labels = _labels("spillover-router", "router")
    select = {k: labels[k] for k in _SELECT}
    env: list[dict[str, Any]] = [{"name": "SPILLOVER_CONFIG", "value": CATALOG_PATH}]
    for key_env in sorted({p.api_key_env for p in cfg.providers.values() if p.api_key_env}):
        env.append(_secret_env(key_env, opts.providers_secret, key_env))
    if opts.database_secret is not None:
        env.append(_secret_env(DATABASE_URL_ENV, opts.database_secret, "url"))
    container = {
        "name": "router",
        "image": opts.router_image,
        "command": ["spillover", "serve", "--no-engines", "--config", CATALOG_PATH,
                    "--host", "0.0.0.0", "--port", str(ROUTER_PORT)],
        "workingDir": STATE_DIR,
        "env": env,
        "ports": [{"name": "http", "containerPort": ROUTER_PORT, "protocol": "TCP"}],
        "resources": {"requests": {"cpu": "500m", "memory": "256Mi"},
                      "limits": {"memory": "1Gi"}},
        "readinessProbe": _http_probe("/readyz", "http", period=5, failures=3, timeout=2),
        "livenessProbe": _http_probe("/healthz", "http", period=10, failures=3, timeout=2),
        "securityContext": {"runAsNonRoot": True, "runAsUser": 10001,
                            "allowPrivilegeEscalation": False,
                            "readOnlyRootFilesystem": True,
                            "capabilities": {"drop": ["ALL"]}},
        "volumeMounts": [{"name": "catalog", "mountPath": "/etc/spillover", "readOnly": True},
                         {"name": "state", "mountPath": STATE_DIR}],
    }
    # A changed catalog changes the pod template, so `kubectl apply` rolls the routers.
    digest = hashlib.sha256(catalog_text.encode()).hexdigest()[:16]
    deployment: Manifest = {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": _meta("spillover-router", opts, labels),
        "spec": {
            "replicas": opts.router_replicas,
            "selector": {"matchLabels": select},
            "strategy": {"type": "RollingUpdate",
                         "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "template": {
                "metadata": {"labels": labels,
                             "annotations": {"spillover/catalog-sha256": digest}},
                "spec": {
                    "containers": [container],
                    "volumes": [{"name": "catalog",
                                 "configMap": {"name": "spillover-catalog"}},
                                {"name": "state", "emptyDir": {}}],
                    "topologySpreadConstraints": [{
                        "maxSkew": 1, "topologyKey": "kubernetes.io/hostname",
                        "whenUnsatisfiable": "ScheduleAnyway",
                        "labelSelector": {"matchLabels": select}}],
                    "terminationGracePeriodSeconds": 30,
                },
            },
        },
    }
    service: Manifest = {
        "apiVersion": "v1", "kind": "Service",
        "metadata": _meta("spillover-router", opts, labels),
        "spec": {"selector": select,
                 "ports": [{"name": "http", "port": ROUTER_PORT, "targetPort": "http",
                            "protocol": "TCP"}]},
    }
    pdb: Manifest = {
        "apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
        "metadata": _meta("spillover-router", opts, labels),
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": select}},
    }
    out = [deployment, service, pdb]
    if opts.service_monitor:
        out.append({
            "apiVersion": "monitoring.coreos.com/v1", "kind": "ServiceMonitor",
            "metadata": _meta("spillover-router", opts, labels),
            "spec": {
                "selector": {"matchLabels": select},
                "namespaceSelector": {"matchNames": [opts.namespace]},
                # /metrics names callers with their spend: Prometheus shows a token whose
                # digest is in server.metrics_token_sha256.
                "endpoints": [{"port": "http", "path": "/metrics", "interval": "15s",
                               "bearerTokenSecret": {"name": opts.metrics_secret,
                                                     "key": "token"}}],
            },
        })
    return out


def write_manifests(objects: Sequence[Manifest], out: Path) -> list[Path]:
    """One file per object, numbered in apply order (`kubectl apply -f DIR` takes them)."""
    out.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    for i, obj in enumerate(objects):
        path = out / f"{i:02d}-{obj['kind'].lower()}-{obj['metadata']['name']}.yaml"
        path.write_text(yaml.safe_dump(obj, sort_keys=False), encoding="utf-8")
        paths.append(path)
    return paths
