"""Pure renderers of the Kubernetes objects a function becomes (issue 10, Deliver 7).

Each takes a function (`KubeFunction`: namespace, name, uid and its resolved spec — presets
already filled in) and `KubeSettings`, and returns a plain dict ready to apply; nothing here
talks to an API server. Names follow LUNA: the build Job `kaniko-lambda-<uid>`, the Deployment,
Service and HorizontalPodAutoscaler `lambda-<uid>`, the env Secret `lambda-<uid>-env`. Every
object carries `lambdabus.io/namespace`, `lambdabus.io/function` and `lambdabus.io/uid` (and the
function's pods its user labels). The Service, HPA and env Secret name the Deployment as owner
once its uid is known (`Owner`), so deleting the Deployment cascades to them; the build Job is
cleaned up by its TTL.

Where the pieces run: build Jobs in the platform's namespace (Kaniko runs as root, which the
functions' namespaces, labelled Pod Security `restricted`, refuse); functions in the Kubernetes
namespace named like their Lambdabus namespace.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from lambdabus_events.models import FunctionConfig, FunctionRecord, Runtime
from lambdabus_platform.kube.settings import KubeSettings
from lambdabus_platform.settings import S3Settings

Obj = dict[str, Any]

LABEL_NAMESPACE = "lambdabus.io/namespace"
LABEL_FUNCTION = "lambdabus.io/function"
LABEL_UID = "lambdabus.io/uid"
LABEL_MANAGED_BY = "lambdabus.io/managed-by"
LABEL_COMPONENT = "lambdabus.io/component"
MANAGER = "lambdabus"
ANNOTATION_ENV_DIGEST = "lambdabus.io/env-digest"
NETWORK_POLICY_NAME = "lambdabus-functions"
CONTAINER = "function"
HEALTH_PATH = "/healthz"
RESTRICTED_SECCOMP = {"type": "RuntimeDefault"}
GPU_RESOURCE = "nvidia.com/gpu"
SERVICE_PORT = 80


@dataclass(frozen=True, slots=True)
class KubeFunction:
    """What the renderers need of a function: where it lives, who it is, its resolved spec."""

    namespace: str
    name: str
    uid: str
    spec: FunctionConfig

    @classmethod
    def from_record(cls, record: FunctionRecord) -> KubeFunction:
        return cls(record.namespace, record.name, record.uid, record.spec)


@dataclass(frozen=True, slots=True)
class Owner:
    """An object that owns others (ownerReferences): deleting it deletes them."""

    api_version: str
    kind: str
    name: str
    uid: str

    def reference(self) -> Obj:
        return {
            "apiVersion": self.api_version,
            "kind": self.kind,
            "name": self.name,
            "uid": self.uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }


# -- names ----------------------------------------------------------------------------------


def object_name(fn: KubeFunction) -> str:
    """The Deployment, Service and HPA of a function (LUNA's `lambda-<id>`)."""
    return f"lambda-{fn.uid}"


def job_name(fn: KubeFunction) -> str:
    """The build Job (LUNA's `kaniko-lambda-<id>`)."""
    return f"kaniko-lambda-{fn.uid}"


def env_secret_name(fn: KubeFunction) -> str:
    return f"lambda-{fn.uid}-env"


def user_secret_name(secret: str) -> str:
    """The Kubernetes Secret a Lambdabus secret of the namespace is kept in (prefixed, so that
    no user secret can take the name of one of the platform's)."""
    return f"lambdabus-secret-{secret}"


def image_ref(settings: KubeSettings, fn: KubeFunction, digest: str) -> str:
    """`$LAMBDABUS_REGISTRY/<ns>-<name>:<content digest>`."""
    return f"{settings.registry.rstrip('/')}/{fn.namespace}-{fn.name}:{digest}"


def runtime_image(settings: KubeSettings, runtime: Runtime) -> str:
    """The base image a runtime's functions are built on."""
    return f"{settings.registry.rstrip('/')}/lambdabus-runtime-{runtime}"


def build_context_url(settings: KubeSettings, fn: KubeFunction) -> str:
    """Where the builder puts the build context (a tar.gz) for Kaniko to read."""
    return f"s3://{settings.build_context_bucket}/{settings.build_context_prefix}{fn.uid}.tar.gz"


def service_host(fn: KubeFunction) -> str:
    """The cluster DNS name the router reaches the function at."""
    return f"{object_name(fn)}.{fn.namespace}.svc"


def service_endpoint(fn: KubeFunction) -> str:
    """The router's endpoint of a function: its Service's full cluster DNS name and port."""
    return f"http://{object_name(fn)}.{fn.namespace}.svc.cluster.local:{SERVICE_PORT}"


def render_user_secret(
    namespace: str, secret: str, data: Mapping[str, str], labels: Mapping[str, str]
) -> Obj:
    """A Lambdabus secret of the namespace as the Kubernetes Secret the function's pods mount
    (`/secrets/<name>`) and take `env_from` values from."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": user_secret_name(secret),
            "namespace": namespace,
            "labels": {**labels, LABEL_MANAGED_BY: MANAGER, LABEL_NAMESPACE: namespace},
        },
        "type": "Opaque",
        "stringData": dict(sorted(data.items())),
    }


# -- pieces ---------------------------------------------------------------------------------


def identity_labels(fn: KubeFunction) -> dict[str, str]:
    return {LABEL_NAMESPACE: fn.namespace, LABEL_FUNCTION: fn.name, LABEL_UID: fn.uid}


def function_labels(fn: KubeFunction) -> dict[str, str]:
    """The user's labels and ours (ours win: a user cannot take over `lambdabus.io/uid`)."""
    return {**fn.spec.labels, **identity_labels(fn), LABEL_MANAGED_BY: MANAGER}


def _metadata(name: str, namespace: str, labels: Mapping[str, str], owner: Owner | None) -> Obj:
    meta: Obj = {"name": name, "namespace": namespace, "labels": dict(labels)}
    if owner is not None:
        meta["ownerReferences"] = [owner.reference()]
    return meta


def _cpu(millicores: int) -> str:
    return f"{millicores}m"


def _mib(mebibytes: int) -> str:
    return f"{mebibytes}Mi"


def env_digest(env: Mapping[str, str]) -> str:
    """Changes when the env does: on the pod template it rolls the pods when only the Secret
    changed (a Secret's new values do not reach running containers' environment)."""
    return hashlib.sha256(json.dumps(dict(env), sort_keys=True).encode()).hexdigest()[:32]


# -- objects --------------------------------------------------------------------------------


def render_namespace(namespace: str) -> Obj:
    """The function namespace, created when missing: managed by Lambdabus, and its pods held to
    Pod Security `restricted` (which the rendered Deployments satisfy)."""
    return {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {
            "name": namespace,
            "labels": {
                LABEL_MANAGED_BY: MANAGER,
                LABEL_NAMESPACE: namespace,
                "pod-security.kubernetes.io/enforce": "restricted",
            },
        },
    }


def render_env_secret(fn: KubeFunction, owner: Owner | None = None) -> Obj:
    """The function's env as a Secret; the Deployment only refers to it (`envFrom`)."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": _metadata(env_secret_name(fn), fn.namespace, identity_labels(fn), owner),
        "type": "Opaque",
        "stringData": dict(sorted(fn.spec.env.items())),
    }


def render_job(
    fn: KubeFunction, settings: KubeSettings, image: str, s3: S3Settings | None = None
) -> Obj:
    """The Kaniko build Job: reads the build context from S3, pushes `image`, caches layers in
    `<registry>/cache`; resources from the spec's build preset (`build_resources`)."""
    build = fn.spec.build_resources
    args = [
        f"--context={build_context_url(settings, fn)}",
        "--dockerfile=Dockerfile",
        f"--destination={image}",
        "--cache=true",
        f"--cache-repo={settings.registry.rstrip('/')}/cache",
        "--digest-file=/dev/termination-log",
        *(f"--insecure-registry={registry}" for registry in settings.insecure_registries),
    ]
    env: list[Obj] = [{"name": "DOCKER_CONFIG", "value": "/kaniko/.docker"}]
    if s3 is not None:
        env.append({"name": "AWS_REGION", "value": s3.region})
        if s3.endpoint_url:
            env += [
                {"name": "S3_ENDPOINT", "value": s3.endpoint_url},
                {"name": "S3_FORCE_PATH_STYLE", "value": "true"},
            ]
    labels = {**identity_labels(fn), LABEL_COMPONENT: "build", LABEL_MANAGED_BY: MANAGER}
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": _metadata(job_name(fn), settings.platform_namespace, labels, None),
        "spec": {
            "backoffLimit": 0,
            "activeDeadlineSeconds": settings.build_deadline,
            "ttlSecondsAfterFinished": settings.build_ttl,
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "restartPolicy": "Never",
                    "automountServiceAccountToken": False,
                    "containers": [
                        {
                            "name": "kaniko",
                            "image": settings.kaniko_image,
                            "args": args,
                            "env": env,
                            "envFrom": [{"secretRef": {"name": settings.build_s3_secret}}],
                            "resources": {
                                "requests": {
                                    "cpu": _cpu(build.cpu_request),
                                    "memory": _mib(build.memory_request),
                                },
                                "limits": {"cpu": _cpu(build.cpu), "memory": _mib(build.memory)},
                            },
                            "volumeMounts": [
                                {
                                    "name": "registry",
                                    "mountPath": "/kaniko/.docker",
                                    "readOnly": True,
                                }
                            ],
                        }
                    ],
                    "volumes": [
                        {
                            "name": "registry",
                            "secret": {
                                "secretName": settings.registry_secret,
                                "items": [{"key": ".dockerconfigjson", "path": "config.json"}],
                            },
                        }
                    ],
                },
            },
        },
    }


