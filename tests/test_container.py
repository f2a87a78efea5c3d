"""The CPU image: what its runtime stages must install, and the image itself built and run for real.

Fast, always: the shared libraries that the installed Python packages link (read from their ELF
dynamic sections) are bundled in the wheels, come with every base image, or are installed by apt in
both runtime stages (cpu and gpu-base), and the two stages' setup agrees.

Slow (a few minutes), only with JANUS_CONTAINER_TEST=1, which .ci/run sets: start a private Docker
engine, make a Debian base with debootstrap (Docker Hub is not needed; the tarball is cached under
~/.cache/janus-server/container-test/), build `--target cpu` from the unmodified Dockerfile with the
legacy builder, run it with janus-tiny and check it from outside. Needs root, dockerd (apt: docker.io),
debootstrap and the docker CLI. There is no container network: everything runs with `--network host`.
"""
from __future__ import annotations

import base64
import contextlib
import importlib.metadata
import io
import json
import os
import re
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from test_deploy import (
    DOCKERFILE, ENTRYPOINT, HEALTHCHECK, ROOT, InFlightGeneration, dockerfile_stages, stage_values,
    wait_until_ready,
)

RUNTIME_STAGES = ("cpu", "gpu-base")
# What the gpu-base stage installs beyond the cpu stage: the slim Python image has these, the CUDA image does not.
GPU_BASE_EXTRAS = {"python3.11", "python3.11-venv", "ca-certificates"}

# Libraries every base image has. glibc's (libc6) are in every Debian/Ubuntu image; libstdc++6 and libgcc-s1
# are dependencies of apt, which both runtime stages run, and zlib1g one of dpkg.
BASE_LIBRARIES = {
    "libc.so.6", "libm.so.6", "libpthread.so.0", "libdl.so.2", "librt.so.1", "libutil.so.1", "libresolv.so.2",
    "ld-linux-x86-64.so.2", "ld-linux-aarch64.so.1", "libstdc++.so.6", "libgcc_s.so.1", "libz.so.1",
}
# Libraries the runtime stages must install, and the Debian/Ubuntu package (same name in both) that has each.
APT_LIBRARIES = {
    "libgomp.so.1": "libgomp1",  # GNU OpenMP: Paddle's libcommon.so, libdnnl.so.3, libwarpctc.so
}
# Linked by a library that the server never loads, with the reason.
NEVER_LOADED = {
    "libOpenCL.so.1": "OpenVINO's Intel GPU plugin; the server compiles its OpenVINO models for the CPU device only",
}

CONTAINER_TEST = "JANUS_CONTAINER_TEST"
CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "janus-server" / "container-test"
BASE_TARBALL = CACHE / "debootstrap-bookworm-minbase.tar"
REPORT = CACHE / "report.txt"
BASE_PACKAGES = "python3,python3-venv,ca-certificates"
BASE_IMAGE = "janus-base:bookworm"
IMAGE = "janus-server:container-test"
CA_BUNDLE = Path(os.environ.get("SSL_CERT_FILE") or "/etc/ssl/certs/ca-certificates.crt")
# docker-compose.yml's stop_grace_period: more than the server's 60 s drain.
STOP_GRACE = 120
UID = 10001
GOLDEN_IMAGE = ROOT / "tests" / "golden" / "janus-tiny" / "images" / "img0_rgb_300x200.png"
# Both the legacy builder and BuildKit know these; anything else (--chmod, --link, --mount, ...) is BuildKit's.
LEGACY_FLAGS = {
    "FROM": {"--platform"}, "COPY": {"--from", "--chown"}, "ADD": {"--chown"},
    "HEALTHCHECK": {"--interval", "--timeout", "--start-period", "--retries"},
}


# What the runtime stages install


