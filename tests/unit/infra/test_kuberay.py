"""The KubeRay deployment: what the overlay renders is valid for KubeRay and opens no door.

infra/kuberay/overlays/example is rendered by infra/kuberay/render.py (what `kubectl kustomize`
does, offline), and its RayCluster and RayJob are validated against the KubeRay CRD schema kept
in infra/kuberay/schemas/ (trimmed by hand; see its header). No kubectl, cluster or network:
pods starting, IRSA credentials and Kueue admission need a real cluster and are not checked.
"""
from __future__ import annotations

import copy
import importlib.util
import re
import shutil
import subprocess
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

from jobs.spec import STORAGE_ROOT_ENV

REPO = Path(__file__).resolve().parents[3]
KUBERAY = REPO / "infra" / "kuberay"
OVERLAY = KUBERAY / "overlays" / "example"
SCHEMA = yaml.safe_load((KUBERAY / "schemas" / "ray.io_v1.schema.yaml").read_text())
SETTINGS = "orbitgen-settings"
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
SECRET_SHAPES = [
    re.compile(r"(AKIA|ASIA)[0-9A-Z]{16}"),                       # AWS access key id
    # 40 base64 characters with digits and both cases: the shape of an AWS secret key.
    re.compile(r"(?<![A-Za-z0-9/+])(?=[A-Za-z0-9/+]*[0-9])(?=[A-Za-z0-9/+]*[a-z])"
               r"(?=[A-Za-z0-9/+]*[A-Z])[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+=])"),
]
SECRET_NAME = re.compile(r"KEY|SECRET|TOKEN|PASSWORD")