def _container(fn: KubeFunction, settings: KubeSettings, image: str) -> Obj:
    spec = fn.spec
    env: list[Obj] = [
        {"name": "PORT", "value": str(settings.function_port)},
        {"name": "LAMBDABUS_FUNCTION", "value": f"{fn.namespace}/{fn.name}"},
        {"name": "LAMBDABUS_TIMEOUT", "value": f"{spec.timeout:g}"},
    ]
    env += [
        {
            "name": var,
            "valueFrom": {"secretKeyRef": {"name": user_secret_name(ref.secret), "key": ref.key}},
        }
        for var, ref in sorted(spec.env_from.items())
    ]
    probe = {"httpGet": {"path": HEALTH_PATH, "port": "http"}, "timeoutSeconds": 2}
    mounts: list[Obj] = [{"name": "tmp", "mountPath": "/tmp"}]
    mounts += [
        {"name": f"secret-{i}", "mountPath": f"/secrets/{name}", "readOnly": True}
        for i, name in enumerate(sorted(set(spec.secrets)))
    ]
    requests = {"cpu": _cpu(spec.cpu_request), "memory": _mib(spec.memory_request)}
    limits = {"cpu": _cpu(spec.cpu), "memory": _mib(spec.memory)}
    if spec.gpu:  # an extended resource: request and limit must be equal
        requests[GPU_RESOURCE] = limits[GPU_RESOURCE] = str(spec.gpu)
    return {
        "name": CONTAINER,
        "image": image,
        "ports": [{"name": "http", "containerPort": settings.function_port, "protocol": "TCP"}],
        "env": env,
        "envFrom": [{"secretRef": {"name": env_secret_name(fn)}}],
        "resources": {"requests": requests, "limits": limits},
        "readinessProbe": {**probe, "periodSeconds": 5, "failureThreshold": 3},
        "livenessProbe": {**probe, "periodSeconds": 10, "failureThreshold": 3},
        "securityContext": {
            "runAsNonRoot": True,
            "readOnlyRootFilesystem": True,
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": dict(RESTRICTED_SECCOMP),
        },
        "volumeMounts": mounts,
    }


