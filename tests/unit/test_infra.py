"""Every file under infra/ is checked against the schema of what reads it, and against the repository.

Kubernetes' own resources with kubernetes-validate (strict: unknown fields are errors), KubeRay's RayCluster
and RayJob against the CRD schemas published in the KubeRay repository (tests/schemas, made strict the way the
API server's strict field validation is), the compose file against the compose specification's JSON schema,
Qdrant's chart values against the chart's own values. Then what they name: commands and their options exist
in the CLI, job files load, mounted and copied paths exist, service names and images agree, no secret is
written inline, and the GPU worker pod fits exactly the actor reembed asks Ray for.
"""

from __future__ import annotations

import gzip
import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any, Iterator

import jsonschema
import kubernetes_validate
import pytest
import yaml

from conftest import ROOT

INFRA = ROOT / "infra"
SCHEMAS = ROOT / "tests" / "schemas"
K8S = INFRA / "kubernetes"
COMPOSE = INFRA / "compose"
KUBERNETES_VERSION = "1.33.0"
SECRETISH = re.compile(r"(KEY|SECRET|TOKEN|PASSWORD)", re.I)

# Each file under infra/ and the test that validates it; a new file without an entry fails the first test.
VALIDATED_BY = {
    "install.sh": "README's set-up commands (CI runs them)",
    "prometheus/prometheus.yml": "tests/unit/test_alert_rules.py, tests/e2e/test_metrics.py",
    "prometheus/alerts.yml": "tests/unit/test_alert_rules.py",
    "prometheus/alerts.test.yml": "tests/unit/test_alert_rules.py",
    "grafana/reembed.json": "tests/e2e/test_metrics.py",
    "docker/Dockerfile": "test_dockerfile_copies_what_exists_and_pins_torch",
    "kubernetes/job-configmap.yaml": "test_kubernetes_core_resources_are_valid, test_job_files_load",
    "kubernetes/prefect-worker.yaml": "test_kubernetes_core_resources_are_valid, test_commands_exist",
    "kubernetes/raycluster.yaml": "test_kuberay_resources_match_the_crd_schemas, test_gpu_worker_fits_one_actor",
    "kubernetes/rayjob.yaml": "test_kuberay_resources_match_the_crd_schemas, test_commands_exist",
    "kubernetes/qdrant-values.yaml": "test_qdrant_values_are_keys_of_the_chart",
    "compose/docker-compose.yml": "test_compose_file_matches_the_compose_spec",
    "compose/job.yaml": "test_job_files_load",
    "compose/prometheus.yml": "test_compose_prometheus_config_is_valid",
    "prefect/prefect.yaml": "test_prefect_yaml_names_the_job_flow, tests/e2e/test_schedule.py",
}


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _k8s_docs() -> Iterator[tuple[Path, dict[str, Any]]]:
    for path in sorted(K8S.glob("*.yaml")):
        if path.name != "qdrant-values.yaml":  # Helm values, not a resource
            for doc in _docs(path):
                yield path, doc