def elf_needed(path: Path) -> list[str] | None:
    """The DT_NEEDED names of a 64-bit little-endian ELF file (what `readelf -d` lists as NEEDED); None if not ELF."""
    with open(path, "rb") as f:
        header = f.read(64)
        if header[:4] != b"\x7fELF":
            return None
        assert header[4:6] == b"\x02\x01", f"{path}: not a 64-bit little-endian ELF file"
        (section_offset,) = struct.unpack_from("<Q", header, 0x28)
        entry_size, count = struct.unpack_from("<HH", header, 0x3A)

        def section(index: int) -> tuple[int, int, int, int]:
            f.seek(section_offset + index * entry_size)
            _, kind, _, _, offset, size, link = struct.unpack("<IIQQQQI", f.read(44))
            return kind, offset, size, link

        for index in range(count):
            kind, offset, size, link = section(index)
            if kind != 6:  # SHT_DYNAMIC
                continue
            _, strings_offset, strings_size, _ = section(link)
            f.seek(strings_offset)
            strings = f.read(strings_size)
            f.seek(offset)
            entries = f.read(size)
            names = []
            for tag, value in struct.iter_unpack("<qQ", entries):
                if tag == 0:  # DT_NULL
                    break
                if tag == 1:  # DT_NEEDED
                    names.append(strings[value:strings.index(b"\0", value)].decode())
            return names
        return []  # statically linked


def runtime_distributions() -> list[importlib.metadata.Distribution]:
    """janus-server and everything it needs at run time (its extras, e.g. the test tools, left out)."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    found: dict[str, importlib.metadata.Distribution] = {}
    todo: list[tuple[str, tuple[str, ...]]] = [("janus-server", ())]
    done: set[tuple[str, tuple[str, ...]]] = set()
    while todo:
        name, extras = todo.pop()
        if (canonicalize_name(name), extras) in done:
            continue
        done.add((canonicalize_name(name), extras))
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            pytest.fail(f"{name} is not installed: pip install -c constraints.txt -e '.[test]'")
        found[canonicalize_name(name)] = dist
        for line in dist.requires or []:
            requirement = Requirement(line)
            marker = requirement.marker
            if marker is None or any(marker.evaluate({"extra": extra}) for extra in ("", *extras)):
                todo.append((requirement.name, tuple(sorted(requirement.extras))))
    return list(found.values())


def shared_objects(dist: importlib.metadata.Distribution) -> list[Path]:
    paths = [Path(dist.locate_file(f)) for f in dist.files or []]
    return [p for p in paths if re.search(r"\.so(\.\d+)*$", p.name) and p.is_file()]


def apt_packages(stage: str) -> set[str]:
    """The packages of the stage's `apt-get install` commands."""
    packages: set[str] = set()
    for run in stage_values(stage, "RUN"):
        for command in run.split("&&"):
            words = shlex.split(command)
            if words[:2] == ["apt-get", "install"]:
                packages |= {w for w in words[2:] if not w.startswith("-")}
    return packages


def setup_commands(stage: str) -> list[str]:
    """The stage's RUN commands other than apt's own, whitespace normalized."""
    commands = []
    for run in stage_values(stage, "RUN"):
        commands += [" ".join(c.split()) for c in run.split("&&") if not c.split()[0] == "apt-get"]
    return commands


def test_runtime_stages_install_every_library_the_packages_link():
    dists = runtime_distributions()
    names = {d.metadata["Name"] for d in dists}
    assert {"paddlepaddle", "openvino"} <= names, names
    objects = [p for d in dists for p in shared_objects(d)]
    bundled = {p.name for d in dists for p in map(Path, d.files or [])}
    needed_by: dict[str, list[str]] = {}
    for path in objects:
        for library in elf_needed(path) or []:
            if library not in bundled and library not in BASE_LIBRARIES:
                needed_by.setdefault(library, []).append(path.name)
    assert "libgomp.so.1" in needed_by, "Paddle stopped linking libgomp: update APT_LIBRARIES"
    unmapped = {lib: users for lib, users in needed_by.items() if lib not in APT_LIBRARIES and lib not in NEVER_LOADED}
    assert not unmapped, (f"libraries neither bundled, in every base nor mapped to a Debian package in "
                          f"APT_LIBRARIES (library: the shared objects that link it): {unmapped}")
    for stage in RUNTIME_STAGES:
        missing = {APT_LIBRARIES[lib]: needed_by[lib] for lib in needed_by if lib in APT_LIBRARIES
                   and APT_LIBRARIES[lib] not in apt_packages(stage)}
        assert not missing, f"the {stage} stage does not install (package: the shared objects that need it) {missing}"


def test_runtime_stages_agree():
    cpu, gpu = (apt_packages(stage) for stage in RUNTIME_STAGES)
    assert cpu and gpu - cpu == GPU_BASE_EXTRAS and cpu <= gpu, (cpu, gpu)
    assert setup_commands("cpu") == setup_commands("gpu-base")
    assert any(c.startswith(f"useradd --no-log-init --uid {UID}") for c in setup_commands("cpu"))


