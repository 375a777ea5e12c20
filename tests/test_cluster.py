"""The cluster configs in cluster/: the `ray up` YAML against Ray's own schema, the KubeRay RayJob's
fields srd-ray relies on, and the image they share."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import jsonschema
import ray
import yaml

from srd_ray.spec import load_spec

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"


def _ray_version_tag(image: str) -> str:
    return image.rsplit(":", 1)[1].split("-")[0]


def test_ray_up_config_matches_the_installed_rays_schema():
    schema_path = Path(ray.__file__).parent / "autoscaler" / "ray-schema.json"
    schema = json.loads(schema_path.read_text())
    config = yaml.safe_load((CLUSTER / "ray-up-gpu.yaml").read_text())
    jsonschema.validate(config, schema)

    node_types = config["available_node_types"]
    assert config["head_node_type"] in node_types
    gpu_types = [name for name, node in node_types.items() if node["resources"].get("GPU", 0) > 0]
    assert gpu_types, "no GPU worker type"
    assert node_types[config["head_node_type"]]["resources"].get("GPU", 0) == 0
    assert sum(node_types[name]["max_workers"] for name in gpu_types) <= config["max_workers"]
    # The dashboard / job server must not listen on every interface.
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start


def test_kuberay_rayjob_runs_a_valid_job_spec_on_gpu_workers():
    manifest = yaml.safe_load((CLUSTER / "kuberay-rayjob.yaml").read_text())
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == "RayJob"
    spec = manifest["spec"]
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == ray.__version__

    # The entrypoint is `srd run <jobs/X.yaml in the image> --set ...`: that spec exists here and validates
    # with the same overrides.
    words = shlex.split(spec["entrypoint"])
    assert words[:2] == ["srd", "run"]
    job = ROOT / "jobs" / Path(words[2]).name
    overrides = [words[i + 1] for i, word in enumerate(words) if word == "--set"]
    job_spec = load_spec(job, overrides)
    yaml.safe_load(spec["runtimeEnvYAML"])

    head = cluster["headGroupSpec"]
    assert head["rayStartParams"].get("num-cpus") == "0"
    workers = cluster["workerGroupSpecs"]
    gpu_groups = [
        group
        for group in workers
        if int(group["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0)) > 0
    ]
    assert gpu_groups
    # The run directory must be on the volume every pod mounts.
    for pod in [head, *workers]:
        mounts = {m["mountPath"] for c in pod["template"]["spec"]["containers"] for m in c["volumeMounts"]}
        assert any(str(job_spec.run.output_dir).startswith(path) for path in mounts), mounts
    # Enough GPU actors for the spec: reflect, distill and evaluate each fit the largest worker group.
    gpus = max(
        int(group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]) * group["maxReplicas"]
        for group in gpu_groups
    )
    assert job_spec.distill.num_workers <= gpus and job_spec.reflect.concurrency <= gpus


def test_configs_and_dockerfile_share_one_image_on_the_installed_ray():
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    base = re.search(r"^FROM (\S+)", dockerfile, re.MULTILINE).group(1)
    assert _ray_version_tag(base) == ray.__version__
    ray_up = yaml.safe_load((CLUSTER / "ray-up-gpu.yaml").read_text())
    manifest = yaml.safe_load((CLUSTER / "kuberay-rayjob.yaml").read_text())
    cluster = manifest["spec"]["rayClusterSpec"]
    pods = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    images = {c["image"] for pod in pods for c in pod["template"]["spec"]["containers"]}
    assert images == {ray_up["docker"]["image"]}