def _walk(node: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    yield path, node
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _walk(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _walk(value, f"{path}[{i}]")


def _strict(schema: Any) -> Any:
    """Unknown fields become errors: what `kubectl apply --validate=strict` does with a structural schema
    (objects with `properties` and neither `additionalProperties` nor x-kubernetes-preserve-unknown-fields)."""
    if isinstance(schema, dict):
        schema = {k: _strict(v) for k, v in schema.items()}
        if ("properties" in schema and "additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


def _crd(kind: str) -> dict[str, Any]:
    with gzip.open(SCHEMAS / f"kuberay-{kind}-v1.json.gz") as f:
        return json.load(f)


def _containers(doc: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for path, node in _walk(doc):
        if path.endswith(".containers") and isinstance(node, list):
            yield from node


def _configmap_job() -> str:
    (doc,) = [d for _, d in _k8s_docs() if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "reembed-job"]
    return doc["data"]["job.yaml"]


def test_every_infra_file_is_validated() -> None:
    files = {str(p.relative_to(INFRA)) for p in INFRA.rglob("*") if p.is_file() and "__pycache__" not in p.parts}
    assert files == set(VALIDATED_BY), f"unvalidated: {sorted(files - set(VALIDATED_BY))}, " \
                                        f"gone: {sorted(set(VALIDATED_BY) - files)}"


def test_kubernetes_core_resources_are_valid() -> None:
    kinds = []
    for path, doc in _k8s_docs():
        if doc["apiVersion"].startswith("ray.io/"):
            continue
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{path.name}: {doc['kind']} {doc['metadata'].get('name')}: "
                        f"{'.'.join(map(str, exc.path))}: {exc.message}")
        kinds.append(doc["kind"])
    assert sorted(kinds) == ["ConfigMap", "Deployment", "Job"]
    # The checker does reject what Kubernetes would: an unknown field in a container.
    (deployment,) = [d for _, d in _k8s_docs() if d["kind"] == "Deployment"]
    broken = json.loads(json.dumps(deployment))
    broken["spec"]["template"]["spec"]["containers"][0]["comand"] = ["reembed"]
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def test_kuberay_resources_match_the_crd_schemas() -> None:
    seen = []
    for path, doc in _k8s_docs():
        if not doc["apiVersion"].startswith("ray.io/"):
            continue
        plural = {"RayCluster": "rayclusters", "RayJob": "rayjobs"}[doc["kind"]]
        crd = _crd(plural)
        assert doc["apiVersion"] == f"{crd['group']}/{crd['version']}" and doc["kind"] == crd["kind"]
        schema = _strict(crd["schema"])
        errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(doc), key=lambda e: list(e.path))
        assert not errors, f"{path.name}: " + "; ".join(
            f"{'.'.join(map(str, e.path))}: {e.message}" for e in errors[:5])
        seen.append(doc["kind"])
        # Strictness is real: a misspelt field is refused by the same schema.
        broken = json.loads(json.dumps(doc))
        broken["spec"]["entrypont" if doc["kind"] == "RayJob" else "headGroupSpc"] = "x"
        assert list(jsonschema.Draft7Validator(schema).iter_errors(broken))
    assert sorted(seen) == ["RayCluster", "RayJob"]


def test_gpu_worker_fits_one_actor(tmp_path) -> None:
    """The GPU pod advertises what its container's limits say, and the actor reembed starts there (ray_pool's
    own arithmetic, with the job's runtime settings) takes one GPU and all CPUs but one."""
    from reembed.flows.config import load_job
    from reembed.flows.ray_pool import gpu_actor_cpus

    (cluster,) = [d for _, d in _k8s_docs() if d["kind"] == "RayCluster"]
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert f'ray[default]=={cluster["spec"]["rayVersion"]}"' in pyproject
    head = cluster["spec"]["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"  # no actor on the head: its CPUs stay the drivers'
    (group,) = cluster["spec"]["workerGroupSpecs"]
    (container,) = group["template"]["spec"]["containers"]
    limits = container["resources"]["limits"]
    cpus = float(group["rayStartParams"].get("num-cpus", limits["cpu"]))
    gpus = float(group["rayStartParams"].get("num-gpus", limits["nvidia.com/gpu"]))
    assert container["resources"]["requests"]["nvidia.com/gpu"] == limits["nvidia.com/gpu"]
    job_file = tmp_path / "job.yaml"
    job_file.write_text(_configmap_job())
    runtime = load_job(job_file).runtime
    node = {"Alive": True, "Resources": {"CPU": cpus, "GPU": gpus}}
    actor_cpus = runtime.cpus_per_gpu_actor or gpu_actor_cpus([node], runtime.gpus_per_actor)
    actors_per_pod = min(gpus // runtime.gpus_per_actor, cpus // actor_cpus)
    assert actors_per_pod == gpus // runtime.gpus_per_actor == 1
    assert cpus - actor_cpus * actors_per_pod == 1  # one CPU left for Ray and the shard threads


def test_commands_exist() -> None:
    """Every `reembed` command line in the manifests and the compose file names a real subcommand and real
    options; the RayJob targets the RayCluster, the worker joins its head service, the mounts are the job's."""
    from reembed.flows.cli import cli

    lines: list[str] = []
    for path, doc in _k8s_docs():
        if doc["kind"] == "RayJob":
            lines.append(doc["spec"]["entrypoint"])
            assert doc["spec"]["clusterSelector"]["ray.io/cluster"] == "reembed"
        for container in _containers(doc):
            words = [*container.get("command", []), *container.get("args", [])]
            if words[:2] == ["bash", "-c"]:
                lines.extend(part.strip() for part in re.split(r"&&", " ".join(words[2:])))
            elif words:
                lines.append(shlex.join(words))
            for mount in container.get("volumeMounts", []):
                if mount["name"] == "job":
                    assert mount["mountPath"] == "/etc/reembed"
    compose = yaml.safe_load((COMPOSE / "docker-compose.yml").read_text())
    for service in compose["services"].values():
        if service["image"] == compose["x-reembed"]["image"]:  # the others run their images' own programs
            lines.append(shlex.join(service["command"]))
    (cluster,) = [d for _, d in _k8s_docs() if d["kind"] == "RayCluster"]
    reembed_lines = 0
    for line in lines:
        words = shlex.split(line.removeprefix("exec "))
        if words[0] == "ray":
            assert words[1] == "start" and f"--address={cluster['metadata']['name']}-head-svc:6379" in words
            continue
        assert words[0] == "reembed", line
        reembed_lines += 1
        if words[1:] == ["--help"]:
            continue
        command = cli.commands.get(words[1])
        assert command is not None, f"{line}: no subcommand {words[1]!r}"
        options = {opt for param in command.params for opt in getattr(param, "opts", [])}
        for word in words[2:]:
            if word.startswith("--"):
                assert word.split("=")[0] in options, f"{line}: {word} is not an option of reembed {words[1]}"
        for word in words[2:]:
            if word.endswith("job.yaml"):
                assert word in ("/etc/reembed/job.yaml", "/jobs/job.yaml"), line
    assert reembed_lines >= 5


def test_job_files_load(tmp_path) -> None:
    """The ConfigMap's and the compose stack's job files are valid reembed jobs with no secret in them, and
    the compose job's corpus is the sample mounted from the repository."""
    from reembed.flows.config import load_job

    configmap = tmp_path / "job.yaml"
    configmap.write_text(_configmap_job())
    for path in (configmap, COMPOSE / "job.yaml"):
        raw = yaml.safe_load(path.read_text())
        for key_path, _ in _walk(raw):
            assert not re.search(r"(api_key|secret|token|password|\.key)$", key_path), f"{path}: {key_path}"
        job = load_job(path)
        assert job.index.url and job.output.uri.startswith("s3://")
    k8s_job = load_job(configmap)
    assert k8s_job.runtime.ray_address == "auto" and k8s_job.runtime.ship_code is False
    compose = yaml.safe_load((COMPOSE / "docker-compose.yml").read_text())
    mounts = dict(v.split(":")[1::-1] for v in compose["x-reembed"]["volumes"])
    compose_job = load_job(COMPOSE / "job.yaml")
    corpus = Path(compose_job.corpus.uri)
    host = next(COMPOSE / src / corpus.relative_to(dst) for dst, src in mounts.items() if corpus.is_relative_to(dst))
    assert host.resolve() == (ROOT / "examples" / "sample" / "corpus.jsonl").resolve()
    assert compose_job.index.url == "http://qdrant:6333"
    assert compose_job.output.storage_options.endpoint_url == "http://s3:8333"
    assert compose_job.metrics.pushgateway == "http://pushgateway:9091"


def test_no_secret_is_written_inline() -> None:
    """Secret-looking variables come from Kubernetes Secrets or from the environment (`${VAR:?}`)."""
    checked = 0
    for path, doc in _k8s_docs():
        for container in _containers(doc):
            for env in container.get("env", []):
                if SECRETISH.search(env["name"]):
                    assert "value" not in env and "secretKeyRef" in env["valueFrom"], f"{path.name}: {env['name']}"
                    checked += 1
    compose = yaml.safe_load((COMPOSE / "docker-compose.yml").read_text())
    for name, service in [("x-reembed", compose["x-reembed"]), *compose["services"].items()]:
        for key, value in (service.get("environment") or {}).items():
            if SECRETISH.search(key):
                assert re.fullmatch(r"\$\{[A-Z_]+:\?[^}]+\}", str(value)), f"compose {name}: {key}={value}"
                checked += 1
    values = yaml.safe_load((K8S / "qdrant-values.yaml").read_text())
    assert set(values["apiKey"]["valueFrom"]["secretKeyRef"]) == {"name", "key"}
    assert checked >= 10


def test_compose_file_matches_the_compose_spec() -> None:
    schema = json.loads((SCHEMAS / "compose-spec.json").read_text())
    compose = yaml.safe_load((COMPOSE / "docker-compose.yml").read_text())
    errors = list(jsonschema.Draft7Validator(schema).iter_errors(compose))
    assert not errors, "; ".join(f"{'.'.join(map(str, e.path))}: {e.message}" for e in errors[:5])
    broken = {**compose, "services": {**compose["services"], "qdrant": {**compose["services"]["qdrant"], "imge": "x"}}}
    assert list(jsonschema.Draft7Validator(schema).iter_errors(broken))
    assert set(compose["services"]) == {"qdrant", "s3", "prefect-server", "prefect-worker", "reembed",
                                        "pushgateway", "prometheus"}
    build = compose["x-reembed"]["build"]
    assert (COMPOSE / build["context"] / build["dockerfile"]).resolve() == (INFRA / "docker" / "Dockerfile")
    for name, service in compose["services"].items():
        assert ":" in service["image"] and not service["image"].endswith(":latest"), f"{name}: pin the image"
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (COMPOSE / source).exists(), f"{name}: mounts {source}, which is not in the repository"
            else:
                assert source in compose["volumes"], f"{name}: named volume {source} is not declared"
    for dependency in compose["x-reembed"]["depends_on"]:
        assert dependency in compose["services"]


def test_compose_prometheus_config_is_valid(tmp_path) -> None:
    """promtool accepts the stack's Prometheus config with the repository's alert rules beside it, as mounted."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool is not installed: `bash infra/install.sh --test` installs Debian's prometheus")
    shutil.copy(COMPOSE / "prometheus.yml", tmp_path / "prometheus.yml")
    shutil.copy(INFRA / "prometheus" / "alerts.yml", tmp_path / "alerts.yml")
    checked = subprocess.run([promtool, "check", "config", "prometheus.yml"], capture_output=True, text=True,
                             timeout=120, cwd=tmp_path)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS" in checked.stdout + checked.stderr


def test_dockerfile_copies_what_exists_and_pins_torch() -> None:
    from dockerfile_parse import DockerfileParser

    parser = DockerfileParser(path=str(INFRA / "docker" / "Dockerfile"))
    assert parser.baseimage.startswith("python:3.11")
    copied = []
    for instruction in parser.structure:
        if instruction["instruction"] == "COPY":
            *sources, _dest = shlex.split(instruction["value"])
            for source in sources:
                assert (ROOT / source).exists(), f"Dockerfile copies {source}, which is not in the repository"
                copied.append(source.rstrip("/"))
    assert {"pyproject.toml", "README.md", "flows", "workers", "indexing"} <= set(copied)
    install = (INFRA / "install.sh").read_text()
    assert f'TORCH_VERSION:-{parser.args["TORCH_VERSION"]}' in install  # the same torch as install.sh
    runs = " ".join(i["value"] for i in parser.structure if i["instruction"] == "RUN")
    assert "wget" in runs and "bash" in runs  # KubeRay's probes and `ray start` wrapper
    assert "--uid 1000" in runs and any(i["instruction"] == "USER" and i["value"] == "ray" for i in parser.structure)
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".venv" in ignored and "reembed-data" in ignored
    images = {c["image"] for _, d in _k8s_docs() for c in _containers(d)}
    compose = yaml.safe_load((COMPOSE / "docker-compose.yml").read_text())
    assert images == {compose["x-reembed"]["image"]}  # one image, one tag, everywhere


def test_qdrant_values_are_keys_of_the_chart() -> None:
    chart_text = (SCHEMAS / "qdrant-chart-values.yaml").read_text()
    chart = yaml.safe_load(chart_text)
    values = yaml.safe_load((K8S / "qdrant-values.yaml").read_text())
    documented_in_comments = {"apiKey", "readOnlyApiKey"}  # the chart shows these commented out

    def check(ours: dict[str, Any], theirs: Any, where: str) -> None:
        for key, value in ours.items():
            if where == "" and key in documented_in_comments:
                assert f"# {key}:" in chart_text
                continue
            assert isinstance(theirs, dict) and key in theirs, f"qdrant-values.yaml: {where}{key} is not a chart value"
            if isinstance(value, dict) and theirs[key]:  # `{}` in the chart: free-form (resources)
                check(value, theirs[key], f"{where}{key}.")

    check(values, chart, "")
    assert values["persistence"]["size"] and values["image"]["tag"].startswith("v")


def test_prefect_yaml_names_the_job_flow() -> None:
    """`prefect deploy` would register reembed's own flow, with the parameters it takes, on reembed's pool."""
    import inspect

    from prefect.cli.deploy._models import ConcurrencyLimitSpec, DeploymentConfig, PrefectYamlModel
    from prefect.flows import load_flow_from_entrypoint

    from reembed.flows.operations.scheduling import DEFAULT_POOL, FLOW_NAME

    raw = yaml.safe_load((INFRA / "prefect" / "prefect.yaml").read_text())
    project = PrefectYamlModel.model_validate(raw)
    # Prefect ignores unknown keys: a misspelt one would be silently dropped, so check them here.
    assert set(raw) <= {"name", "prefect-version", "build", "push", "pull", "deployments"}
    (deployment,) = project.deployments
    assert set(raw["deployments"][0]) <= set(DeploymentConfig.model_fields)
    assert set(raw["deployments"][0]["concurrency_limit"]) <= set(ConcurrencyLimitSpec.model_fields)
    flow = load_flow_from_entrypoint(deployment.entrypoint)
    assert flow.name == FLOW_NAME
    assert set(deployment.parameters) == set(inspect.signature(flow.fn).parameters)
    assert deployment.parameters["job_file"] == "/etc/reembed/job.yaml"
    assert deployment.work_pool.name == DEFAULT_POOL
    assert deployment.concurrency_limit.limit == 1 and deployment.concurrency_limit.collision_strategy == "CANCEL_NEW"
    assert raw["prefect-version"] in (ROOT / "pyproject.toml").read_text()