def test_dockerfile_builds_without_buildkit():
    assert not re.search(r"^#\s*syntax\s*=", DOCKERFILE.read_text(), re.MULTILINE | re.IGNORECASE), (
        "the legacy builder (DOCKER_BUILDKIT=0) knows no `# syntax=` line")
    for stage, instructions in dockerfile_stages().items():
        for instruction, rest in instructions:
            flags = {word.split("=")[0] for word in rest.split() if word.startswith("--")}
            if instruction in ("RUN", "COPY", "ADD"):
                assert "<<" not in rest, f"{stage}: heredocs are BuildKit's: {instruction} {rest}"
            if instruction in ("RUN", "ENTRYPOINT", "CMD"):
                continue  # their flags belong to the command
            unknown = flags - LEGACY_FLAGS.get(instruction, set())
            assert not unknown, f"{stage}: {instruction} {sorted(unknown)} is BuildKit-only: {rest}"


def test_copied_scripts_are_executable():
    """Without COPY --chmod the image keeps the mode of the build context, which is git's."""
    for script in (ENTRYPOINT, HEALTHCHECK):
        assert script.stat().st_mode & 0o111 == 0o111, f"{script} is not executable"
        if shutil.which("git") and (ROOT / ".git").exists():
            listed = subprocess.run(["git", "ls-files", "-s", str(script)], cwd=ROOT, capture_output=True,
                                    text=True).stdout
            assert listed.startswith("100755"), f"git keeps {script} without its x bit: {listed!r}"


def test_ci_runs_the_container_test():
    assert f"{CONTAINER_TEST}=1" in (ROOT / ".ci" / "run").read_text()


# The image, built and run


