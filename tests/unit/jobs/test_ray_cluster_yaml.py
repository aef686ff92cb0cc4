"""The launcher config and the node image are valid for the tools that read them, and agree with
the installed Ray.

ray_cluster.yaml is checked the way `ray up` checks it (Ray's prepare_config + validate_config,
i.e. ray/autoscaler/ray-schema.json; offline, no AWS credentials), and by plain jsonschema;
broken copies must fail. It opens no door: the Jobs API on loopback, S3 through instance
profiles, no keys. infra/Dockerfile pins the same Ray version. The KubeRay manifests:
tests/unit/infra/test_kuberay.py.
"""
from __future__ import annotations

import copy
import json
import re
import subprocess
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

REPO = Path(__file__).resolve().parents[3]
CLUSTER_YAML = REPO / "ray_cluster.yaml"
DOCKERFILE = REPO / "infra" / "Dockerfile"
SCHEMA = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
IMAGE_RE = re.compile(r"^rayproject/ray:(?P<version>\d+\.\d+\.\d+)-py3\d+-gpu$")


@pytest.fixture(scope="module")
def cluster() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def ray_validate(config: dict) -> dict:
    """What `ray up` does before touching the cloud: fill defaults, then validate."""
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


# ------------------------------------------------------------------------------ ray_cluster.yaml

def test_cluster_yaml_passes_rays_validation(cluster):
    prepared = ray_validate(cluster)
    assert prepared["cluster_name"] == "orbitgen"
    assert prepared["provider"]["type"] == "aws"
    # Our own command lists replace Ray's AWS defaults (which would pip-install a nightly wheel).
    assert not any("ray-wheels" in c for c in prepared["head_setup_commands"] + prepared["worker_setup_commands"])


def test_cluster_yaml_is_complete_for_the_raw_schema(cluster):
    # Stricter than needed (prepare_config would fill gaps), but keeps the file self-describing.
    jsonschema.validate(cluster, SCHEMA)


def test_image_is_pinned_to_installed_ray(cluster):
    image = cluster["docker"]["image"]
    m = IMAGE_RE.match(image)
    assert m, f"{image!r} is not a pinned rayproject/ray:<version>-py3XX-gpu image"
    assert m["version"] == ray.__version__, f"image pins Ray {m['version']}, .venv has {ray.__version__}"
    assert "ray-ml" not in image and "latest" not in image
    for key in ("head_image", "worker_image"):
        assert key not in cluster["docker"], "one image for head and workers"


def test_node_types_cpu_head_and_autoscaling_gpu_workers(cluster):
    prepared = ray_validate(cluster)
    types = prepared["available_node_types"]
    head = types[prepared["head_node_type"]]
    assert head["resources"].get("GPU") == 0 and head["resources"].get("CPU", 0) > 0
    assert head["max_workers"] == 0
    gpu_workers = {name: t for name, t in types.items()
                   if name != prepared["head_node_type"] and t["resources"].get("GPU", 0) > 0}
    assert gpu_workers, "no GPU worker node type"
    for name, t in gpu_workers.items():
        assert t["min_workers"] == 0 and t["max_workers"] > 0, name
        assert t["max_workers"] <= prepared["max_workers"], name
    assert "--num-gpus=0" in " ".join(prepared["head_start_ray_commands"])


def test_nodes_install_the_repo(cluster):
    assert cluster["file_mounts"] == {"~/orbitgen": "."}
    install = [c for c in cluster["setup_commands"] if '-e "$HOME/orbitgen' in c]
    assert len(install) == 1 and "--no-build-isolation" in install[0]
    assert "orbitgen[geo]" in install[0], "nodes tile large GeoTIFF scenes with the geo extra (rasterio)"
    # Ray must stay the image's version when pip resolves orbitgen's dependencies.
    assert any(f"=={ray.__version__}" in c for c in cluster["setup_commands"])


