"""deploy/k8s: the kustomize trees validate against the Kubernetes schema, offline, and
agree with the daemons they start.

The trees are rendered here by a small subset of kustomize (`resources`, `images`, and
`patches` given by path, applied as strategic merges where lists of named items merge
by name); a kustomization using anything else fails the render. When kubectl is on
PATH, one test checks that `kubectl kustomize` renders the same objects. Validation
uses the JSON schemas bundled in the kubernetes-validate package, in strict mode (an
unknown field, such as a misspelled one, is an error); no socket is opened.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import re
import shutil
import socket
import subprocess
from collections.abc import Iterator
from importlib.metadata import entry_points
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

K8S_DIR = Path(__file__).resolve().parents[2] / "deploy" / "k8s"
TREES = {"base": K8S_DIR / "base", "large": K8S_DIR / "overlays" / "large"}
# The oldest release the manifests target (native gRPC probes are GA since 1.27) and
# the newest one the package ships schemas for.
SCHEMA_VERSIONS = ("1.30", kubernetes_validate.latest_version())
WORKLOAD_KINDS = {"Deployment", "StatefulSet"}
# The downward API's values in a pod, for expanding $(VAR) in args.
FAKE_POD_IP = "10.0.0.7"
# Room a worker needs beyond its KV cache: weights of a small model, torch, Python.
RUNTIME_GIB = 1.5


# -- rendering (a kustomize subset) ------------------------------------------------------

def load_documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def render(directory: Path) -> list[dict]:
    """The objects `kubectl kustomize directory` prints, for the features these trees use."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unsupported = kustomization.keys() - {"apiVersion", "kind", "resources", "patches", "images"}
    assert not unsupported, f"{directory}: the test renderer does not implement {sorted(unsupported)}"
    objects: list[dict] = []
    for entry in kustomization.get("resources", []):
        path = directory / entry
        objects += render(path) if path.is_dir() else load_documents(path)
    for patch in kustomization.get("patches", []):
        assert patch.keys() == {"path"}, f"{directory}: only strategic-merge patches by path: {patch}"
        for doc in load_documents(directory / patch["path"]):
            strategic_merge(find(objects, doc["kind"], doc["metadata"]["name"]), doc)
    for image in kustomization.get("images", []):
        for container in all_containers(objects):
            container["image"] = retag(container["image"], image)
    return objects


def find(objects: list[dict], kind: str, name: str) -> dict:
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"{len(found)} objects {kind}/{name}"
    return found[0]


def strategic_merge(target: dict, patch: dict) -> None:
    """Maps merge key by key; lists of named items (containers, env) merge by name; the rest replaces."""
    for key, value in patch.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            strategic_merge(target[key], value)
        elif _named_items(value) and _named_items(target.get(key)):
            by_name = {item["name"]: item for item in target[key]}
            for item in value:
                if item["name"] in by_name:
                    strategic_merge(by_name[item["name"]], item)
                else:
                    target[key].append(copy.deepcopy(item))
        else:
            target[key] = copy.deepcopy(value)


def _named_items(value: object) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(i, dict) and "name" in i for i in value)


def retag(image: str, entry: dict) -> str:
    """kustomize's `images` transformer on one image reference."""
    name, sep, ref = image.partition("@")
    if not sep:
        head, colon, tag = name.rpartition(":")
        name, ref, sep = (head, tag, ":") if colon and "/" not in tag else (name, "", "")
    if name != entry["name"]:
        return image
    name = entry.get("newName", name)
    if "digest" in entry:
        return f"{name}@{entry['digest']}"
    if "newTag" in entry:
        return f"{name}:{entry['newTag']}"
    return f"{name}{sep}{ref}"


