"""The Kubernetes manifests (ops/k8s/), checked against the pools file, the wire contract and the CLI.

The base is read as kustomize would (its `resources`, and the pools ConfigMap from its
configMapGenerator) with PyYAML, so the checks need no cluster and no kubectl:

- the ConfigMap's pools file is ops/pools/reference-gpu.toml, byte for byte;
- each pool of it has exactly one Deployment and one ScaledObject, nothing else does;
- every KEDA trigger reads `Keys.pool_jobs(p)` with consumer group `Keys.pool_group(p)`
  for the pool p its target Deployment runs, lag-based (Redis 7), authenticated by a
  TriggerAuthentication that takes the password from a Secret;
- GPU Deployments select GPU nodes (one product label per gpu_type), tolerate the GPU
  taint and limit nvidia.com/gpu to what the model needs (tensor_parallel_size);
- every container running `voxbus` names a real subcommand whose arguments parse, and
  its --pools file is the mounted ConfigMap;
- the cluster overlay switches every trigger to `redis-cluster-streams` with the
  cluster's addresses and changes nothing else of the triggers.

When kubectl is installed, `kubectl kustomize` must build the base and the overlay, and
the same checks run on what it renders.
"""

from __future__ import annotations

import copy
import shutil
import subprocess
import tomllib
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

import pytest
import yaml

from shared.config import Config, PoolConfig, load_config, parse_config
from shared.protocol import Keys
from tests.support.deploy import gpus_needed, needs_gpu, parse_voxbus

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "ops" / "k8s"
BASE = K8S / "base"
CLUSTER = K8S / "overlays" / "cluster"
REFERENCE_POOLS = REPO / "ops" / "pools" / "reference-gpu.toml"
GPU = "nvidia.com/gpu"


# ---------------------------------------------------------------- helpers


def load_docs(path: Path) -> list[dict]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    for doc in docs:
        assert isinstance(doc, dict) and doc.get("apiVersion") and doc.get("kind"), f"{path}: not a manifest: {doc!r}"
        assert (doc.get("metadata") or {}).get("name"), f"{path}: {doc['kind']} without metadata.name"
    return docs


@dataclass
class Manifests:
    docs: list[dict]
    configmaps: dict[str, dict[str, str]] = field(default_factory=dict)  # name -> data

    def of_kind(self, kind: str) -> list[dict]:
        return [d for d in self.docs if d["kind"] == kind]

    def named(self, kind: str, name: str) -> dict:
        found = [d for d in self.of_kind(kind) if d["metadata"]["name"] == name]
        assert len(found) == 1, f"{len(found)} {kind} named {name!r}"
        return found[0]


def read_base() -> Manifests:
    """The base as kustomize assembles it: its resources + the generated pools ConfigMap."""
    kustomization = yaml.safe_load((BASE / "kustomization.yaml").read_text())
    docs = [doc for resource in kustomization["resources"] for doc in load_docs(BASE / resource)]
    configmaps = {}
    for generator in kustomization.get("configMapGenerator", []):
        data = {}
        for entry in generator.get("files", []):
            key, _, file = entry.partition("=") if "=" in entry else (Path(entry).name, "", entry)
            data[key] = (BASE / file).read_text()
        configmaps[generator["name"]] = data
    for doc in docs:
        if doc["kind"] == "ConfigMap":
            configmaps[doc["metadata"]["name"]] = doc.get("data", {})
    return Manifests(docs, configmaps)


def from_rendered(text: str) -> Manifests:
    docs = [d for d in yaml.safe_load_all(text) if d is not None]
    return Manifests(docs, {d["metadata"]["name"]: d.get("data", {}) for d in docs if d["kind"] == "ConfigMap"})


def pod_spec(deployment: dict) -> dict:
    return deployment["spec"]["template"]["spec"]


def voxbus_containers(deployment: dict) -> list[dict]:
    return [c for c in pod_spec(deployment)["containers"] if (c.get("command") or [None])[0] == "voxbus"]


def mounted_pools(m: Manifests, deployment: dict, container: dict, path: str) -> Config:
    """The pools Config a container reads at `path`, through its ConfigMap volume mount."""
    target = PurePosixPath(path)
    volumes = {v["name"]: v for v in pod_spec(deployment).get("volumes", [])}
    for mount in container.get("volumeMounts", []):
        base = PurePosixPath(mount["mountPath"])
        if target.parent == base:
            configmap = volumes[mount["name"]].get("configMap")
            assert configmap, f"{path} is mounted from {volumes[mount['name']]}, expected the pools ConfigMap"
            data = m.configmaps.get(configmap["name"])
            assert data is not None, f"ConfigMap {configmap['name']!r} is not in the manifests"
            assert target.name in data, f"ConfigMap {configmap['name']!r} has no key {target.name!r}"
            return _config_of(data[target.name])
    raise AssertionError(f"{deployment['metadata']['name']}: nothing is mounted at {target.parent}")


