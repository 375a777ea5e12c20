"""Defaults that keep a user's machine and cluster safe: a private local Ray whose dashboard serves
127.0.0.1 only, behind Ray's token auth; no remote code, safetensors only (YAML safe_load is in
tests/test_bad_input.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from srd_ray import models
from srd_ray.spec import ModelSpec

PRIVATE_RAY = """
import json, pathlib, ray, urllib.error, urllib.request
from ray._private.authentication.authentication_utils import is_token_auth_enabled
from srd_ray.pipeline import ensure_ray
from srd_ray.spec import RaySpec

ensure_ray(RaySpec(num_cpus=1, object_store_memory_mb=100))
class Double:
    def __call__(self, batch):
        return {"id": batch["id"] * 2}
# Actors and tasks still work with the token in place.
total = sum(ray.data.range(8).map_batches(Double, compute=ray.data.ActorPoolStrategy(size=1)).to_pandas()["id"])
url = ray._private.worker._global_node.address_info.get("webui_url")
try:
    status = urllib.request.urlopen(f"http://{url}/api/version", timeout=10).status
except urllib.error.HTTPError as error:
    status = error.code
print(json.dumps({
    "token_auth": is_token_auth_enabled(),
    "token_file": (pathlib.Path.home() / ".ray" / "auth_token").exists(),
    "dashboard_url": url,
    "dashboard_without_token": status,
    "total": int(total),
}))
"""


@pytest.mark.slow
def test_private_local_ray_keeps_token_auth_and_serves_its_dashboard_on_loopback_only(tmp_path):
    env = {key: value for key, value in os.environ.items() if key not in ("RAY_AUTH_MODE", "RAY_ADDRESS")}
    result = subprocess.run(
        [sys.executable, "-c", PRIVATE_RAY], capture_output=True, text=True, timeout=180,
        env={**env, "HOME": str(tmp_path)},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    facts = json.loads(result.stdout.strip().splitlines()[-1])
    assert facts["token_auth"] and facts["token_file"], facts
    assert facts["dashboard_url"].startswith("127.0.0.1:"), "the dashboard serves this machine only"
    assert facts["dashboard_without_token"] == 401, "and only to clients holding the token"
    assert facts["total"] == 56, "an actor-pool job must still run with the token in place"


def test_models_load_safetensors_only_and_no_remote_code_by_default(monkeypatch, tiny_models):
    seen: dict = {}

    def from_pretrained(path, **kwargs):
        seen.update(kwargs)
        raise OSError("stop here")

    monkeypatch.setattr(models.AutoModelForCausalLM, "from_pretrained", from_pretrained)
    spec = ModelSpec(path=tiny_models["student"])
    assert spec.trust_remote_code is False
    with pytest.raises(models.ModelError, match="stop here"):
        models.load_model(spec)
    assert seen["use_safetensors"] is True and seen["trust_remote_code"] is False