def all_containers(objects: list[dict]) -> Iterator[dict]:
    for obj in objects:
        if obj["kind"] in WORKLOAD_KINDS:
            spec = obj["spec"]["template"]["spec"]
            yield from spec.get("initContainers", [])
            yield from spec["containers"]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {tree: render(path) for tree, path in TREES.items()}


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Validation must work offline: any connection attempt fails the test."""
    def refuse(self, address):
        raise AssertionError(f"network access to {address}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)


def workloads(objects: list[dict]) -> list[dict]:
    return [o for o in objects if o["kind"] in WORKLOAD_KINDS]


def only_container(workload: dict) -> dict:
    containers = workload["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1, workload["metadata"]["name"]
    return containers[0]


def daemon_args(workload: dict, objects: list[dict]) -> argparse.Namespace:
    """The container's args as the kubelet expands them, parsed by the daemon's own parser."""
    container = only_container(workload)
    env = container_env(container, workload, objects)

    def expand(match: re.Match) -> str:
        assert match[1] in env, f"{workload['metadata']['name']}: $({match[1]}) is not defined"
        return env[match[1]]

    args = [re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", expand, a) for a in container["args"]]
    (entry_point,) = entry_points(group="console_scripts", name=container["command"][0])
    parser = importlib.import_module(entry_point.module).build_parser()
    try:
        return parser.parse_args(args)
    except SystemExit:
        pytest.fail(f"{entry_point.name} rejects {args}")


def container_env(container: dict, workload: dict, objects: list[dict]) -> dict[str, str]:
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env.update(find(objects, "ConfigMap", source["configMapRef"]["name"])["data"])
    pod_name = workload["metadata"]["name"] + ("-0" if workload["kind"] == "StatefulSet" else "-7c9d8-x2k4q")
    fields = {"status.podIP": FAKE_POD_IP, "metadata.name": pod_name}
    for var in container.get("env", []):
        env[var["name"]] = var["value"] if "value" in var else fields[var["valueFrom"]["fieldRef"]["fieldPath"]]
    return env


def quantity(value: str | int) -> float:
    """A Kubernetes quantity ("500m", "2", "4Gi") as a number (GiB for the binary suffixes)."""
    value = str(value)
    if value.endswith("m"):
        return int(value[:-1]) / 1000
    units = {"Ki": 2**-20, "Mi": 2**-10, "Gi": 1, "Ti": 2**10}
    return float(value[:-2]) * units[value[-2:]] if value[-2:] in units else float(value)


def by_kind_and_name(objects) -> dict[tuple[str, str], dict]:
    return {(o["kind"], o["metadata"]["name"]): o for o in objects}


def port_named(container: dict, name: str) -> int:
    return next(p["containerPort"] for p in container["ports"] if p["name"] == name)


# -- the schema --------------------------------------------------------------------------

@pytest.mark.parametrize("version", SCHEMA_VERSIONS)
@pytest.mark.parametrize("tree", TREES)
def test_every_object_validates(rendered, tree, version):
    kinds = set()
    for obj in rendered[tree]:
        kubernetes_validate.validate(obj, version, strict=True)
        kinds.add(obj["kind"])
    assert kinds == {"ConfigMap", "Deployment", "Service", "StatefulSet", "PodDisruptionBudget",
                     "HorizontalPodAutoscaler"}


@pytest.mark.parametrize("breakage", ["replicas", "probe_port", "misspelled_field", "no_container_name"])
def test_validator_rejects_a_broken_manifest(rendered, breakage):
    deployment = copy.deepcopy(find(rendered["base"], "Deployment", "pdserve-prefill"))
    kubernetes_validate.validate(deployment, SCHEMA_VERSIONS[0], strict=True)  # valid before
    container = only_container(deployment)
    if breakage == "replicas":
        deployment["spec"]["replicas"] = "two"
    elif breakage == "probe_port":  # gRPC probes take a number, not a port name
        container["readinessProbe"]["grpc"]["port"] = "grpc"
    elif breakage == "misspelled_field":
        container["readinesProbe"] = container.pop("readinessProbe")
    else:
        del container["name"]
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, SCHEMA_VERSIONS[0], strict=True)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
@pytest.mark.parametrize("tree", TREES)
def test_renderer_matches_kubectl_kustomize(rendered, tree):
    out = subprocess.run(["kubectl", "kustomize", str(TREES[tree])], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    assert by_kind_and_name(yaml.safe_load_all(out)) == by_kind_and_name(rendered[tree])


# -- what the daemons need ---------------------------------------------------------------

@pytest.mark.parametrize("tree", TREES)
def test_workloads_have_grpc_probes_resources_and_image(rendered, tree):
    for workload in workloads(rendered[tree]):
        container = only_container(workload)
        grpc_port = port_named(container, "grpc")
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert container[probe]["grpc"] == {"port": grpc_port, "service": ""}, \
                (workload["metadata"]["name"], probe)
        for bound in ("requests", "limits"):
            assert {"cpu", "memory"} <= container["resources"][bound].keys()
        assert container["image"] == "pdserve:latest"
        assert container["imagePullPolicy"] == "IfNotPresent"


@pytest.mark.parametrize("tree", TREES)
def test_args_parse_and_match_the_ports(rendered, tree):
    objects = rendered[tree]
    for workload in workloads(objects):
        container = only_container(workload)
        args = daemon_args(workload, objects)
        host, port = args.listen.rsplit(":", 1)
        assert int(port) == port_named(container, "grpc")
        assert args.metrics_port == port_named(container, "metrics") and args.metrics_host == "0.0.0.0"
        if container["command"] == ["pdserve-router"]:
            assert host == "0.0.0.0" and args.http_port == port_named(container, "http")
            assert args.http_host == "0.0.0.0"
        else:
            # The worker registers its --listen address: it must be one the router can dial.
            assert host == FAKE_POD_IP
            assert args.router == "pdserve-router:50051"
            assert args.model and args.dtype


@pytest.mark.parametrize("tree", TREES)
def test_workers_are_sized_consistently(rendered, tree):
    objects = rendered[tree]
    for workload in workloads(objects):
        container, spec = only_container(workload), workload["spec"]["template"]["spec"]
        args = daemon_args(workload, objects)
        assert spec["terminationGracePeriodSeconds"] >= args.grace_s + 10  # the drain ends before SIGKILL
        if container["command"] == ["pdserve-router"]:
            continue
        limits, requests = container["resources"]["limits"], container["resources"]["requests"]
        assert limits == requests  # Guaranteed QoS
        assert args.threads == quantity(limits["cpu"])
        assert args.kv_cache_gib + RUNTIME_GIB <= quantity(limits["memory"])


def test_decode_identity_is_the_pod_name(rendered):
    objects = rendered["base"]
    decode = find(objects, "StatefulSet", "pdserve-decode")
    assert daemon_args(decode, objects).worker_id == "pdserve-decode-0"
    assert find(objects, "Service", decode["spec"]["serviceName"])["spec"]["clusterIP"] == "None"


def test_router_is_one_replica_replaced_whole(rendered):
    router = find(rendered["base"], "Deployment", "pdserve-router")
    assert router["spec"]["replicas"] == 1 and router["spec"]["strategy"] == {"type": "Recreate"}


@pytest.mark.parametrize("tree", TREES)
def test_selectors_and_references_resolve(rendered, tree):
    objects = rendered[tree]
    pods = {w["metadata"]["name"]: (w["spec"]["template"]["metadata"]["labels"], only_container(w))
            for w in workloads(objects)}

    def selected(selector: dict) -> list[str]:
        return [name for name, (labels, _) in pods.items() if selector.items() <= labels.items()]

    for obj in objects:
        if obj["kind"] == "Service":
            (name,) = selected(obj["spec"]["selector"])
            port_names = {p["name"] for p in pods[name][1]["ports"]}
            assert {p["targetPort"] for p in obj["spec"]["ports"]} <= port_names
        elif obj["kind"] == "PodDisruptionBudget":
            assert selected(obj["spec"]["selector"]["matchLabels"]) == [obj["metadata"]["name"]]
        elif obj["kind"] == "HorizontalPodAutoscaler":
            ref = obj["spec"]["scaleTargetRef"]
            find(objects, ref["kind"], ref["name"])
    # Workers reach the router by its Service name.
    find(objects, "Service", "pdserve-router")


def test_prefill_autoscaler_uses_an_exported_metric(rendered):
    from pdserve.observability import metrics

    hpa = find(rendered["base"], "HorizontalPodAutoscaler", "pdserve-prefill")
    for metric in hpa["spec"]["metrics"]:
        assert metric["pods"]["metric"]["name"] in metrics.__doc__
    # The HPA owns the replica count: a `replicas` here would be reset by every apply.
    assert "replicas" not in find(rendered["base"], "Deployment", "pdserve-prefill")["spec"]


def test_large_overlay_scales_up(rendered):
    base, large = rendered["base"], rendered["large"]
    assert find(large, "StatefulSet", "pdserve-decode")["spec"]["replicas"] == 4
    hpa = find(large, "HorizontalPodAutoscaler", "pdserve-prefill")["spec"]
    assert (hpa["minReplicas"], hpa["maxReplicas"]) == (4, 16)
    for kind, name in [("Deployment", "pdserve-prefill"), ("StatefulSet", "pdserve-decode"),
                       ("Deployment", "pdserve-router")]:
        small = only_container(find(base, kind, name))["resources"]
        big = only_container(find(large, kind, name))["resources"]
        for bound in ("requests", "limits"):
            for resource in ("cpu", "memory"):
                assert quantity(big[bound][resource]) > quantity(small[bound][resource]), (name, bound, resource)