@cache
def _config_of(text: str) -> Config:
    return parse_config(tomllib.loads(text), "<configmap>")


def pool_deployments(m: Manifests) -> dict[str, tuple[dict, PoolConfig]]:
    """Deployment name -> (deployment, the pool its `voxbus worker` runs)."""
    out = {}
    for deployment in m.of_kind("Deployment"):
        for container in voxbus_containers(deployment):
            args = parse_voxbus(container["command"] + container.get("args", []))
            if args.command == "worker":
                pool = mounted_pools(m, deployment, container, args.pools).pool(args.pool)
                out[deployment["metadata"]["name"]] = (deployment, pool)
    return out


# ---------------------------------------------------------------- checks (raw base and rendered)


def check_commands(m: Manifests) -> None:
    assert m.of_kind("Deployment"), "no Deployment"
    count = 0
    for deployment in m.of_kind("Deployment"):
        for container in pod_spec(deployment)["containers"]:
            argv = container.get("command", []) + container.get("args", [])
            image = container["image"]
            if image.split(":")[0].startswith("voxbus/"):
                assert argv[:1] == ["voxbus"], f"{deployment['metadata']['name']}: {image} must run `voxbus ...`: {argv}"
            if argv[:1] != ["voxbus"]:
                continue
            count += 1
            args = parse_voxbus(argv)
            if hasattr(args, "pools"):
                assert args.pools, f"{deployment['metadata']['name']}: no --pools"
                mounted_pools(m, deployment, container, args.pools)
    assert count, "no container runs voxbus"


def check_pools_have_one_deployment_and_scaledobject(m: Manifests, reference: Config) -> None:
    by_pool: dict[str, list[str]] = {}
    for name, (_, pool) in pool_deployments(m).items():
        by_pool.setdefault(pool.name, []).append(name)
    assert set(by_pool) == set(reference.pools), f"pools with a Deployment: {sorted(by_pool)} != {sorted(reference.pools)}"
    for pool, names in by_pool.items():
        assert len(names) == 1, f"pool {pool} has {len(names)} Deployments: {names}"
    targets = [so["spec"]["scaleTargetRef"]["name"] for so in m.of_kind("ScaledObject")]
    for pool, (name,) in by_pool.items():
        assert targets.count(name) == 1, f"pool {pool}: {targets.count(name)} ScaledObjects target {name}"
    assert len(targets) == len(by_pool), f"ScaledObjects {targets} vs pool Deployments {sorted(by_pool.values())}"


def check_triggers(m: Manifests, trigger_type: str, address_param: str) -> None:
    deployments = pool_deployments(m)
    auths = {a["metadata"]["name"]: a for a in m.of_kind("TriggerAuthentication")}
    for so in m.of_kind("ScaledObject"):
        name = so["metadata"]["name"]
        target = so["spec"]["scaleTargetRef"]
        assert target.get("kind", "Deployment") == "Deployment" and target["name"] in deployments, (
            f"ScaledObject {name} targets {target}, not a pool Deployment")
        deployment, pool = deployments[target["name"]]
        assert "replicas" not in deployment["spec"], (
            f"{target['name']}: spec.replicas would fight KEDA on every apply")
        triggers = so["spec"]["triggers"]
        assert triggers, f"ScaledObject {name}: no trigger"
        for trigger in triggers:
            meta = trigger["metadata"]
            assert trigger["type"] == trigger_type, f"{name}: trigger type {trigger['type']!r}, expected {trigger_type!r}"
            assert meta["stream"] == Keys.pool_jobs(pool.name), f"{name}: stream {meta['stream']!r}"
            assert meta["consumerGroup"] == Keys.pool_group(pool.name), f"{name}: consumerGroup {meta['consumerGroup']!r}"
            assert not {"address", "addresses", "host", "password"} & set(meta), (
                f"{name}: connection details belong in the TriggerAuthentication")
            auth = auths.get((trigger.get("authenticationRef") or {}).get("name"))
            assert auth is not None, f"{name}: authenticationRef names no TriggerAuthentication"
            params = {ref["parameter"]: ref for ref in auth["spec"].get("secretTargetRef", [])}
            assert {"password", address_param} <= set(params), (
                f"TriggerAuthentication {auth['metadata']['name']}: parameters {sorted(params)}")
            assert params["password"]["name"] and params["password"]["key"]
        lag = [t for t in triggers if "lagCount" in t["metadata"]]
        assert len(lag) == 1, f"{name}: expected one consumer-group lag trigger (Redis 7), found {len(lag)}"
        assert "activationLagCount" in lag[0]["metadata"], f"{name}: lag trigger without activationLagCount"
        for key in ("lagCount", "activationLagCount", "pendingEntriesCount"):
            for trigger in triggers:
                if key in trigger["metadata"]:
                    value = trigger["metadata"][key]
                    assert isinstance(value, str) and value.isdigit(), f"{name}: {key} must be a quoted integer"
        assert so["spec"].get("minReplicaCount", 0) <= so["spec"]["maxReplicaCount"]


