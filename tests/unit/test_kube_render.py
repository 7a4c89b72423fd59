"""The Kubernetes renderers: every object they make for a range of specs passes the official
Kubernetes JSON schemas (kubernetes-validate, strict, for the oldest version we support), and
carries what issue 10 asks of it. Also every manifest in deploy/kubernetes/."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from lambdabus_events.models import FunctionConfig
from lambdabus_platform.kube import render
from lambdabus_platform.kube.settings import MIN_KUBERNETES_VERSION, KubeSettings
from lambdabus_platform.settings import S3Settings

ROOT = Path(__file__).resolve().parents[2]
UID = "0f5c2a8e-3b1d-4e6f-9a7b-2c4d6e8f0a1b"
DIGEST = "a" * 64

SPECS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "preset-xs-fast": {"resources_preset": "XS", "build_preset": "fast", "replicas_preset": "XL"},
    "preset-xl-local-dev": {"resources_preset": "XL", "build_preset": "local-dev"},
    "explicit": {"memory": "1Gi", "cpu": 2000, "min_replicas": 2, "max_replicas": 6, "replicas": 3},
    "secrets-env": {
        "env": {"GREETING": "hello", "MODE": "x=y"},
        "secrets": ["db", "api-keys"],
        "env_from": {"DB_PASSWORD": {"secret": "db", "key": "password"}},
    },
    "labels": {"labels": {"team": "payments", "example.com/tier": "gold"}},
    "tmp-large": {"tmp_size": 4096, "timeout": 900},
    "stopped": {"replicas": 0, "min_replicas": 0, "max_replicas": 0},
    "custom": {"runtime": "custom", "command": ["./server", "--port", "8080"]},
    "long-names": {"secrets": ["s" * 63], "labels": {"k" * 63: "v" * 63}},
    "no-network": {"network": "none"},
    "gpu-prebuilt-image": {"gpu": 2, "image": "ghcr.io/example/app:v1.2"},
}


def function(overrides: dict[str, Any]) -> render.KubeFunction:
    return render.KubeFunction("team-a", "hello", UID, FunctionConfig.model_validate(overrides))


def settings(**values: Any) -> KubeSettings:
    return KubeSettings.model_validate(
        {
            "registry": "registry.example:5000",
            "insecure_registries": "registry.example:5000",
            **values,
        }
    )


def validate(obj: dict[str, Any]) -> None:
    kubernetes_validate.validate(obj, MIN_KUBERNETES_VERSION, strict=True)


OWNER = render.Owner(
    "apps/v1", "Deployment", f"lambda-{UID}", "9d2b7f0e-1111-2222-3333-444455556666"
)


@pytest.mark.parametrize("case", sorted(SPECS))
def test_every_rendered_object_passes_the_kubernetes_schemas(case: str) -> None:
    fn = function(SPECS[case])
    s3 = S3Settings(endpoint_url="http://minio.lambdabus:9000")
    objects = render.render_all(fn, settings(), DIGEST, s3=s3, owner=OWNER)
    kinds = [obj["kind"] for obj in objects]
    expected = ["Namespace", "RoleBinding", "RoleBinding"]
    expected += [] if "prebuilt" in case else ["Job"]
    expected += ["Secret", "Deployment", "Service"]
    expected += [] if case == "stopped" else ["HorizontalPodAutoscaler"]
    expected.append("NetworkPolicy")
    expected += ["NetworkPolicy"] if case == "no-network" else []
    assert kinds == expected
    for obj in objects:
        validate(obj)
        # What the schemas do not say: names that must be DNS labels (63 characters).
        assert len(obj["metadata"]["name"]) <= 63, obj["metadata"]["name"]
        pod = obj.get("spec", {}).get("template", {}).get("spec", {})
        for volume in pod.get("volumes", []):
            assert len(volume["name"]) <= 63, volume["name"]


def test_a_broken_object_is_refused_by_the_schemas() -> None:
    """The validation can fail: a wrong type in a Deployment is caught."""
    deployment = render.render_deployment(function({}), settings(), "img:1")
    deployment["spec"]["replicas"] = "three"
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(deployment)
    deployment = render.render_deployment(function({}), settings(), "img:1")
    deployment["spec"]["template"]["spec"]["containers"][0]["notAField"] = 1
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(deployment)


def test_job_runs_kaniko_with_the_build_preset_and_registry_settings() -> None:
    fn = function({"build_preset": "fast"})
    image = render.image_ref(settings(), fn, DIGEST)
    assert image == f"registry.example:5000/team-a-hello:{DIGEST}"
    job = render.render_job(fn, settings(insecure_registries="a:5000,b:5000"), image)
    assert job["metadata"]["name"] == f"kaniko-lambda-{UID}"
    container = job["spec"]["template"]["spec"]["containers"][0]
    args = container["args"]
    assert f"--context=s3://lambdabus-artifacts/build-contexts/{UID}.tar.gz" in args
    assert f"--destination={image}" in args
    assert "--cache=true" in args
    assert "--cache-repo=registry.example:5000/cache" in args
    assert [a for a in args if a.startswith("--insecure-registry")] == [
        "--insecure-registry=a:5000",
        "--insecure-registry=b:5000",
    ]
    # Kyma's `fast` build preset: 1100m/1100Mi requested, 1700m/1700Mi limit.
    assert container["resources"] == {
        "requests": {"cpu": "1100m", "memory": "1100Mi"},
        "limits": {"cpu": "1700m", "memory": "1700Mi"},
    }
    assert job["spec"]["backoffLimit"] == 0


def test_deployment_is_restricted_and_takes_env_only_from_secrets() -> None:
    spec = SPECS["secrets-env"] | {"resources_preset": "L", "tmp_size": 256}
    fn = function(spec)
    deployment = render.render_deployment(fn, settings(), "img:1")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert {"name": "tmp", "emptyDir": {"sizeLimit": "256Mi"}} in pod["volumes"]
    # Kyma's L preset: 100m/128Mi requested, 200m/256Mi limit.
    assert container["resources"] == {
        "requests": {"cpu": "100m", "memory": "128Mi"},
        "limits": {"cpu": "200m", "memory": "256Mi"},
    }
    # No env value of the user's is inline: plain values come from the env Secret, env_from
    # from a secretKeyRef.
    text = yaml.safe_dump(deployment)
    assert "hello" not in text.replace("team-a/hello", "").replace("function: hello", "")
    assert "x=y" not in text
    assert container["envFrom"] == [{"secretRef": {"name": f"lambda-{UID}-env"}}]
    by_name = {e["name"]: e for e in container["env"]}
    assert by_name["DB_PASSWORD"]["valueFrom"] == {
        "secretKeyRef": {"name": "lambdabus-secret-db", "key": "password"}
    }
    assert all("value" in e or "valueFrom" in e for e in container["env"])
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes[mounts["/secrets/db"]]["secret"] == {"secretName": "lambdabus-secret-db"}
    assert volumes[mounts["/secrets/api-keys"]]["secret"] == {
        "secretName": "lambdabus-secret-api-keys"
    }
    assert container["readinessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    secret = render.render_env_secret(fn, OWNER)
    assert secret["stringData"] == {"GREETING": "hello", "MODE": "x=y"}
    assert secret["metadata"]["ownerReferences"][0]["uid"] == OWNER.uid


def test_env_change_rolls_the_pods() -> None:
    first = render.render_deployment(function({"env": {"A": "1"}}), settings(), "img:1")
    second = render.render_deployment(function({"env": {"A": "2"}}), settings(), "img:1")
    key = render.ANNOTATION_ENV_DIGEST
    assert (
        first["spec"]["template"]["metadata"]["annotations"][key]
        != second["spec"]["template"]["metadata"]["annotations"][key]
    )


def test_labels_ownership_hpa_and_network_policy() -> None:
    fn = function(SPECS["labels"] | {"replicas_preset": "L"})
    service = render.render_service(fn, settings(), OWNER)
    labels = service["metadata"]["labels"]
    assert labels["lambdabus.io/namespace"] == "team-a"
    assert labels["lambdabus.io/function"] == "hello"
    assert labels["lambdabus.io/uid"] == UID
    assert labels["team"] == "payments"
    assert service["metadata"]["ownerReferences"] == [OWNER.reference()]
    pod_labels = render.render_deployment(fn, settings(), "i:1")["spec"]["template"]["metadata"][
        "labels"
    ]
    assert pod_labels["example.com/tier"] == "gold"
    hpa = render.render_hpa(fn, settings(), OWNER)
    assert hpa is not None
    # Kyma's L replicas preset: 1..5.
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (1, 5)
    assert hpa["spec"]["metrics"][0]["resource"]["target"]["averageUtilization"] == 50
    policy = render.render_network_policy("team-a", settings())
    (rule,) = policy["spec"]["ingress"]
    assert rule["from"] == [
        {
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "lambdabus"}},
            "podSelector": {"matchLabels": {"app.kubernetes.io/name": "lambdabus-router"}},
        }
    ]
    namespace = render.render_namespace("team-a")
    assert namespace["metadata"]["labels"]["lambdabus.io/managed-by"] == "lambdabus"


def test_user_labels_cannot_replace_the_identity_labels() -> None:
    fn = function({"labels": {"lambdabus.io/uid": "other"}})
    labels = render.render_deployment(fn, settings(), "i:1")["spec"]["template"]["metadata"][
        "labels"
    ]
    assert labels["lambdabus.io/uid"] == UID


DEPLOY_FILES = sorted((ROOT / "deploy" / "kubernetes").glob("*.yaml"))


def test_there_are_platform_manifests() -> None:
    assert DEPLOY_FILES, "deploy/kubernetes/ holds the platform's manifests"


@pytest.mark.parametrize("path", DEPLOY_FILES, ids=lambda p: p.name)
def test_every_platform_manifest_passes_the_kubernetes_schemas(path: Path) -> None:
    documents = [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    assert documents
    for doc in documents:
        validate(doc)


def test_rbac_is_least_privilege() -> None:
    """Never cluster-admin, no wildcard, and the per-namespace rules never bound cluster-wide."""
    docs = [d for d in yaml.safe_load_all((ROOT / "deploy/kubernetes/rbac.yaml").read_text()) if d]
    for doc in docs:
        for rule in doc.get("rules", []):
            assert "*" not in rule["verbs"], doc["metadata"]
            assert "*" not in rule["resources"], doc["metadata"]
        if doc["kind"] == "ClusterRoleBinding":
            assert doc["roleRef"]["name"] not in ("cluster-admin", *render.FUNCTION_ROLES)
    cluster_roles = {d["metadata"]["name"] for d in docs if d["kind"] == "ClusterRole"}
    assert set(render.FUNCTION_ROLES) <= cluster_roles
    # The bindings the deployer makes per namespace are the ones the manifest shows for `default`.
    shipped = [
        d for d in docs if d["kind"] == "RoleBinding" and d["metadata"]["namespace"] == "default"
    ]
    rendered = render.render_role_bindings("default", settings())
    assert sorted((d["roleRef"]["name"], d["subjects"][0]["name"]) for d in shipped) == sorted(
        (d["roleRef"]["name"], d["subjects"][0]["name"]) for d in rendered
    )


def test_a_function_without_network_gets_an_egress_policy_with_no_rule() -> None:
    policy = render.render_no_network_policy(function({"network": "none"}))
    assert policy is not None
    assert policy["spec"] == {
        "podSelector": {"matchLabels": {"lambdabus.io/uid": UID}},
        "policyTypes": ["Egress"],
        "egress": [],
    }
    assert render.render_no_network_policy(function({})) is None


def test_gpu_is_requested_and_a_prebuilt_image_runs_as_is() -> None:
    fn = function({"gpu": 2, "image": "ghcr.io/example/app:v1.2"})
    objects = render.render_all(fn, settings(), DIGEST)
    deployment = next(obj for obj in objects if obj["kind"] == "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == "ghcr.io/example/app:v1.2"
    assert container["resources"]["requests"]["nvidia.com/gpu"] == "2"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert all(obj["kind"] != "Job" for obj in objects)
    plain = render.render_deployment(function({}), settings(), "img:1")
    resources = plain["spec"]["template"]["spec"]["containers"][0]["resources"]
    assert "nvidia.com/gpu" not in resources["limits"]