def render_deployment(
    fn: KubeFunction, settings: KubeSettings, image: str, owner: Owner | None = None
) -> Obj:
    """The function's pods: Kyma's restricted security, resources from the spec, env only
    through Secrets, probes on /healthz, `replicas` of them (the HPA moves it within
    min..max)."""
    spec = fn.spec
    labels = function_labels(fn)
    volumes: list[Obj] = [{"name": "tmp", "emptyDir": {"sizeLimit": _mib(spec.tmp_size)}}]
    volumes += [  # volume names are DNS labels (63): numbered, not named after the secret
        {"name": f"secret-{i}", "secret": {"secretName": user_secret_name(name)}}
        for i, name in enumerate(sorted(set(spec.secrets)))
    ]
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(object_name(fn), fn.namespace, labels, owner),
        "spec": {
            "replicas": spec.replicas,
            "revisionHistoryLimit": 2,
            "selector": {"matchLabels": {LABEL_UID: fn.uid}},
            "template": {
                "metadata": {
                    "labels": labels,
                    "annotations": {ANNOTATION_ENV_DIGEST: env_digest(spec.env)},
                },
                "spec": {
                    "automountServiceAccountToken": False,
                    "enableServiceLinks": False,
                    "terminationGracePeriodSeconds": int(spec.timeout) + 5,
                    "imagePullSecrets": [{"name": settings.registry_secret}],
                    "securityContext": {
                        "runAsNonRoot": True,
                        "runAsUser": settings.function_uid,
                        "runAsGroup": settings.function_uid,
                        "fsGroup": settings.function_uid,
                        "seccompProfile": dict(RESTRICTED_SECCOMP),
                    },
                    "containers": [_container(fn, settings, image)],
                    "volumes": volumes,
                },
            },
        },
    }