def check_gpu_deployments(m: Manifests) -> None:
    product_of: dict[str, str] = {}
    for name, (deployment, pool) in pool_deployments(m).items():
        spec = pod_spec(deployment)
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert labels.get("voxbus.io/pool") == pool.name, f"{name}: pod label voxbus.io/pool"
        assert labels.get("voxbus.io/gpu-type") == pool.gpu_type, f"{name}: pod label voxbus.io/gpu-type"
        limits = [c.get("resources", {}).get("limits", {}) for c in spec["containers"]]
        gpus = sum(int(limit.get(GPU, 0)) for limit in limits)
        assert gpus == gpus_needed(pool), f"{name}: limits {GPU}={gpus}, the pool's model needs {gpus_needed(pool)}"
        if not needs_gpu(pool):
            assert not spec.get("nodeSelector"), f"{name} runs no model on a GPU but is pinned to GPU nodes"
            continue
        selector = spec.get("nodeSelector") or {}
        assert selector, f"{name}: GPU pool without nodeSelector"
        product = selector.get(f"{GPU}.product")
        assert product, f"{name}: nodeSelector {selector} does not select a GPU product"
        assert product_of.setdefault(pool.gpu_type, product) == product, (
            f"gpu_type {pool.gpu_type}: nodeSelector {product} here, {product_of[pool.gpu_type]} elsewhere")
        assert any(t.get("key") == GPU for t in spec.get("tolerations", [])), f"{name}: no toleration for {GPU}"
    assert len(set(product_of.values())) == len(product_of), f"two gpu_types share one node product: {product_of}"
    assert product_of, "no GPU Deployment"


def check_openai_servers(m: Manifests) -> None:
    services = {s["metadata"]["name"]: s for s in m.of_kind("Service")}
    for name, (_, pool) in pool_deployments(m).items():
        if pool.engine != "openai":
            continue
        url = urlsplit(pool.options["base_url"])
        service = services.get(url.hostname)
        assert service is not None, f"{name}: base_url host {url.hostname!r} is not a Service"
        assert url.port in [p["port"] for p in service["spec"]["ports"]], f"Service {url.hostname} lacks port {url.port}"
        backends = [d for d in m.of_kind("Deployment")
                    if service["spec"]["selector"].items() <= d["spec"]["template"]["metadata"]["labels"].items()]
        assert len(backends) == 1, f"Service {url.hostname} selects {len(backends)} Deployments"
        argv = [a for c in pod_spec(backends[0])["containers"] for a in c.get("command", []) + c.get("args", [])]
        served = [a.split("=", 1)[1] for a in argv if a.startswith("--served-model-name=")]
        assert served == [pool.options["model"]], f"{url.hostname} serves {served}, {pool.name} asks {pool.options['model']!r}"
        assert {"--enable-chunked-prefill", "--enable-prefix-caching"} <= set(argv), argv


def check_all(m: Manifests, reference: Config, trigger_type: str, address_param: str) -> None:
    check_commands(m)
    check_pools_have_one_deployment_and_scaledobject(m, reference)
    check_triggers(m, trigger_type, address_param)
    check_gpu_deployments(m)
    check_openai_servers(m)


# ---------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def reference() -> Config:
    return load_config(REFERENCE_POOLS)


@pytest.fixture(scope="module")
def base() -> Manifests:
    return read_base()