def test_nodes_install_torch_and_deepspeed_without_a_cuda_toolkit(cluster):
    # The torch build comes from infra/setup.sh's driver -> wheel-line choice (its tests:
    # tests/unit/infra/test_setup_gpu_branch.py), not the registry's default build.
    commands = cluster["setup_commands"]
    assert not any(re.search(r"pip install (-q )?torch(\s|$)", c) for c in commands)
    assert any("infra/setup.sh --torch-args" in c for c in commands)
    install = next(c for c in commands if '-e "$HOME/orbitgen' in c)
    # DeepSpeed's setup.py runs nvcc in its op checks unless told not to: no nvcc on the image's runtime.
    assert "DS_BUILD_OPS=0" in install and "DS_IGNORE_CUDA_DETECTION=1" in install
    # A GPU node whose torch sees no GPU fails its set-up instead of joining as a CPU node.
    assert any("nvidia-smi -L" in c and "torch.cuda.is_available()" in c for c in commands)
    for c in commands:
        assert subprocess.run(["bash", "-n", "-c", c]).returncode == 0, c


def test_dashboard_listens_on_loopback_only(cluster):
    # The Jobs API runs whatever it is sent: reachable only through `ray dashboard`'s SSH tunnel.
    start = " ".join(ray_validate(cluster)["head_start_ray_commands"])
    hosts = re.findall(r"--dashboard-host[= ](\S+)", start)
    assert hosts == ["127.0.0.1"], hosts
    assert "0.0.0.0" not in start


def test_no_credentials_and_auth_never_disabled(cluster):
    text = CLUSTER_YAML.read_text()
    assert not re.search(r"(AKIA|ASIA)[0-9A-Z]{16}", text), "an AWS access key id"
    assert not re.search(r"RAY_AUTH_MODE\s*=\s*disabled", text)
    options = " ".join(cluster["docker"]["run_options"])
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "PASSWORD"):
        assert name not in options, name
    # S3 from the GPU workers through an instance profile, not through forwarded keys.
    prepared = ray_validate(cluster)
    for name, t in prepared["available_node_types"].items():
        if name != prepared["head_node_type"]:
            assert "IamInstanceProfile" in t["node_config"], name


@pytest.mark.parametrize("breakage", [
    "unknown_top_level_key", "max_workers_not_an_int", "negative_gpu_count",
    "unknown_docker_key", "head_type_missing", "node_type_without_resources",
])
def test_broken_copies_fail_validation(cluster, breakage):
    bad = copy.deepcopy(cluster)
    worker = next(n for n in bad["available_node_types"] if n != bad["head_node_type"])
    if breakage == "unknown_top_level_key":
        bad["max_worker"] = 4  # typo of max_workers
    elif breakage == "max_workers_not_an_int":
        bad["max_workers"] = "eight"
    elif breakage == "negative_gpu_count":
        bad["available_node_types"][worker]["resources"]["GPU"] = -1
    elif breakage == "unknown_docker_key":
        bad["docker"]["run_option"] = ["--gpus all"]  # typo of run_options
    elif breakage == "head_type_missing":
        bad["head_node_type"] = "no.such.type"
    elif breakage == "node_type_without_resources":
        del bad["available_node_types"][worker]["resources"]
    with pytest.raises((jsonschema.ValidationError, ValueError)):
        ray_validate(bad)


# ------------------------------------------------------------------------------ Dockerfile

def test_dockerfile_uses_the_same_pinned_ray_image():
    text = DOCKERFILE.read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S*)$", text, flags=re.M))
    assert args.get("RAY_VERSION") == ray.__version__
    froms = re.findall(r"^FROM (\S+)", text, flags=re.M)
    assert froms == ["rayproject/ray:${RAY_VERSION}-${PYTHON_TAG}-gpu"]
    assert re.fullmatch(r"py3\d+", args.get("PYTHON_TAG", ""))
    cluster_image = yaml.safe_load(CLUSTER_YAML.read_text())["docker"]["image"]
    assert cluster_image == f"rayproject/ray:{args['RAY_VERSION']}-{args['PYTHON_TAG']}-gpu"
    assert "--no-build-isolation" in text
    assert "RAY_USAGE_STATS_ENABLED=0" in text
    # Only directories that exist are copied (a missing COPY source fails the build).
    copied = []
    for line in re.findall(r"^COPY (.+)$", text, flags=re.M):
        args = [a for a in line.split() if not a.startswith("--")]
        copied += args[:-1]
    assert {"pyproject.toml", "jobs", "models"} <= set(copied)
    for src in copied:
        assert (REPO / src).exists(), src