def _load_render():
    spec = importlib.util.spec_from_file_location("kuberay_render", KUBERAY / "render.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


render = _load_render()


@pytest.fixture(scope="module")
def objs() -> list[dict]:
    return render.render(OVERLAY)


def overlay() -> dict:
    return yaml.safe_load((OVERLAY / "kustomization.yaml").read_text())


def one(objs: list[dict], kind: str) -> dict:
    [obj] = [o for o in objs if o["kind"] == kind]
    return obj


def validate(obj: dict) -> None:
    schema = {"$ref": f"#/$defs/{obj['kind']}", "$defs": SCHEMA["$defs"]}
    jsonschema.Draft202012Validator(schema).validate(obj)


def cluster_specs(objs: list[dict]) -> dict[str, dict]:
    return {"RayCluster": one(objs, "RayCluster")["spec"],
            "RayJob": one(objs, "RayJob")["spec"]["rayClusterSpec"]}


def ray_pods(objs: list[dict]) -> dict[str, dict]:
    """The pod templates of Ray nodes (head and workers) of the cluster and of the job."""
    pods = {}
    for owner, spec in cluster_specs(objs).items():
        pods[f"{owner}/head"] = spec["headGroupSpec"]["template"]
        for group in spec.get("workerGroupSpecs", []):
            pods[f"{owner}/{group['groupName']}"] = group["template"]
    return pods


def all_pods(objs: list[dict]) -> dict[str, dict]:
    return {**ray_pods(objs), "RayJob/submitter": one(objs, "RayJob")["spec"]["submitterPodTemplate"]}


def containers(pods: dict[str, dict]):
    for where, pod in pods.items():
        for c in pod["spec"]["containers"]:
            yield f"{where}/{c['name']}", c


# ------------------------------------------------------------------------------ schema

def test_schema_is_a_valid_json_schema():
    jsonschema.Draft202012Validator.check_schema(SCHEMA)


@pytest.mark.parametrize("directory", [OVERLAY, KUBERAY / "base"], ids=["overlay", "base"])
def test_rendered_objects_validate_against_the_crd_schema(directory):
    objs = render.render(directory)
    assert sorted(o["kind"] for o in objs) == ["ConfigMap", "RayCluster", "RayJob", "ServiceAccount"]
    for obj in objs:
        if obj["kind"] in ("RayCluster", "RayJob"):
            validate(obj)


def _worker(obj):
    return obj["spec"]["workerGroupSpecs"][0]


@pytest.mark.parametrize("kind, breakage", [
    ("RayCluster", lambda o: o["spec"].update(workerGroupSpec=o["spec"].pop("workerGroupSpecs"))),
    ("RayCluster", lambda o: _worker(o).update(minReplicas="0")),
    ("RayCluster", lambda o: o["spec"].pop("headGroupSpec")),
    ("RayCluster", lambda o: _worker(o)["template"]["spec"]["containers"][0].pop("name")),
    ("RayCluster", lambda o: _worker(o)["template"]["spec"]["containers"][0]["resources"]["limits"]
     .update({"nvidia.com/gpu": "4 GPUs"})),
    ("RayCluster", lambda o: o["spec"]["autoscalerOptions"].update(upscalingMode="Fast")),
    ("RayCluster", lambda o: o.update(apiVersion="ray.io/v1alpha1")),
    ("RayJob", lambda o: o["spec"].update(shutdownAfterJobFinish=True)),
    ("RayJob", lambda o: o["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
     ["env"][1]["valueFrom"]["secretKeyRef"].pop("key")),
    ("RayJob", lambda o: o["spec"]["submitterPodTemplate"]["spec"].update(restartPolicys="Never")),
], ids=["typo-workerGroupSpec", "minReplicas-string", "no-headGroupSpec", "container-without-name",
        "bad-quantity", "bad-upscalingMode", "old-apiVersion", "typo-shutdownAfterJobFinish",
        "secretKeyRef-without-key", "typo-in-pod-spec"])
def test_broken_copies_fail_the_schema(objs, kind, breakage):
    bad = copy.deepcopy(one(objs, kind))
    breakage(bad)
    with pytest.raises(jsonschema.ValidationError):
        validate(bad)


# ------------------------------------------------------------------------------ what the overlay sets

def test_image_comes_from_the_overlay(objs):
    [rule] = overlay()["images"]
    expected = f"{rule['newName']}:{rule['newTag']}"
    for where, c in containers(all_pods(objs)):
        assert c["image"] == expected, where
    # base/ names the image infra/Dockerfile builds (orbitgen:<version>), and only that one.
    base_images = {c["image"] for _, c in containers(all_pods(render.render(KUBERAY / "base")))}
    assert {render.split_image(i)[0] for i in base_images} == {rule["name"]}


def test_storage_spec_and_namespace_come_from_the_overlay(objs):
    kustomization = overlay()
    literals = dict(l.split("=", 1) for l in kustomization["configMapGenerator"][0]["literals"])
    settings = one(objs, "ConfigMap")
    assert settings["metadata"]["name"] == SETTINGS, "no hash suffix: KubeRay's templates name it"
    # The storage root reaches the driver as the variable jobs/spec.py reads.
    assert settings["data"][STORAGE_ROOT_ENV] == literals[STORAGE_ROOT_ENV]
    assert settings["data"][STORAGE_ROOT_ENV].startswith("s3://")
    assert settings["data"]["ORBITGEN_SPEC"] == literals["ORBITGEN_SPEC"]
    for where, c in containers(all_pods(objs)):
        assert {"configMapRef": {"name": SETTINGS}} in c.get("envFrom", []), where
    assert {o["metadata"].get("namespace") for o in objs} == {kustomization["namespace"]}


def test_rayjob_entrypoint_expands_in_the_submitter_shell(objs):
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("no bash")
    spec = one(objs, "RayJob")["spec"]
    entrypoint = spec["entrypoint"]
    assert "$(" not in entrypoint, "Kubernetes-style $(VAR): see the comment in base/rayjob.yaml"
    env = {"PATH": "/usr/bin:/bin", **one(objs, "ConfigMap")["data"]}

    # KubeRay runs `ray job submit ... -- <entrypoint>` with bash -c: print the arguments instead.
    def words(environ):
        return subprocess.run([bash, "-c", "printf '%s\\n' " + entrypoint], env=environ,
                              capture_output=True, text=True, timeout=30)

    done = words(env)
    assert done.returncode == 0, done.stderr
    name = env["ORBITGEN_SPEC"]
    assert done.stdout.splitlines() == ["python", "-m", "jobs.cli", "train", f"jobs/specs/{name}.yaml"]
    assert (REPO / "jobs" / "specs" / f"{name}.yaml").is_file()
    missing = words({k: v for k, v in env.items() if k != "ORBITGEN_SPEC"})
    assert missing.returncode != 0 and "ORBITGEN_SPEC" in missing.stderr
    # The spec is the image's copy of the repository (infra/Dockerfile's WORKDIR).
    assert yaml.safe_load(spec["runtimeEnvYAML"])["working_dir"] == "local:///home/ray/orbitgen"
    assert "WORKDIR /home/ray/orbitgen" in (REPO / "infra" / "Dockerfile").read_text()


# ------------------------------------------------------------------------------ no open doors

def test_dashboard_is_reached_through_port_forward_only(objs):
    for owner, spec in cluster_specs(objs).items():
        head = spec["headGroupSpec"]
        assert head["serviceType"] == "ClusterIP", owner
        assert head.get("headService", {}).get("spec", {}).get("type", "ClusterIP") == "ClusterIP", owner
        assert not head.get("enableIngress") and "ingressOptions" not in head, owner
    assert not {o["kind"] for o in objs} & {"Service", "Ingress", "Route", "Gateway", "HTTPRoute"}
    for where, pod in all_pods(objs).items():
        assert not pod["spec"].get("hostNetwork"), where
    for where, c in containers(all_pods(objs)):
        assert not any("hostPort" in p for p in c.get("ports", [])), where


def test_no_credentials_in_any_manifest(objs):
    for path in sorted(KUBERAY.rglob("*.yaml")):
        for shape in SECRET_SHAPES:
            assert not shape.search(path.read_text()), path
    assert "Secret" not in {o["kind"] for o in objs}
    assert not [k for k in one(objs, "ConfigMap")["data"] if SECRET_NAME.search(k)]
    for where, c in containers(all_pods(objs)):
        for var in c.get("env", []):
            if SECRET_NAME.search(var["name"]):
                assert "value" not in var and "secretKeyRef" in var["valueFrom"], (where, var["name"])
            assert not (var["name"] == "RAY_AUTH_MODE" and var.get("value") == "disabled"), where
    for owner, spec in cluster_specs(objs).items():
        assert spec.get("authOptions", {}).get("mode") != "disabled", owner
    assert "RAY_AUTH_MODE" not in one(objs, "ConfigMap")["data"]


def test_s3_through_irsa(objs):
    account = one(objs, "ServiceAccount")
    arn = account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"]
    assert re.fullmatch(r"arn:aws[a-z-]*:iam::\d{12}:role/[\w+=,.@/-]+", arn), arn
    for where, pod in ray_pods(objs).items():
        assert pod["spec"].get("serviceAccountName") == account["metadata"]["name"], where
    assert "AWS_ACCESS_KEY_ID" not in yaml.safe_dump_all(objs)


def test_mlflow_password_from_an_optional_secret(objs):
    for where, c in containers(ray_pods(objs)):
        env = {v["name"]: v for v in c.get("env", [])}
        ref = env["MLFLOW_TRACKING_PASSWORD"]["valueFrom"]["secretKeyRef"]
        assert ref["optional"] is True, where     # a server without auth needs no Secret


# ------------------------------------------------------------------------------ clusters

def test_cluster_specs_pin_ray_and_give_gpu_workers(objs):
    for owner, spec in cluster_specs(objs).items():
        assert spec["rayVersion"] == ray.__version__, owner
        head = spec["headGroupSpec"]
        assert head["rayStartParams"].get("num-gpus") == "0", owner
        groups = [g for g in spec["workerGroupSpecs"]
                  if any("nvidia.com/gpu" in c["resources"].get("limits", {})
                         for c in g["template"]["spec"]["containers"])]
        assert groups, f"{owner}: no worker group with nvidia.com/gpu limits"
        for g in groups:
            [c] = g["template"]["spec"]["containers"]
            # Extended resources: Kubernetes wants requests equal to limits.
            assert c["resources"]["requests"]["nvidia.com/gpu"] == c["resources"]["limits"]["nvidia.com/gpu"]
            assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} \
                in g["template"]["spec"]["tolerations"]
    autoscaled = cluster_specs(objs)["RayCluster"]
    assert autoscaled["enableInTreeAutoscaling"] is True
    assert all(g["minReplicas"] == 0 < g["maxReplicas"] for g in autoscaled["workerGroupSpecs"])


def test_rayjob_meets_kueues_rules(objs):
    job = one(objs, "RayJob")
    assert job["metadata"]["labels"][QUEUE_LABEL] == "orbitgen"
    spec, cluster = job["spec"], job["spec"]["rayClusterSpec"]
    # What Kueue's RayJob webhook refuses, and a fixed size (Kueue reserves it up front).
    assert spec["shutdownAfterJobFinishes"] is True and "clusterSelector" not in spec
    assert cluster["enableInTreeAutoscaling"] is False
    assert 0 < len(cluster["workerGroupSpecs"]) <= 7
    for g in cluster["workerGroupSpecs"]:
        assert g["groupName"] != "head"
        assert g["replicas"] == g["minReplicas"] == g["maxReplicas"] >= 1


def test_overlay_can_drop_the_kueue_label(tmp_path):
    shutil.copytree(KUBERAY / "base", tmp_path / "base")
    kustomization = overlay()
    kustomization["resources"] = ["../base"]
    for entry in kustomization["patches"]:
        entry["patch"] = entry["patch"].replace(f"{QUEUE_LABEL}: orbitgen", f"{QUEUE_LABEL}: null")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    job = one(render.render(tmp_path / "mine"), "RayJob")
    assert QUEUE_LABEL not in job["metadata"]["labels"]
    validate(job)


# ------------------------------------------------------------------------------ render.py itself

@pytest.mark.parametrize("image, parts", [
    ("orbitgen", ("orbitgen", "", "")),
    ("orbitgen:0.1.0", ("orbitgen", "0.1.0", "")),
    ("registry.local:5000/team/orbitgen:1.2", ("registry.local:5000/team/orbitgen", "1.2", "")),
    ("orbitgen@sha256:abc", ("orbitgen", "", "sha256:abc")),
])
def test_split_image(image, parts):
    assert render.split_image(image) == parts


def test_a_patch_replaces_the_lists_of_a_crd():
    # What kustomize v5 does for KubeRay's kinds, which it has no schema of: no merge by `name`.
    base = {"env": [{"name": "A", "value": "1"}, {"name": "B", "value": "2"}], "labels": {"x": "1", "y": "2"}}
    patch = {"env": [{"name": "B", "value": "3"}], "labels": {"y": None, "z": "3"}}
    assert render._merge(base, patch) == {"env": [{"name": "B", "value": "3"}], "labels": {"x": "1", "z": "3"}}
    with pytest.raises(NotImplementedError):
        render._merge(base, patch, keyed_lists=True)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed")
@pytest.mark.parametrize("directory", [OVERLAY, KUBERAY / "base"], ids=["overlay", "base"])
def test_render_equals_kubectl_kustomize(directory):
    done = subprocess.run(["kubectl", "kustomize", str(directory)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr

    def by_id(objs):
        return {(o["kind"], o["metadata"]["name"]): o for o in objs}

    assert by_id(render.render(directory)) == by_id(yaml.safe_load_all(done.stdout))


@pytest.mark.parametrize("kustomization, error", [
    ({"resources": [], "namePrefix": "x-"}, NotImplementedError),
    ({"configMapGenerator": [{"name": "c", "literals": ["A=1"]}]}, NotImplementedError),
    ({"configMapGenerator": [{"name": "c", "behavior": "merge", "literals": ["A=1"],
                              "options": {"disableNameSuffixHash": True}}]}, ValueError),
    ({"patches": [{"path": "p.yaml", "target": {"kind": "RayJob"}}]}, NotImplementedError),
    ({"resources": ["/abs/base"]}, ValueError),
    ({"resources": ["../elsewhere.yaml"]}, ValueError),
])
def test_render_refuses_what_it_does_not_implement(tmp_path, kustomization, error):
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    with pytest.raises(error):
        render.render(tmp_path)