def render_service(fn: KubeFunction, settings: KubeSettings, owner: Owner | None = None) -> Obj:
    """A ClusterIP Service on port 80 to the pods' `http` port (the router's endpoint)."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(object_name(fn), fn.namespace, function_labels(fn), owner),
        "spec": {
            "type": "ClusterIP",
            "selector": {LABEL_UID: fn.uid},
            "ports": [
                {"name": "http", "port": SERVICE_PORT, "targetPort": "http", "protocol": "TCP"}
            ],
        },
    }


def render_hpa(fn: KubeFunction, settings: KubeSettings, owner: Owner | None = None) -> Obj | None:
    """autoscaling/v2 between the spec's min and max replicas on CPU; None for a stopped
    function (`replicas: 0`), which an autoscaler would start again."""
    spec = fn.spec
    if spec.replicas == 0 or spec.max_replicas == 0:
        return None
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": _metadata(object_name(fn), fn.namespace, function_labels(fn), owner),
        "spec": {
            "scaleTargetRef": {
                "apiVersion": "apps/v1",
                "kind": "Deployment",
                "name": object_name(fn),
            },
            "minReplicas": max(1, spec.min_replicas),
            "maxReplicas": max(1, spec.max_replicas),
            "metrics": [
                {
                    "type": "Resource",
                    "resource": {
                        "name": "cpu",
                        "target": {
                            "type": "Utilization",
                            "averageUtilization": settings.hpa_cpu_target,
                        },
                    },
                }
            ],
        },
    }


def render_network_policy(namespace: str, settings: KubeSettings) -> Obj:
    """One per function namespace: only the router's pods reach function pods, and only on
    their port."""
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {
            "name": NETWORK_POLICY_NAME,
            "namespace": namespace,
            "labels": {LABEL_MANAGED_BY: MANAGER, LABEL_NAMESPACE: namespace},
        },
        "spec": {
            "podSelector": {"matchExpressions": [{"key": LABEL_FUNCTION, "operator": "Exists"}]},
            "policyTypes": ["Ingress"],
            "ingress": [
                {
                    "from": [
                        {
                            "namespaceSelector": {
                                "matchLabels": {
                                    "kubernetes.io/metadata.name": settings.platform_namespace
                                }
                            },
                            "podSelector": {"matchLabels": dict(settings.router_selector)},
                        }
                    ],
                    "ports": [{"protocol": "TCP", "port": settings.function_port}],
                }
            ],
        },
    }


def render_no_network_policy(fn: KubeFunction, owner: Owner | None = None) -> Obj | None:
    """For a function with `network: none`: its pods may open no connection at all (an
    Egress policy with no rule). None for `outbound`."""
    if fn.spec.network != "none":
        return None
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _metadata(
            f"{object_name(fn)}-no-network", fn.namespace, identity_labels(fn), owner
        ),
        "spec": {
            "podSelector": {"matchLabels": {LABEL_UID: fn.uid}},
            "policyTypes": ["Egress"],
            "egress": [],
        },
    }


FUNCTION_ROLES = {
    "lambdabus-functions": "lambdabus-deployer",
    "lambdabus-function-logs": "lambdabus-logs",
}


def render_role_bindings(namespace: str, settings: KubeSettings) -> list[Obj]:
    """The platform's rights in one function namespace: RoleBindings of the ClusterRoles of
    deploy/kubernetes/rbac.yaml, which are never bound cluster-wide."""
    return [
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": {
                "name": role,
                "namespace": namespace,
                "labels": {LABEL_MANAGED_BY: MANAGER, LABEL_NAMESPACE: namespace},
            },
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "ClusterRole",
                "name": role,
            },
            "subjects": [
                {
                    "kind": "ServiceAccount",
                    "name": account,
                    "namespace": settings.platform_namespace,
                }
            ],
        }
        for role, account in FUNCTION_ROLES.items()
    ]


def render_all(
    fn: KubeFunction,
    settings: KubeSettings,
    digest: str,
    *,
    s3: S3Settings | None = None,
    owner: Owner | None = None,
) -> list[Obj]:
    """Every object a function becomes, in the order they are applied: its namespace and the
    platform's RoleBindings there (once per namespace), the build Job (none for a prebuilt
    `image`), the env Secret, the
    Deployment, Service, HPA (unless stopped), the namespace's NetworkPolicy, and for
    `network: none` the function's own."""
    image = fn.spec.image or image_ref(settings, fn, digest)
    objects = [
        render_namespace(fn.namespace),
        *render_role_bindings(fn.namespace, settings),
        *([] if fn.spec.image else [render_job(fn, settings, image, s3)]),  # prebuilt: no build
        render_env_secret(fn, owner),
        render_deployment(fn, settings, image),
        render_service(fn, settings, owner),
    ]
    hpa = render_hpa(fn, settings, owner)
    if hpa is not None:
        objects.append(hpa)
    objects.append(render_network_policy(fn.namespace, settings))
    isolated = render_no_network_policy(fn, owner)
    if isolated is not None:
        objects.append(isolated)
    return objects