class Docker:
    """A private dockerd: its own data root, exec root, pid file and socket, no bridge and no iptables."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.socket = folder / "docker.sock"
        self.env = {**os.environ, "DOCKER_HOST": f"unix://{self.socket}", "DOCKER_BUILDKIT": "0"}
        self.env.pop("DOCKER_CONTEXT", None)
        self.log = open(folder / "dockerd.log", "wb")
        self.process = subprocess.Popen(
            ["dockerd", "--bridge=none", "--iptables=false", "--ip-masq=false", "--data-root", str(folder / "data"),
             "--exec-root", str(folder / "exec"), "--pidfile", str(folder / "dockerd.pid"), "-H", self.env["DOCKER_HOST"]],
            stdout=self.log, stderr=subprocess.STDOUT)

    def wait(self) -> None:
        deadline = time.monotonic() + 60
        while self.run("version", check=False, timeout=30).returncode != 0:
            assert self.process.poll() is None, f"dockerd exited with {self.process.returncode}:\n{self.output()}"
            assert time.monotonic() < deadline, f"dockerd did not answer within 60 s:\n{self.output()}"
            time.sleep(0.5)

    def output(self) -> str:
        return (self.folder / "dockerd.log").read_text(errors="replace")[-4000:]

    def run(self, *args: str, check: bool = True, timeout: float = 120, **kwargs) -> subprocess.CompletedProcess:
        kwargs.setdefault("capture_output", True)
        result = subprocess.run(["docker", *args], env=self.env, text=True, timeout=timeout, **kwargs)
        if check:
            assert result.returncode == 0, f"docker {shlex.join(args)}: {result.stdout}{result.stderr}"
        return result

    def close(self) -> None:
        containers = self.run("ps", "-aq", check=False).stdout.split()
        if containers:
            self.run("rm", "-f", "-v", *containers, check=False)
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()
        # Whatever dockerd left mounted under its roots, deepest first, then the folder with images and volumes.
        mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()]
        for mount in sorted((m for m in mounts if m.startswith(f"{self.folder}/")), key=len, reverse=True):
            subprocess.run(["umount", "-l", mount], capture_output=True)
        shutil.rmtree(self.folder, ignore_errors=True)


def debian_mirror() -> str:
    """The Debian mirror apt is configured with (one-line or deb822 sources), else deb.debian.org."""
    sources = Path("/etc/apt")
    for path in [sources / "sources.list", *sorted((sources / "sources.list.d").glob("*.list"))]:
        if path.is_file():
            for line in path.read_text().splitlines():
                match = re.match(r"deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+bookworm\s", line.strip())
                if match:
                    return match.group(1)
    for path in sorted((sources / "sources.list.d").glob("*.sources")):
        for block in path.read_text().split("\n\n"):
            fields = dict(re.findall(r"^(\w[\w-]*):\s*(.*)$", block, re.MULTILINE))
            if "deb" in fields.get("Types", "").split() and "bookworm" in fields.get("Suites", "").split():
                return fields["URIs"].split()[0]
    return "http://deb.debian.org/debian"


def make_base_tarball(folder: Path) -> None:
    """Debian bookworm minbase with Python, as a tarball for `docker import` (the python:3.11-slim stand-in)."""
    root = folder / "base-root"
    result = subprocess.run(["debootstrap", "--variant=minbase", f"--include={BASE_PACKAGES}", "bookworm", str(root),
                             debian_mirror()], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"debootstrap failed:\n{result.stdout[-3000:]}{result.stderr[-3000:]}"
    (root / "usr/local/bin/python").symlink_to("/usr/bin/python3")  # as in the python images
    for leftover in [*(root / "var/cache/apt/archives").glob("*.deb"), root / "etc/resolv.conf", root / "etc/hostname"]:
        leftover.unlink(missing_ok=True)  # downloaded packages, and the host's name and DNS
    shutil.rmtree(root / "var/lib/apt/lists", ignore_errors=True)
    CACHE.mkdir(parents=True, exist_ok=True)
    partial = BASE_TARBALL.with_suffix(".partial")
    subprocess.run(["tar", "-C", str(root), "-cf", str(partial), "."], check=True, timeout=300)
    partial.rename(BASE_TARBALL)
    shutil.rmtree(root)


def base_settings() -> list[str]:
    """ENV for the base image: this machine's CA bundle (TLS to the package index passes through its CA), and the
    pip settings of the environment that also work inside a container. Nothing site-specific is in the Dockerfile."""
    env = {"PIP_CERT": "/etc/ssl/certs/ca-certificates.crt", "SSL_CERT_FILE": "/etc/ssl/certs/ca-certificates.crt"}
    for name in ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_TRUSTED_HOST", "PIP_DEFAULT_TIMEOUT"):
        value = os.environ.get(name)
        if value and "file:" not in value:  # the host's local folders are not in the container
            env[name] = value
    return [f"--change=ENV {name}={value}" for name, value in env.items()]


def import_base(docker: Docker) -> None:
    """docker import the cached tarball, with this machine's CA bundle in place of Debian's."""
    bundle = "./etc/ssl/certs/ca-certificates.crt"
    output = open(docker.folder / "import.log", "w+")
    importer = subprocess.Popen(["docker", "import", *base_settings(), "-", BASE_IMAGE], env=docker.env,
                                stdin=subprocess.PIPE, stdout=output, stderr=subprocess.STDOUT)
    with tarfile.open(BASE_TARBALL, "r|") as source, tarfile.open(fileobj=importer.stdin, mode="w|") as target:
        for member in source:
            if member.name != bundle:
                target.addfile(member, source.extractfile(member) if member.isfile() else None)
        info = tarfile.TarInfo(bundle)
        info.size, info.mode = CA_BUNDLE.stat().st_size, 0o644
        with open(CA_BUNDLE, "rb") as ca:
            target.addfile(info, ca)
    importer.stdin.close()
    with output:
        assert importer.wait(timeout=300) == 0, f"docker import: {output.seek(0) or output.read()}"


FIGURES: dict[str, str] = {}


def report(config: pytest.Config) -> None:
    """The image's figures on the terminal (past pytest's capture) and in REPORT."""
    text = "container test: " + ", ".join(f"{k} {v}" for k, v in FIGURES.items())
    CACHE.mkdir(parents=True, exist_ok=True)
    REPORT.write_text(text + "\n")
    capture = config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        print(f"\n{text} (also in {REPORT})", file=sys.stderr, flush=True)


@pytest.fixture(scope="module")
def docker(request):
    if os.environ.get(CONTAINER_TEST) != "1":
        pytest.skip(f"the image build and run take minutes: set {CONTAINER_TEST}=1 (.ci/run does) to run them")
    # Asked for explicitly, so what is missing fails rather than skips.
    missing = [f"{tool} ({hint})" for tool, hint in (("dockerd", "apt-get install docker.io"), ("docker", "docker.io"),
                                                    ("debootstrap", "apt-get install debootstrap"))
               if not shutil.which(tool)]
    if os.geteuid() != 0:
        missing.append("root (dockerd and debootstrap run as root)")
    if missing:
        pytest.fail(f"{CONTAINER_TEST}=1 but the container test cannot run here; missing: {', '.join(missing)}")
    started = time.monotonic()
    engine = Docker(Path(tempfile.mkdtemp(prefix="janus-docker-", dir="/tmp")))
    try:
        engine.wait()
        yield engine
    finally:
        engine.close()
        FIGURES["test duration"] = f"{time.monotonic() - started:.0f} s"
        report(request.config)


@pytest.fixture(scope="module")
def image(docker):
    started = time.monotonic()
    cached = BASE_TARBALL.exists()
    if not cached:
        make_base_tarball(docker.folder)
    import_base(docker)
    FIGURES["base"] = f"{time.monotonic() - started:.0f} s ({'cached tarball' if cached else 'debootstrap'})"
    started = time.monotonic()
    log = docker.folder / "build.log"
    with open(log, "w") as out:
        result = docker.run("build", "--network", "host", "--build-arg", f"PYTHON_IMAGE={BASE_IMAGE}", "--target",
                            "cpu", "-t", IMAGE, str(ROOT), check=False, timeout=1200, capture_output=False,
                            stdout=out, stderr=subprocess.STDOUT)
    assert result.returncode == 0, f"docker build failed:\n{log.read_text()[-6000:]}"
    FIGURES["build"] = f"{time.monotonic() - started:.0f} s"
    size = int(docker.run("image", "inspect", "-f", "{{.Size}}", IMAGE).stdout)
    FIGURES["image size"] = f"{size / 1e9:.2f} GB ({size} bytes)"
    return IMAGE


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Served:
    def __init__(self, docker: Docker, name: str, port: int):
        self.docker, self.name, self.port = docker, name, port
        self.base_url = f"http://127.0.0.1:{port}"
        self.client = httpx.Client(base_url=self.base_url, timeout=300, trust_env=False)

    def logs(self) -> str:
        result = self.docker.run("logs", "--tail", "60", self.name, check=False)
        return result.stdout + result.stderr

    def state(self) -> dict:
        return json.loads(self.docker.run("inspect", "-f", "{{json .State}}", self.name).stdout)

    def exit_code(self) -> int | None:
        """None while the container runs."""
        state = self.state()
        return None if state["Running"] else state["ExitCode"]


@pytest.fixture(scope="module")
def served(docker, image):
    port = free_port()
    name = "janus-container-test"
    # The image's health check waits 10 minutes before counting failures and runs every 30 s: check every 2 s.
    docker.run("run", "-d", "--name", name, "--network", "host", "-e", "JANUS_MODEL=janus-tiny",
               "-e", "JANUS_HOST=127.0.0.1", "-e", f"JANUS_PORT={port}", "--health-interval", "2s",
               "--health-start-period", "5m", image)
    server = Served(docker, name, port)
    wait_until_ready(server.client, 300, server.exit_code, server.logs)
    yield server
    server.client.close()


container = pytest.mark.timeout(1800)  # the first test of the module also builds the image


@container
def test_image_holds_no_weights(docker, image):
    volumes = json.loads(docker.run("image", "inspect", "-f", "{{json .Config.Volumes}}", image).stdout)
    assert volumes == {"/models": {}}
    found = docker.run("run", "--rm", "--network", "host", "--user", "0", "--entrypoint", "sh", image, "-c",
                       'find / -xdev \\( -name "*.safetensors" -o -name "*.pdparams" -o -name "*.pdiparams" '
                       '-o -name "*.pdmodel" -o -name "janus-tiny" \\) -print; echo /models:; ls -A /models')
    # only the golden set of `janus-server check`: janus-tiny's 19 MB of random weights and the official outputs
    golden = "/opt/janus-server/golden/janus-tiny"
    assert found.stdout.split() == [golden, f"{golden}/model.safetensors", "/models:"], found.stdout


@container
def test_the_self_check_passes_in_the_image(docker, image):
    """`docker run IMAGE check`: the golden set through the image's own Paddle and OpenVINO, and the step timed."""
    done = docker.run("run", "--rm", "--network", "host", image, "check", "--device", "cpu", "--layers", "1",
                      "--rows", "2", "--rounds", "2", "--report", "/tmp/check.json", check=False, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    assert "passed" in done.stdout and "understanding conv1" in done.stdout and "openvino" in done.stdout


@container
def test_server_runs_as_the_image_user(served):
    script = ("import json, os\nrows = []\nfor pid in filter(str.isdigit, os.listdir('/proc')):\n    try:\n"
              "        status = open(f'/proc/{pid}/status').read()\n"
              "        args = open(f'/proc/{pid}/cmdline', 'rb').read().replace(b'\\0', b' ').decode().strip()\n"
              "    except OSError:\n        continue\n"
              "    ids = {l.split(':')[0]: l.split()[1:] for l in status.splitlines() if l.startswith(('Uid', 'Gid'))}\n"
              "    rows.append({'pid': int(pid), 'args': args, **ids})\nprint(json.dumps(rows))")
    rows = json.loads(served.docker.run("exec", served.name, "python", "-c", script).stdout)
    by_pid = {row["pid"]: row for row in rows}
    assert by_pid[1]["args"].startswith("tini -- janus-entrypoint"), rows
    servers = [row for row in rows if "janus-server serve" in row["args"]]
    assert servers, rows
    for row in rows:  # tini, the server and its workers; none is root
        assert set(row["Uid"]) == {str(UID)} and set(row["Gid"]) == {str(UID)}, row


@container
def test_understand_multipart(served):
    response = served.client.post("/understand", data={"question": "What is in this picture?", "max_new_tokens": "8"},
                                  files=[("image", ("picture.png", GOLDEN_IMAGE.read_bytes(), "image/png"))])
    assert response.status_code == 200, response.text
    answer = response.json()
    assert isinstance(answer["text"], str) and answer["usage"]["completion_tokens"] >= 1, answer


@container
def test_generate_png(served):
    from PIL import Image

    response = served.client.post("/generate", json={"prompt": "a red apple on a table", "response_format": "png"})
    assert response.status_code == 200, response.text[:500]
    assert response.headers["content-type"] == "image/png"
    image = Image.open(io.BytesIO(response.content))
    assert image.format == "PNG" and image.size == (384, 384)


@container
def test_openai_sdk_chat(served):
    import openai

    with httpx.Client(trust_env=False) as http:
        sdk = openai.OpenAI(base_url=f"{served.base_url}/v1", api_key="unused", max_retries=0, timeout=120,
                            http_client=http)
        assert "janus-tiny" in [m.id for m in sdk.models.list()]
        picture = "data:image/png;base64," + base64.b64encode(GOLDEN_IMAGE.read_bytes()).decode()
        completion = sdk.chat.completions.create(model="janus-tiny", max_tokens=8, temperature=0, messages=[{
            "role": "user", "content": [{"type": "text", "text": "What is shown?"},
                                        {"type": "image_url", "image_url": {"url": picture}}]}])
    assert isinstance(completion.choices[0].message.content, str)
    assert completion.usage.completion_tokens >= 1


@container
def test_healthcheck_turns_healthy(served):
    deadline = time.monotonic() + 60
    while (health := served.state()["Health"])["Status"] != "healthy":
        assert health["Status"] == "starting" and time.monotonic() < deadline, health
        time.sleep(1)
    assert health["Log"][-1]["ExitCode"] == 0


@container
def test_the_playground_page_is_in_the_image(served):
    """The page's files are package data of the installed (not editable) server."""
    page = served.client.get("/")
    assert page.status_code == 200 and "playground.js" in page.text
    assert served.client.get("/playground/playground.js").status_code == 200


@container
def test_docker_stop_drains_the_running_request_and_exits_0(served):
    in_flight = InFlightGeneration(served.base_url, served.client, 4, "`docker stop`")
    started = time.monotonic()
    served.docker.run("stop", "-t", str(STOP_GRACE), served.name, timeout=STOP_GRACE + 60)
    stopped = time.monotonic() - started
    assert len(in_flight.response(f"\n{served.logs()}").json()["images"]) == 4
    state = served.state()
    assert not state["OOMKilled"]
    assert stopped < STOP_GRACE, f"docker stop took {stopped:.0f} s: the server did not stop within the grace period"
    assert state["ExitCode"] == 0, f"exit code {state['ExitCode']}:\n{served.logs()}"
    FIGURES["docker stop"] = f"{stopped:.1f} s"
