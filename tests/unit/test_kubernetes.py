"""The Kubernetes manifests in deploy/kubernetes: schema-valid offline, and consistent with the image.

Built-in kinds are validated against the Kubernetes JSON schemas shipped inside the
kubernetes-validate package (strict variant: unknown fields are errors), so nothing is downloaded.
Custom resources the schemas do not know (ServiceMonitor, kustomize's Kustomization) get a
structural check instead. Each kind of check has a test showing that it rejects a broken copy.
"""

from __future__ import annotations

import copy
import json
import os
import re
from typing import Any

import pytest
import yaml
from kubernetes_validate import utils as kv

from zimage_backend.settings import parse_settings
from zimage_gateway import settings as gateway_settings

from tests.conftest import ROOT

DEPLOY = ROOT / "deploy" / "kubernetes"
DOCKERFILE = ROOT / "docker" / "Dockerfile"
MODEL_REPOSITORY = ROOT / "model_repository"
MODEL = "zimage"

# An older release still common in managed clusters, and the newest schema set in the package.
K8S_VERSIONS = ("1.30", kv.latest_version())

EXPECTED_FILES = {
    "kustomization.yaml", "deployment.yaml", "configmap.yaml", "service.yaml", "hpa.yaml",
    "prometheus-adapter-rules.yaml", "servicemonitor.yaml", "pdb.yaml", "README.md",
    "gateway-deployment.yaml", "gateway-service.yaml",
}

SERVICEMONITOR = ("monitoring.coreos.com/v1", "ServiceMonitor")
KUSTOMIZATION = ("kustomize.config.k8s.io/v1beta1", "Kustomization")
# Only these are exempt from the schemas: a typo in any other apiVersion/kind must fail.
CUSTOM_KINDS = {SERVICEMONITOR, KUSTOMIZATION}