def test_every_manifest_parses_and_every_base_file_is_used():
    files = sorted(K8S.rglob("*.yaml"))
    assert files
    for path in files:
        load_docs(path) if path.name != "kustomization.yaml" else yaml.safe_load(path.read_text())
    kustomization = yaml.safe_load((BASE / "kustomization.yaml").read_text())
    used = {BASE / r for r in kustomization["resources"]} | {BASE / "kustomization.yaml"}
    orphans = [str(p.relative_to(K8S)) for p in BASE.rglob("*.yaml") if p not in used]
    assert not orphans, f"base files that kustomization.yaml does not list: {orphans}"


def test_pools_configmap_is_the_reference_pools_file(base):
    data = base.configmaps.get("voxbus-pools")
    assert data is not None, "no voxbus-pools ConfigMap"
    assert data.get("pools.toml") == REFERENCE_POOLS.read_text(), (
        "ops/k8s/base/reference-gpu.toml differs from ops/pools/reference-gpu.toml: copy it again")


def test_container_commands_are_real_voxbus_subcommands(base):
    check_commands(base)


def test_each_pool_has_one_deployment_and_one_scaledobject(base, reference):
    check_pools_have_one_deployment_and_scaledobject(base, reference)


def test_keda_triggers_read_the_pools_consumer_group(base):
    check_triggers(base, "redis-streams", "address")


def test_gpu_deployments_select_gpu_nodes_and_limit_gpus(base):
    check_gpu_deployments(base)


def test_openai_pool_reaches_a_vllm_server(base):
    check_openai_servers(base)


# --- the cluster overlay, applied here as kustomize would (JSON6902 + strategic merge)


def _apply_json6902(doc: dict, ops: list[dict]) -> None:
    for op in ops:
        assert op["op"] == "replace", f"unexpected patch op {op}"
        *parents, leaf = [p for p in op["path"].split("/") if p]
        node = doc
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        key = int(leaf) if isinstance(node, list) else leaf
        exists = key < len(node) if isinstance(node, list) else key in node
        assert exists, f"replace of a missing path {op['path']} (kustomize refuses it)"
        node[key] = op["value"]


def _merge(doc: dict, patch: dict) -> None:
    for key, value in patch.items():  # custom resources: lists are replaced whole
        if isinstance(value, dict) and isinstance(doc.get(key), dict):
            _merge(doc[key], value)
        else:
            doc[key] = value


def read_cluster_overlay(base: Manifests) -> Manifests:
    kustomization = yaml.safe_load((CLUSTER / "kustomization.yaml").read_text())
    assert kustomization["resources"] == ["../../base"]
    m = Manifests(copy.deepcopy(base.docs), base.configmaps)
    for patch in kustomization["patches"]:
        if "path" in patch:
            (body,) = load_docs(CLUSTER / patch["path"])
            _merge(m.named(body["kind"], body["metadata"]["name"]), body)
        else:
            target = patch["target"]
            ops = yaml.safe_load(patch["patch"])
            matched = [d for d in m.of_kind(target["kind"]) if d["apiVersion"].startswith(target.get("group", ""))]
            assert matched, f"patch target {target} matches nothing"
            for doc in matched:
                _apply_json6902(doc, ops)
    return m


def test_cluster_overlay_switches_every_trigger_to_redis_cluster(base, reference):
    cluster = read_cluster_overlay(base)
    check_all(cluster, reference, "redis-cluster-streams", "addresses")
    before = [[{k: v for k, v in t.items() if k != "type"} for t in so["spec"]["triggers"]] for so in base.of_kind("ScaledObject")]
    after = [[{k: v for k, v in t.items() if k != "type"} for t in so["spec"]["triggers"]] for so in cluster.of_kind("ScaledObject")]
    assert before == after, "the overlay must change only the trigger type"


# --- kubectl kustomize, when kubectl is there

KUBECTL = shutil.which("kubectl")


@pytest.mark.skipif(KUBECTL is None, reason="kubectl is not installed")
@pytest.mark.parametrize("directory, trigger_type, address_param", [
    (BASE, "redis-streams", "address"),
    (CLUSTER, "redis-cluster-streams", "addresses"),
], ids=["base", "cluster"])
def test_kubectl_kustomize_builds(directory, trigger_type, address_param, reference):
    proc = subprocess.run([KUBECTL, "kustomize", str(directory)], check=False, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"kubectl kustomize {directory.relative_to(REPO)}:\n{proc.stderr}"
    rendered = from_rendered(proc.stdout)
    check_all(rendered, reference, trigger_type, address_param)
    namespaces = {d["metadata"].get("namespace") for d in rendered.docs if d["kind"] != "Namespace"}
    assert namespaces == {"voxbus"}, f"namespaces {namespaces}"
