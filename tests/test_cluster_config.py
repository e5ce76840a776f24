"""ray_cluster.yaml and the Serve configs are real configs: checked against Ray's own schemas."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cluster() -> dict:
    return yaml.safe_load((ROOT / "ray_cluster.yaml").read_text())


def test_cluster_yaml_matches_ray_schema(cluster):
    import jsonschema
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(cluster, schema)
    broken = {**cluster, "available_node_types": {**cluster["available_node_types"], "bad": {"resources": {"CPU": "many"}}}}
    with pytest.raises(jsonschema.ValidationError):  # the check has teeth
        jsonschema.validate(broken, schema)


def test_cluster_yaml_passes_ray_validation_with_defaults(cluster):
    """What `ray up` does before it touches a cloud: fill in the provider's defaults, validate."""
    from ray.autoscaler._private.util import fillout_defaults, validate_config

    validate_config(fillout_defaults(cluster))


def test_cluster_has_cpu_and_gpu_workers_and_installs_the_package(cluster):
    types = cluster["available_node_types"]
    assert cluster["head_node_type"] in types
    workers = {n: t for n, t in types.items() if n != cluster["head_node_type"]}
    assert any(t["resources"].get("GPU", 0) >= 1 for t in workers.values())
    assert any("GPU" not in t["resources"] and t["resources"]["CPU"] > 0 for t in workers.values())
    assert types[cluster["head_node_type"]]["resources"]["CPU"] == 0  # work goes to workers
    # every node installs this repository, pinned by constraints.txt, and gets the generators
    mount = {Path(k).name: v for k, v in cluster["file_mounts"].items()}
    assert mount["weightgen"] == "."
    for name, t in {**workers, "head": {"worker_setup_commands": cluster["head_setup_commands"]}}.items():
        cmds = " ; ".join(t["worker_setup_commands"])
        assert "-c constraints.txt -e ." in cmds and (ROOT / "constraints.txt").is_file(), name
        assert "weightgen/generators" in cmds, name
    assert any("WEIGHTGEN_ZOO=s3://" in c for c in cluster["setup_commands"])
    assert any("serve deploy serving/serve_config.cluster.yaml" in c for c in cluster["head_start_ray_commands"])
    # the commands in its header point at files that exist
    for path in re.findall(r"serving/[\w.]+\.yaml", (ROOT / "ray_cluster.yaml").read_text()):
        assert (ROOT / path).is_file(), path


@pytest.mark.parametrize("name", ["serve_config.yaml", "serve_config.cluster.yaml"])
def test_serve_configs_match_ray_serve_schema(name):
    from ray.serve.schema import ServeDeploySchema

    from serving.app import GeneratorDeployment, Ingress
    from serving.schemas import ServeArgs

    cfg = ServeDeploySchema.model_validate(yaml.safe_load((ROOT / "serving" / name).read_text()))
    (app,) = cfg.applications
    assert app.import_path == "serving.app:build_app"
    assert {d.name for d in app.deployments} == {Ingress.name, GeneratorDeployment.name}
    args = ServeArgs.model_validate(app.args)  # what Serve does with them: a misspelt key is an error
    assert set(app.args) == set(ServeArgs.model_fields) - {"home", "generator_replicas", "upload_expansion"}
    assert not args.show_server_paths


def test_cluster_ports_are_protected(cluster):
    """Ray's ports: open only between the cluster's nodes (plus 8000 to the load balancer), token
    auth on every node with the same token, the dashboard on loopback, the proxies' header cap."""
    perms = cluster["provider"]["security_group"]["IpPermissions"]
    assert [(p["FromPort"], p["ToPort"]) for p in perms] == [(8000, 8000)]
    assert all("IpRanges" not in p and p["UserIdGroupPairs"] for p in perms)  # never 0.0.0.0/0
    assert cluster["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    starts = [c for c in cluster["head_start_ray_commands"] + cluster["worker_start_ray_commands"] if "ray start" in c]
    assert len(starts) == 2
    for c in starts:
        assert "RAY_AUTH_MODE=token" in c and "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=serving.proxy:setup" in c
        assert "0.0.0.0" not in c
    assert "--dashboard-host=127.0.0.1" in starts[0]
    assert any("RAY_AUTH_MODE=token" in c for c in cluster["setup_commands"])