HEALTH_READY = "/v2/health/ready"
# Readiness asks for the model itself: a broken GPU unloads it, and Triton's server readiness
# turns true again once no model is left to wait for.
MODEL_READY = "/v2/models/zimage/ready"
HEALTH_LIVE = "/v2/health/live"
DNS_1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
DURATION = re.compile(r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$")


def _load_manifests() -> list[tuple[str, dict[str, Any]]]:
    docs = []
    for path in sorted(DEPLOY.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            if doc is not None:
                docs.append((path.name, doc))
    return docs


MANIFESTS = _load_manifests()


def _key(doc: dict[str, Any]) -> tuple[str, str]:
    return doc.get("apiVersion", ""), doc.get("kind", "")


def _objects(kind: str) -> list[dict[str, Any]]:
    return [doc for _, doc in MANIFESTS if doc.get("kind") == kind and _key(doc) != KUSTOMIZATION]


def _one(kind: str) -> dict[str, Any]:
    found = _objects(kind)
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def _named(kind: str, name: str) -> dict[str, Any]:
    found = [doc for doc in _objects(kind) if doc["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} named {name!r}, found {len(found)}"
    return found[0]


def _triton() -> dict[str, Any]:
    return _named("Deployment", "zimage-triton")


def _servers_services() -> list[dict[str, Any]]:
    """The Triton server's Services (the gateway has its own)."""
    return [s for s in _objects("Service") if s["metadata"]["labels"]["app.kubernetes.io/name"] == "zimage-triton"]


def _kustomization() -> dict[str, Any]:
    found = [doc for _, doc in MANIFESTS if _key(doc) == KUSTOMIZATION]
    assert len(found) == 1
    return found[0]


def _container(deployment: dict[str, Any]) -> dict[str, Any]:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1, "one Triton container per pod"
    return containers[0]


def _matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def _quantity_bytes(value: str | int) -> float:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
    match = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(value))
    assert match and match.group(2) in ("", *units), f"not a byte quantity: {value!r}"
    return float(match.group(1)) * units.get(match.group(2), 1)


# --- the image, as docker/Dockerfile builds it -----------------------------------------------

def _dockerfile_instructions() -> list[str]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text(encoding="utf-8"))
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def dockerfile_exposed_ports() -> set[int]:
    ports = set()
    for line in _dockerfile_instructions():
        if line.upper().startswith("EXPOSE "):
            ports |= {int(p.split("/")[0]) for p in line.split()[1:]}
    return ports


def dockerfile_entrypoint() -> list[str]:
    lines = [line for line in _dockerfile_instructions() if line.upper().startswith("ENTRYPOINT ")]
    assert len(lines) == 1
    return json.loads(lines[0].split(None, 1)[1])


def dockerfile_env(name: str) -> str | None:
    for line in _dockerfile_instructions():
        if line.upper().startswith("ENV "):
            match = re.search(rf"(?:^|\s){re.escape(name)}=(\S+)", line[4:])
            if match:
                return match.group(1)
    return None


# --- validators ------------------------------------------------------------------------------

def validate_manifest(doc: dict[str, Any], version: str) -> None:
    """Raises kv.ValidationError (bad object) or kv.SchemaNotFoundError (unknown apiVersion/kind)."""
    kv.validate(doc, version, strict=True)


def servicemonitor_problems(doc: Any) -> list[str]:
    """Structural check of a ServiceMonitor, for clusters' CRDs are not in the schema set."""
    if not isinstance(doc, dict):
        return ["not a mapping"]
    problems = []
    if _key(doc) != SERVICEMONITOR:
        problems.append(f"apiVersion/kind {_key(doc)} != {SERVICEMONITOR}")
    if missing := {"apiVersion", "kind", "metadata", "spec"} - set(doc):
        problems.append(f"missing {sorted(missing)}")
    if extra := set(doc) - {"apiVersion", "kind", "metadata", "spec"}:
        problems.append(f"unknown top-level keys {sorted(extra)}")
    metadata = doc.get("metadata")
    if not isinstance(metadata, dict) or not DNS_1123.match(str(metadata.get("name", ""))):
        problems.append("metadata.name missing or not a DNS-1123 name")
    elif not all(isinstance(v, str) for v in (metadata.get("labels") or {}).values()):
        problems.append("metadata.labels values must be strings")
    spec = doc.get("spec")
    if not isinstance(spec, dict):
        return problems + ["spec is not a mapping"]
    known = {"selector", "endpoints", "namespaceSelector", "jobLabel", "targetLabels",
             "podTargetLabels", "sampleLimit", "targetLimit", "labelLimit", "attachMetadata"}
    if extra := set(spec) - known:
        problems.append(f"unknown spec keys {sorted(extra)}")
    selector = spec.get("selector")
    if not isinstance(selector, dict) or not (selector.get("matchLabels") or selector.get("matchExpressions")):
        problems.append("spec.selector needs matchLabels or matchExpressions")
    elif not all(isinstance(v, str) for v in (selector.get("matchLabels") or {}).values()):
        problems.append("spec.selector.matchLabels values must be strings")
    endpoints = spec.get("endpoints")
    if not isinstance(endpoints, list) or not endpoints:
        return problems + ["spec.endpoints must be a non-empty list"]
    for i, endpoint in enumerate(endpoints):
        if not isinstance(endpoint, dict):
            problems.append(f"spec.endpoints[{i}] is not a mapping")
            continue
        if not isinstance(endpoint.get("port"), str) and "targetPort" not in endpoint:
            problems.append(f"spec.endpoints[{i}] needs a named port")
        for field in ("interval", "scrapeTimeout"):
            if field in endpoint and not DURATION.match(str(endpoint[field])):
                problems.append(f"spec.endpoints[{i}].{field} {endpoint[field]!r} is not a duration")
        if "path" in endpoint and not str(endpoint["path"]).startswith("/"):
            problems.append(f"spec.endpoints[{i}].path must start with /")
    return problems


def kustomization_problems(doc: Any) -> list[str]:
    if not isinstance(doc, dict):
        return ["not a mapping"]
    problems = []
    if _key(doc) != KUSTOMIZATION:
        problems.append(f"apiVersion/kind {_key(doc)} != {KUSTOMIZATION}")
    known = {"apiVersion", "kind", "metadata", "resources", "components", "images", "labels",
             "commonLabels", "commonAnnotations", "namespace", "namePrefix", "nameSuffix", "patches",
             "configMapGenerator", "secretGenerator", "generatorOptions", "replicas"}
    if extra := set(doc) - known:
        problems.append(f"unknown keys {sorted(extra)}")
    resources = doc.get("resources")
    if not isinstance(resources, list) or not all(isinstance(r, str) for r in resources):
        problems.append("resources must be a list of paths")
    for i, image in enumerate(doc.get("images") or []):
        if not isinstance(image, dict) or not isinstance(image.get("name"), str):
            problems.append(f"images[{i}] needs a name")
        elif extra := set(image) - {"name", "newName", "newTag", "digest"}:
            problems.append(f"images[{i}]: unknown keys {sorted(extra)}")
    return problems


def port_problems(deployment: dict[str, Any], services: list[dict[str, Any]], exposed: set[int]) -> list[str]:
    """Container ports == the Dockerfile's EXPOSE, and every Service port lands on one of them."""
    container_ports = {p["name"]: p["containerPort"] for p in _container(deployment).get("ports", [])}
    problems = []
    if set(container_ports.values()) != exposed:
        problems.append(f"container ports {sorted(container_ports.values())} != EXPOSE {sorted(exposed)}")
    for service in services:
        for port in service["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            resolved = container_ports.get(target) if isinstance(target, str) else target
            if resolved not in container_ports.values():
                problems.append(f"{service['metadata']['name']}:{port['name']} targets {target!r}, no container port")
            elif port["name"] in container_ports and container_ports[port["name"]] != resolved:
                problems.append(f"{service['metadata']['name']}:{port['name']} targets another container port")
    return problems


def probe_problems(deployment: dict[str, Any]) -> list[str]:
    container = _container(deployment)
    http_port = {p["name"]: p["containerPort"] for p in container["ports"]}.get("http")
    problems = []
    wanted = {"readinessProbe": {MODEL_READY}, "livenessProbe": {HEALTH_LIVE},
              "startupProbe": {HEALTH_READY, HEALTH_LIVE}}
    for probe_name, paths in wanted.items():
        probe = container.get(probe_name)
        if not probe or "httpGet" not in probe:
            problems.append(f"{probe_name}: missing or not an httpGet probe")
            continue
        get = probe["httpGet"]
        if get.get("path") not in paths:
            problems.append(f"{probe_name}: path {get.get('path')!r} is not one of {sorted(paths)}")
        if get.get("port") not in ("http", http_port):
            problems.append(f"{probe_name}: port {get.get('port')!r} is not Triton's HTTP port")
    return problems


def _startup_budget_s(container: dict[str, Any]) -> int:
    probe = container["startupProbe"]
    return probe.get("initialDelaySeconds", 0) + probe.get("periodSeconds", 10) * probe.get("failureThreshold", 3)


def _option(argv: list[str], name: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def _adapter_rules() -> list[dict[str, Any]]:
    config = yaml.safe_load(_named("ConfigMap", "zimage-prometheus-adapter-rules")["data"]["config.yaml"])
    return config["rules"]


# --- schemas ---------------------------------------------------------------------------------

def test_folder_holds_the_expected_files():
    assert {p.name for p in DEPLOY.iterdir()} == EXPECTED_FILES


BUILTIN = [(f, doc) for f, doc in MANIFESTS if _key(doc) not in CUSTOM_KINDS]


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("filename, doc", BUILTIN,
                         ids=[f"{f}:{d.get('kind')}/{d.get('metadata', {}).get('name')}" for f, d in BUILTIN])
def test_builtin_objects_match_the_kubernetes_schema(filename, doc, version):
    validate_manifest(doc, version)


def test_every_kind_is_checked():
    kinds = {_key(doc) for _, doc in MANIFESTS}
    assert kinds == {
        ("v1", "ConfigMap"), ("apps/v1", "Deployment"), ("v1", "Service"),
        ("autoscaling/v2", "HorizontalPodAutoscaler"), ("policy/v1", "PodDisruptionBudget"),
        SERVICEMONITOR, KUSTOMIZATION,
    }


def test_servicemonitor_is_structurally_valid():
    assert servicemonitor_problems(_one("ServiceMonitor")) == []


def test_kustomization_is_structurally_valid():
    assert kustomization_problems(_kustomization()) == []


def _set(path: tuple[Any, ...], value: Any):
    def mutate(doc):
        for key in path[:-1]:
            doc = doc[key]
        doc[path[-1]] = value
    return mutate


def _delete(path: tuple[Any, ...]):
    def mutate(doc):
        for key in path[:-1]:
            doc = doc[key]
        del doc[path[-1]]
    return mutate


CONTAINER = ("spec", "template", "spec", "containers", 0)


@pytest.mark.parametrize("mutate", [
    _set(CONTAINER + ("readinesProbe",), {"httpGet": {"path": MODEL_READY, "port": "http"}}),
    _set(CONTAINER + ("ports", 0, "containerPort"), "8000/tcp"),
    _delete(("spec", "selector")),
    _set(CONTAINER + ("securityContext", "privilegd"), False),
    _set(CONTAINER + ("resources", "limits"), ["nvidia.com/gpu"]),
    _set(("spec", "template", "spec", "terminationGracePeriodSeconds"), "60s"),
], ids=["misspelled-field", "port-as-string", "no-selector", "unknown-securitycontext-field",
        "limits-as-list", "grace-period-as-string"])
@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_broken_deployment_is_rejected(mutate, version):
    broken = copy.deepcopy(_triton())
    mutate(broken)
    with pytest.raises(kv.ValidationError):
        validate_manifest(broken, version)


@pytest.mark.parametrize("mutate", [
    _set(("spec", "minReplicas"), "one"),
    _set(("spec", "metrics", 0, "type"), {"Pods": True}),
    _delete(("spec", "scaleTargetRef")),
])
def test_broken_hpa_is_rejected(mutate):
    broken = copy.deepcopy(_one("HorizontalPodAutoscaler"))
    mutate(broken)
    with pytest.raises(kv.ValidationError):
        validate_manifest(broken, K8S_VERSIONS[-1])


def test_unknown_api_version_is_not_waved_through():
    broken = copy.deepcopy(_one("HorizontalPodAutoscaler"))
    broken["apiVersion"] = "autoscaling/v3"
    with pytest.raises(kv.SchemaNotFoundError):
        validate_manifest(broken, K8S_VERSIONS[-1])


@pytest.mark.parametrize("mutate, problem", [
    (_set(("apiVersion",), "monitoring.coreos.com/v1beta1"), "apiVersion/kind"),
    (_delete(("spec", "endpoints")), "endpoints"),
    (_set(("spec", "endpoints", 0, "interval"), "15 seconds"), "not a duration"),
    (_set(("spec", "selectr"), {}), "unknown spec keys"),
    (_set(("metadata", "name"), "Zimage_Triton"), "DNS-1123"),
])
def test_broken_servicemonitor_is_rejected(mutate, problem):
    broken = copy.deepcopy(_one("ServiceMonitor"))
    mutate(broken)
    assert any(problem in p for p in servicemonitor_problems(broken))


def test_broken_kustomization_is_rejected():
    broken = copy.deepcopy(_kustomization())
    broken["resource"] = broken.pop("resources")
    assert kustomization_problems(broken)


# --- consistency with the project ------------------------------------------------------------

def test_kustomization_lists_every_manifest():
    listed = _kustomization()["resources"]
    assert len(listed) == len(set(listed))
    on_disk = {p.name for p in DEPLOY.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(listed) == on_disk


def test_kustomization_can_override_the_image():
    # kustomize matches `images[].name` against the image without its tag.
    name, _, tag = _container(_triton())["image"].partition(":")
    assert (name, tag) == ("zimage-triton", "latest")
    assert name in {entry["name"] for entry in _kustomization()["images"]}


def test_manifests_pin_no_namespace():
    # The namespace comes from `kubectl -n` or an overlay; a hard-coded one would override both.
    assert [doc["metadata"]["name"] for _, doc in MANIFESTS if "namespace" in doc.get("metadata", {})] == []


def test_ports_match_the_dockerfile_and_the_services():
    assert dockerfile_exposed_ports() == {8000, 8001, 8002}
    assert port_problems(_triton(), _servers_services(), dockerfile_exposed_ports()) == []
    service = _named("Service", "zimage-triton")
    assert service["spec"]["type"] == "ClusterIP"
    ports = {p["name"]: p["port"] for p in service["spec"]["ports"]}
    assert ports == {"http": 8000, "grpc": 8001, "metrics": 8002}


def test_port_check_catches_a_mismatch():
    broken = copy.deepcopy(_triton())
    _container(broken)["ports"][1]["containerPort"] = 9001
    assert port_problems(broken, _servers_services(), dockerfile_exposed_ports())
    services = copy.deepcopy(_servers_services())
    services[0]["spec"]["ports"][0]["targetPort"] = "htpp"
    assert port_problems(_triton(), services, dockerfile_exposed_ports())


def test_probes_use_tritons_health_endpoints():
    assert probe_problems(_triton()) == []
    broken = copy.deepcopy(_triton())
    _container(broken)["readinessProbe"]["httpGet"]["path"] = "/healthz"
    _container(broken)["livenessProbe"]["httpGet"]["port"] = 8002
    assert len(probe_problems(broken)) == 2


def test_command_is_the_image_entrypoint_with_a_longer_ready_timeout():
    entrypoint = dockerfile_entrypoint()
    command = _container(_triton())["command"]
    at = command.index("--ready-timeout-s")
    assert command[:at] + command[at + 2:] == entrypoint
    assert "args" not in _container(_triton())


def test_startup_covers_download_and_compile():
    deployment = _triton()
    container = _container(deployment)
    budget = _startup_budget_s(container)
    ready_timeout = float(_option(container["command"], "--ready-timeout-s"))
    assert budget >= 20 * 60
    # The launcher stops the server when its own timeout passes, so it must not undercut the
    # probe by much; being slightly shorter gives a clear log line instead of a kubelet kill.
    assert 0.75 * budget <= ready_timeout <= budget
    assert deployment["spec"]["progressDeadlineSeconds"] >= budget


def test_graceful_stop_fits_the_termination_grace_period():
    deployment = _triton()
    exit_timeout = int(_option(dockerfile_entrypoint(), "--exit-timeout-secs"))
    pre_stop = _container(deployment)["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > int(pre_stop[1]) + exit_timeout


def test_volumes_config_models_and_shared_memory():
    deployment = _triton()
    container = _container(deployment)
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}

    shm = volumes[mounts["/dev/shm"]["name"]]
    assert shm["emptyDir"]["medium"] == "Memory"

    config_path = _option(container["command"], "--config")
    mount = mounts[config_path]
    configmap = volumes[mount["name"]]["configMap"]["name"]
    assert mount["subPath"] in _named("ConfigMap", configmap)["data"]
    assert mount.get("readOnly") is True

    hf_home = dockerfile_env("HF_HOME")
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env.get("HF_HOME", hf_home) == hf_home
    assert any(hf_home.startswith(path.rstrip("/") + "/") for path in mounts), "HF_HOME is not on a volume"
    assert "hostPath" not in str(volumes)


def test_resources_gpu_and_host_memory():
    resources = _container(_triton())["resources"]
    assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"] >= 1
    # The pipeline (6B transformer + 4B text encoder, ~21 GB in bf16) passes through host memory.
    assert _quantity_bytes(resources["requests"]["memory"]) >= 24 * 2**30
    assert _quantity_bytes(resources["limits"]["memory"]) >= _quantity_bytes(resources["requests"]["memory"])


def test_security_context_has_no_privilege():
    pod = _triton()["spec"]["template"]["spec"]
    container = _container(_triton())
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert not any(pod.get(k) for k in ("hostNetwork", "hostPID", "hostIPC"))
    context = container["securityContext"]
    assert context.get("privileged") is False
    assert context.get("allowPrivilegeEscalation") is False
    assert context["capabilities"]["drop"] == ["ALL"]
    assert "add" not in context["capabilities"]


def test_selectors_reach_the_pods():
    deployment = _triton()
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert _matches(deployment["spec"]["selector"]["matchLabels"], pod_labels)
    for service in _servers_services():
        assert _matches(service["spec"]["selector"], pod_labels), service["metadata"]["name"]
    assert _matches(_one("PodDisruptionBudget")["spec"]["selector"]["matchLabels"], pod_labels)


def test_servicemonitor_scrapes_each_pod_once():
    monitor = _one("ServiceMonitor")
    selected = [s for s in _objects("Service")
                if _matches(monitor["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])]
    port_names = {e["port"] for e in monitor["spec"]["endpoints"]}
    scraped = [s for s in selected if port_names & {p["name"] for p in s["spec"]["ports"]}]
    assert [s["metadata"]["name"] for s in scraped] == ["zimage-triton"]
    assert port_names == {"metrics"}


def test_configmap_is_a_valid_config_for_real_weights():
    data = yaml.safe_load(_named("ConfigMap", "zimage-config")["data"]["config.yaml"])
    settings = parse_settings(data)
    assert settings.model.load_format == "auto"
    assert settings.model.source


def test_hpa_scales_the_deployment_on_the_adapters_metric():
    hpa = _one("HorizontalPodAutoscaler")
    deployment = _triton()
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == (
        deployment["apiVersion"], "Deployment", deployment["metadata"]["name"])
    # kubectl apply would reset the HPA's replica count to a value written here.
    assert "replicas" not in deployment["spec"]
    assert hpa["spec"]["minReplicas"] == 1 < hpa["spec"]["maxReplicas"]

    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    exposed = {rule["name"]["as"]: rule for rule in _adapter_rules()}
    assert metric["pods"]["metric"]["name"] in exposed
    assert float(metric["pods"]["target"]["averageValue"]) > 0

    scale_down = hpa["spec"]["behavior"]["scaleDown"]
    assert scale_down["stabilizationWindowSeconds"] >= 300
    assert all(p["type"] == "Pods" and p["value"] == 1 for p in scale_down["policies"])


def test_adapter_rule_reads_tritons_queue_gauge_per_pod():
    assert (MODEL_REPOSITORY / MODEL / "config.pbtxt").is_file()
    (rule,) = _adapter_rules()
    assert rule["seriesQuery"].startswith("nv_inference_pending_request_count{")
    assert f'model="{MODEL}"' in rule["seriesQuery"]
    assert re.fullmatch(rule["name"]["matches"], "nv_inference_pending_request_count")
    overrides = rule["resources"]["overrides"]
    assert overrides["pod"] == {"resource": "pod"} and overrides["namespace"] == {"resource": "namespace"}
    query = rule["metricsQuery"]
    for placeholder in ("<<.Series>>", "<<.LabelMatchers>>", "<<.GroupBy>>"):
        assert placeholder in query
    assert f'model="{MODEL}"' in query
    # A gauge: rate() of it would be meaningless.
    assert "rate(" not in query


# --- the gateway -----------------------------------------------------------------------------

GATEWAY_DOCKERFILE = ROOT / "docker" / "gateway.Dockerfile"


def _gateway() -> dict[str, Any]:
    return _named("Deployment", "zimage-gateway")


def _gateway_settings(command: list[str], tmp_path):
    """The gateway's own parser on the Deployment's command, the key file moved into tmp_path."""
    key_file = _option(command, "--api-key-file")
    local = tmp_path / "keys"
    local.write_text("a-key-for-the-manifest-test\n")
    argv = [str(local) if a == key_file else a for a in command[1:]]
    return gateway_settings.parse_args(argv), key_file


def test_gateway_command_is_the_image_entrypoint_with_servers_and_keys(tmp_path, monkeypatch):
    for name in list(os.environ):
        if name.startswith(gateway_settings.ENV_PREFIX):
            monkeypatch.delenv(name)
    container = _container(_gateway())
    command = container["command"]
    entrypoint = json.loads(re.search(r"ENTRYPOINT (\[.*?\])", GATEWAY_DOCKERFILE.read_text(), re.S).group(1))
    assert command[:len(entrypoint)] == entrypoint and command[0] == "zimage-gateway"
    settings, key_file = _gateway_settings(command, tmp_path)
    assert settings.host == "0.0.0.0" and not settings.allow_anonymous
    assert settings.api_keys == ("a-key-for-the-manifest-test",)
    # Its servers are the Triton Service's gRPC port.
    grpc = {p["name"]: p["port"] for p in _named("Service", "zimage-triton")["spec"]["ports"]}["grpc"]
    assert settings.servers == (f"grpc://zimage-triton:{grpc}",)
    # The keys are a read-only Secret volume, readable by the pod's group only.
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    mount = mounts[key_file.rsplit("/", 1)[0]]
    volumes = {v["name"]: v for v in _gateway()["spec"]["template"]["spec"]["volumes"]}
    secret = volumes[mount["name"]]["secret"]
    assert mount["readOnly"] is True and secret["defaultMode"] == 0o440
    assert _gateway()["spec"]["template"]["spec"]["securityContext"]["fsGroup"] == 10001
    assert "optional" not in secret  # no keys, no gateway: it does not start open


def test_gateway_ports_probes_and_service(tmp_path):
    deployment = _gateway()
    container = _container(deployment)
    exposed = {int(p) for p in re.search(r"^EXPOSE (.+)$", GATEWAY_DOCKERFILE.read_text(), re.M).group(1).split()}
    services = [_named("Service", "zimage-gateway")]
    assert port_problems(deployment, services, exposed) == []
    assert int(_option(container["command"], "--port")) == container["ports"][0]["containerPort"]
    assert container["readinessProbe"]["httpGet"] == {"path": "/health/ready", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/health/live", "port": "http"}
    assert _matches(services[0]["spec"]["selector"], deployment["spec"]["template"]["metadata"]["labels"])
    # Neither side's Services reach the other side's pods.
    assert not _matches(services[0]["spec"]["selector"], _triton()["spec"]["template"]["metadata"]["labels"])
    for service in _servers_services():
        assert not _matches(service["spec"]["selector"], deployment["spec"]["template"]["metadata"]["labels"])


def test_gateway_runs_unprivileged_on_a_read_only_root():
    pod = _gateway()["spec"]["template"]["spec"]
    context = _container(_gateway())["securityContext"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert context["readOnlyRootFilesystem"] is True and context["allowPrivilegeEscalation"] is False
    assert context["capabilities"]["drop"] == ["ALL"] and context.get("privileged") is False
    assert "nvidia.com/gpu" not in str(_container(_gateway())["resources"])


def test_gateway_image_can_be_overridden():
    name, _, tag = _container(_gateway())["image"].partition(":")
    assert (name, tag) == ("zimage-gateway", "latest")
    assert name in {entry["name"] for entry in _kustomization()["images"]}

