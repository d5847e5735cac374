"""The deployment files against the code and against each other.

Dockerfile and .dockerignore: parsed (dockerfile-parse) and checked for what the service needs in a
container. docker-compose.yml, alone and merged with docker/compose.gpu.yml: validated and normalised by
`docker-compose config` (Debian's docker-compose 1.29; no Docker daemon needed), then checked. Prometheus:
`promtool check config`, then the scrape job. Grafana: the provisioning files.

docker-compose and promtool come from the Debian packages that `make test` installs (the Makefile's
DEBIAN_PACKAGES); without them these tests fail, they never skip.

Not checked here, since it needs a Docker daemon, the network or a GPU: building the image, running the
containers, Grafana itself.
"""

from __future__ import annotations

import functools
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import tomllib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml
from dockerfile_parse import DockerfileParser

from app.serve.settings import ServeSettings

ROOT = Path(__file__).parents[2]
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
COMPOSE = ROOT / "docker-compose.yml"
COMPOSE_GPU = ROOT / "docker" / "compose.gpu.yml"
PROMETHEUS_CONFIG = ROOT / "docker" / "prometheus" / "prometheus.yml"
GRAFANA = ROOT / "docker" / "grafana"
GRAFANA_DATASOURCES = GRAFANA / "provisioning" / "datasources"
GRAFANA_PROVIDERS = GRAFANA / "provisioning" / "dashboards"
GRAFANA_DASHBOARDS = GRAFANA / "dashboards"

API, PROMETHEUS, GRAFANA_SERVICE = "api", "prometheus", "grafana"
PUBLISHED = {API: 8000, PROMETHEUS: 9090, GRAFANA_SERVICE: 3000}
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
SERVER_COMMAND = ["python", "-m", "app.serve"]
WEIGHTS_MOUNT = "/models"
# app/serve/__main__.py gives uvicorn VAR_DRAIN_GRACE_S plus this for its own graceful shutdown
UVICORN_EXTRA_S = 5
DEBIAN_PACKAGE = {"docker-compose": "docker-compose", "promtool": "prometheus"}


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(
            f"{name} is not installed: `make test` installs it (Debian package {DEBIAN_PACKAGE[name]}, in the "
            "Makefile's DEBIAN_PACKAGES); `make debian-packages` installs it alone",
            pytrace=False,
        )
    return path


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


# --- Dockerfile ---------------------------------------------------------------------------------------------


@dataclass
class Instruction:
    kind: str  # upper case
    value: str
    line: int  # 1-based, where it starts


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, kind: str) -> list[Instruction]:
        return [i for i in self.instructions if i.kind == kind]

    def env(self) -> dict[str, str]:
        return {k: v for i in self.all("ENV") for k, v in key_values(i.value).items()}

    def args(self) -> dict[str, str]:
        return {k: v for i in self.all("ARG") for k, v in key_values(i.value).items()}


def key_values(value: str) -> dict[str, str]:
    """ENV and ARG arguments: `K=V K2="V 2"`, or the old `K V` form of ENV."""
    words = shlex.split(value)
    if words and "=" not in words[0]:
        return {words[0]: " ".join(words[1:])}
    return dict(w.split("=", 1) if "=" in w else (w, "") for w in words)


@functools.cache
def stages() -> tuple[Stage, ...]:
    parser = DockerfileParser(fileobj=io.BytesIO(DOCKERFILE.read_bytes()))
    found: list[Stage] = []
    for item in parser.structure:
        kind = item["instruction"].upper()
        if kind == "COMMENT":
            continue
        if kind == "FROM":
            words = item["value"].split()
            words = [w for w in words if not w.startswith("--")]  # --platform
            name = words[2] if len(words) == 3 and words[1].lower() == "as" else str(len(found))
            found.append(Stage(name=name, base=words[0]))
        elif found:
            found[-1].instructions.append(Instruction(kind, item["value"], item["startline"] + 1))
    return tuple(found)


def final() -> Stage:
    return stages()[-1]


def ancestry(s: Stage) -> list[Stage]:
    """The stage and the stages it is built FROM, the first one first."""
    by_name = {x.name: x for x in stages()}
    chain = [s]
    while chain[0].base in by_name:
        chain.insert(0, by_name[chain[0].base])
    return chain


def copy_args(ins: Instruction) -> tuple[dict[str, str], list[str]]:
    """COPY's flags (`--from`, `--chown`...) and its words: sources, then the destination."""
    words = json.loads(ins.value) if ins.value.lstrip().startswith("[") else shlex.split(ins.value)
    flags = dict(w[2:].split("=", 1) for w in words if w.startswith("--") and "=" in w)
    return flags, [w for w in words if not w.startswith("--")]


def exec_form(ins: Instruction, after: str = "") -> list[str]:
    """The JSON array of an exec-form instruction (after `after`, e.g. HEALTHCHECK's CMD); fails otherwise."""
    text = ins.value.split(after, 1)[1] if after else ins.value
    try:
        words = json.loads(text)
    except json.JSONDecodeError:
        words = None
    assert isinstance(words, list) and words and all(isinstance(w, str) for w in words), (
        f"Dockerfile line {ins.line}: {ins.kind} must be in exec form (a JSON array), so that no shell stands "
        f"between Docker and Python and SIGTERM reaches the server: {ins.value!r}"
    )
    return words


def test_dockerfile_is_multistage_and_ends_with_the_runtime_stage() -> None:
    names = [s.name for s in stages()]
    assert len(names) >= 2, "Dockerfile: a multi-stage build (dependencies, then the runtime image)"
    assert len(set(names)) == len(names), f"Dockerfile: stage names repeat: {names}"
    assert final().name == "runtime", "the last stage (the default target) is `runtime`, which compose builds"
    for i, s in enumerate(stages()):
        for ins in s.all("COPY"):
            source_stage = copy_args(ins)[0].get("from")
            if source_stage is not None:
                assert source_stage in names[:i], f"line {ins.line}: COPY --from={source_stage} is no earlier stage"


def test_dockerfile_runs_as_a_non_root_user() -> None:
    s = final()
    users = s.all("USER")
    assert users, "the runtime stage sets a non-root USER"
    starts = s.all("CMD") + s.all("ENTRYPOINT")
    assert starts, "the runtime stage has a CMD or ENTRYPOINT"
    assert users[-1].line < min(i.line for i in starts), "USER comes before CMD / ENTRYPOINT"
    user = users[-1].value.split(":")[0].strip()
    assert user not in ("root", "0", ""), f"the service runs as {users[-1].value!r}, root"


def test_dockerfile_starts_python_directly_in_exec_form() -> None:
    s = final()
    entrypoint = [exec_form(i) for i in s.all("ENTRYPOINT")][-1:]
    cmd = [exec_form(i) for i in s.all("CMD")][-1:]
    command = (entrypoint[0] if entrypoint else []) + (cmd[0] if cmd else [])
    assert command == SERVER_COMMAND, f"the container runs {command}, not {SERVER_COMMAND} (no make, no shell)"
    path = s.env().get("PATH", "")
    venv_bin = path.split(":")[0]
    copied = [copy_args(i)[1][-1].rstrip("/") for i in s.all("COPY") if "from" in copy_args(i)[0]]
    assert any(venv_bin.startswith(d + "/") for d in copied), (
        f"`python` is the one first on PATH ({venv_bin}), which is copied from the dependency stage"
    )
    for ins in s.all("STOPSIGNAL"):
        assert ins.value.strip() in ("SIGTERM", "15"), "the server drains on SIGTERM"


def test_dockerfile_healthcheck_probes_healthz_with_python() -> None:
    checks = final().all("HEALTHCHECK")
    assert checks, "the runtime stage has a HEALTHCHECK"
    words = exec_form(checks[-1], after="CMD")
    assert words[0] == "python", "slim images have no curl or wget: the health check uses Python"
    assert "/healthz" in " ".join(words), "the health check probes /healthz"
    assert "urllib.request" in " ".join(words)


def test_dockerfile_installs_torch_from_the_cpu_index_by_default() -> None:
    pin = next(
        d for d in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"] if "torch" in d
    )
    installs = [(s, i) for s in stages() for i in s.all("RUN") if "torch==" in i.value]
    assert installs, "a RUN installs torch"
    for s, ins in installs:
        args = {k: v for a in ancestry(s) for k, v in a.args().items()}
        assert args.get("TORCH_INDEX") == CPU_INDEX, (
            f"stage {s.name}: ARG TORCH_INDEX defaults to PyTorch's CPU index {CPU_INDEX}, "
            f"not {args.get('TORCH_INDEX')}"
        )
        assert re.search(r"--index-url\s+\"?\$\{?TORCH_INDEX\}?\"?", ins.value), (
            f"line {ins.line}: torch is installed with --index-url $TORCH_INDEX (a plain PyPI torch is the CUDA build)"
        )
        version = re.search(r"torch==\$\{?(\w+)\}?", ins.value)
        resolved = args.get(version.group(1)) if version else None
        assert f"torch=={resolved}" == pin.replace(" ", ""), (
            f"line {ins.line}: the torch version installed ({resolved}) is pyproject.toml's pin ({pin})"
        )
    for s in stages():
        for ins in s.all("RUN"):
            assert "--extra-index-url" not in ins.value, (
                f"line {ins.line}: no --extra-index-url (pip would pick from either index)"
            )


def test_dockerfile_caches_dependencies_apart_from_the_code() -> None:
    deps = next(s for s in stages() for i in s.all("RUN") if "torch==" in i.value)
    install = next(i for i in deps.all("RUN") if "torch==" in i.value)
    copied_before = [
        src
        for s in ancestry(deps)
        for i in s.all("COPY")
        if s is not deps or i.line < install.line
        for src in copy_args(i)[1][:-1]
    ]
    assert copied_before == ["pyproject.toml"], (
        f"only pyproject.toml is copied before the dependencies are installed, not {copied_before}"
    )
    code_copies = [i for s in stages() for i in s.all("COPY") if "app" in [p.rstrip("/") for p in copy_args(i)[1][:-1]]]
    assert code_copies, "the code (app/) is copied"
    assert all(i.line > install.line for i in code_copies), "app/ is copied after the dependencies are installed"


def test_dockerfile_service_settings() -> None:
    s = final()
    env = s.env()
    assert env.get("VAR_HOST") == "0.0.0.0", "the server listens on every interface of the container"
    check_settings(env)
    model = PurePosixPath(env["VAR_MODEL_DIR"])
    demo = [copy_args(i)[1] for i in s.all("COPY") if "model_store/demo" in [p.rstrip("/") for p in copy_args(i)[1]]]
    assert demo, "the demo model is copied into the image"
    assert model == PurePosixPath(demo[0][-1]), f"VAR_MODEL_DIR ({model}) is where the demo model is copied"
    assert not model.is_relative_to(WEIGHTS_MOUNT), f"a volume at {WEIGHTS_MOUNT} must not hide the demo model"
    assert (ROOT / "model_store" / "demo" / "config.json").is_file()


def test_dockerfile_compile_caches_in_the_volume() -> None:
    s = final()
    volumes = image_volumes()
    assert volumes, "the runtime stage declares the compile cache as a VOLUME"
    cache = PurePosixPath(s.env()["TORCHINDUCTOR_CACHE_DIR"])
    assert any(cache.is_relative_to(v) for v in volumes), f"TORCHINDUCTOR_CACHE_DIR ({cache}) is in a volume"


def image_volumes() -> list[str]:
    return [v for i in final().all("VOLUME") for v in (json.loads(i.value) if "[" in i.value else i.value.split())]


def check_settings(env: dict[str, str]) -> None:
    """Every VAR_* name is a setting of app/serve/settings.py, and the values validate."""
    known = {f"VAR_{name.upper()}" for name in ServeSettings.model_fields}
    given = {k: v for k, v in env.items() if k.startswith("VAR_")}
    assert set(given) <= known, f"not settings of ServeSettings: {sorted(set(given) - known)}"
    saved = {k: os.environ.pop(k) for k in list(os.environ) if k.startswith("VAR_")}
    try:
        os.environ.update(given)
        ServeSettings()
    finally:
        for k in given:
            os.environ.pop(k, None)
        os.environ.update(saved)


# --- .dockerignore ------------------------------------------------------------------------------------------


def ignore_patterns(text: str) -> list[tuple[bool, re.Pattern[str]]]:
    """.dockerignore lines as (exception, regex) pairs, in order (Docker's pattern syntax: `*`, `?`, `**`,
    `[...]`, `!` for an exception; paths cleaned, relative to the context)."""
    patterns = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        exception = line.startswith("!")
        path = os.path.normpath(line.removeprefix("!").strip()).lstrip("/")
        regex, i = "", 0
        while i < len(path):
            c = path[i]
            if path.startswith("**/", i):
                regex, i = regex + "(?:.*/)?", i + 3
                continue
            if path.startswith("**", i):
                regex, i = regex + ".*", i + 2
                continue
            if c == "*":
                regex += "[^/]*"
            elif c == "?":
                regex += "[^/]"
            elif c == "[":
                end = path.index("]", i)
                body = path[i + 1 : end]
                regex += "[" + ("^" + body[1:] if body[:1] in "!^" and body else body) + "]"
                i = end
            elif c == "\\" and i + 1 < len(path):
                i += 1
                regex += re.escape(path[i])
            else:
                regex += re.escape(c)
            i += 1
        patterns.append((exception, re.compile(regex + r"\Z")))
    return patterns


def ignored(path: str, patterns: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """Whether Docker leaves `path` (relative to the context) out: the last pattern that matches the path or
    one of its parent folders decides."""
    parts = path.split("/")
    prefixes = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    out = False
    for exception, regex in patterns:
        if any(regex.match(p) for p in prefixes):
            out = not exception
    return out


@functools.cache
def dockerignore() -> list[tuple[bool, re.Pattern[str]]]:
    return ignore_patterns(DOCKERIGNORE.read_text())


def test_dockerignore_matcher() -> None:
    patterns = ignore_patterns("*\n!app/\n**/__pycache__\n!keep/*.txt\nlogs/**/*.log\n")
    assert ignored("x.py", patterns) and ignored(".venv/bin/python", patterns)
    assert not ignored("app/serve/api.py", patterns)
    assert ignored("app/serve/__pycache__/api.cpython-311.pyc", patterns)
    assert not ignored("keep/a.txt", patterns) and ignored("keep/a.bin", patterns)
    assert ignored("logs/a/b/c.log", ignore_patterns("logs/**/*.log"))
    assert not ignored("logs/a/b/c.txt", ignore_patterns("logs/**/*.log"))


def context_files(path: Path) -> list[Path]:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return [p for p in files if "__pycache__" not in p.parts and not p.name.endswith(".pyc")]


def test_every_copy_source_reaches_the_build_context() -> None:
    for s in stages():
        for ins in s.all("COPY") + s.all("ADD"):
            flags, words = copy_args(ins)
            if "from" in flags:
                continue
            for source in words[:-1]:
                path = ROOT / source
                assert path.exists(), f"Dockerfile line {ins.line}: COPY source {source} does not exist"
                files = context_files(path)
                assert files, f"Dockerfile line {ins.line}: COPY source {source} is empty"
                left_out = [
                    str(p.relative_to(ROOT)) for p in files if ignored(str(p.relative_to(ROOT)), dockerignore())
                ]
                assert not left_out, f"Dockerfile line {ins.line}: .dockerignore leaves out {left_out[:5]}"


@pytest.mark.parametrize(
    "path",
    [
        ".venv/bin/python",
        ".git/HEAD",
        "runs/demo/eval.json",
        "tests/data/var_official_tiny/config.json",
        "model_store/demo_classifier/classifier.safetensors",
        "model_store/var_d16/var_d16.pth",
        "app/serve/__pycache__/api.cpython-311.pyc",
        ".mypy_cache/3.11/app/__init__.meta.json",
        "var_serve.egg-info/PKG-INFO",
    ],
)
def test_dockerignore_leaves_out(path: str) -> None:
    assert ignored(path, dockerignore()), f".dockerignore lets {path} into the build context"


# --- docker-compose -----------------------------------------------------------------------------------------


def compose_env(*files: Path) -> dict[str, str]:
    """The environment without the variables the compose files read, so that their defaults are checked."""
    names = {n for f in files for n in re.findall(r"\$\{?(\w+)", f.read_text())}
    return {k: v for k, v in os.environ.items() if k not in names and not k.startswith("COMPOSE_")}


def compose_args(*files: Path) -> list[str]:
    return [tool("docker-compose"), *(a for f in files for a in ("-f", str(f)))]


@functools.cache
def compose_config(*files: Path) -> dict[str, Any]:
    result = run(*compose_args(*files), "config", env=compose_env(*files))
    assert result.returncode == 0, f"docker-compose config failed:\n{result.stderr}"
    config = yaml.safe_load(result.stdout)
    assert isinstance(config, dict)
    return config


def service(name: str, *files: Path) -> dict[str, Any]:
    services = compose_config(*(files or (COMPOSE,)))["services"]
    assert name in services, f"docker-compose.yml: no service {name!r} (services: {list(services)})"
    return services[name]


def environment(svc: dict[str, Any]) -> dict[str, str]:
    env = svc.get("environment") or {}
    if isinstance(env, list):
        env = dict(e.split("=", 1) if "=" in e else (e, "") for e in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


@dataclass
class Port:
    host_ip: str
    published: int
    target: int


def ports(svc: dict[str, Any]) -> list[Port]:
    found = []
    for p in svc.get("ports") or []:
        if isinstance(p, dict):
            found.append(Port(str(p.get("host_ip", "")), int(p.get("published", 0)), int(p["target"])))
            continue
        m = re.fullmatch(r"(?:(?P<ip>\[[^\]]+\]|[^:]+):)?(?:(?P<published>\d+):)?(?P<target>\d+)(?:/\w+)?", str(p))
        assert m, f"unexpected port mapping {p!r}"
        found.append(Port(m["ip"] or "", int(m["published"] or 0), int(m["target"])))
    return found


@dataclass
class Mount:
    source: str
    target: str
    read_only: bool
    kind: str  # bind, volume, tmpfs


def mounts(svc: dict[str, Any], config: dict[str, Any]) -> list[Mount]:
    found = []
    for v in svc.get("volumes") or []:
        if isinstance(v, dict):
            source, target, ro = str(v.get("source", "")), str(v["target"]), bool(v.get("read_only"))
        else:
            parts = str(v).split(":")
            source, target = (parts[0], parts[1]) if len(parts) > 1 else ("", parts[0])
            ro = len(parts) > 2 and "ro" in parts[2].split(",")
        kind = "volume" if source in (config.get("volumes") or {}) else "bind"
        found.append(Mount(source, target, ro, kind))
    return found


def duration_s(value: str | int | float) -> float:
    if isinstance(value, int | float):
        return float(value) / 1e9  # compose's plain numbers are nanoseconds
    units = {"h": 3600, "m": 60, "s": 1, "ms": 1e-3, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|ms|us|m|s)", value)
    assert parts and "".join(a + b for a, b in parts) == value, f"not a duration: {value!r}"
    return sum(float(a) * units[b] for a, b in parts)


@pytest.mark.parametrize("files", [(COMPOSE,), (COMPOSE, COMPOSE_GPU)], ids=["cpu", "gpu"])
def test_compose_files_validate(files: tuple[Path, ...]) -> None:
    result = run(*compose_args(*files), "config", "-q", env=compose_env(*files))
    assert result.returncode == 0, f"docker-compose config -q failed:\n{result.stderr}"


def test_compose_services() -> None:
    assert set(compose_config(COMPOSE)["services"]) >= set(PUBLISHED)
    build = service(API).get("build") or {}
    assert Path(build.get("context", "")) == ROOT, "the API is built from the top-level folder"
    assert build.get("dockerfile", "Dockerfile") == "Dockerfile"
    assert build.get("target", final().name) == final().name, "the API image is the runtime stage"


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_compose_ports_bound_to_localhost(name: str) -> None:
    found = ports(service(name))
    assert [p.published for p in found] == [PUBLISHED[name]], f"{name} publishes port {PUBLISHED[name]} only"
    for p in found:
        assert p.host_ip == "127.0.0.1", f"{name}: port {p.published} is bound to {p.host_ip or 'every address'}"


@pytest.mark.parametrize(
    ("name", "probe"), [(API, "/healthz"), (PROMETHEUS, "/-/healthy"), (GRAFANA_SERVICE, "/api/health")]
)
def test_compose_healthchecks(name: str, probe: str) -> None:
    check = service(name).get("healthcheck") or {}
    test = check.get("test")
    assert test and not check.get("disable") and test != ["NONE"], f"{name} has a healthcheck"
    assert probe in " ".join(test if isinstance(test, list) else [test]), f"{name}'s healthcheck probes {probe}"
    if name == API:
        assert test == ["CMD", *exec_form(final().all("HEALTHCHECK")[-1], after="CMD")], (
            "the API's healthcheck is the Dockerfile's HEALTHCHECK"
        )


def test_compose_depends_on_healthy_services() -> None:
    services = compose_config(COMPOSE)["services"]
    expected = {PROMETHEUS: API, GRAFANA_SERVICE: PROMETHEUS}
    for name, dependency in expected.items():
        assert dependency in (services[name].get("depends_on") or {}), f"{name} depends on {dependency}"
    for name, svc in services.items():
        depends = svc.get("depends_on") or {}
        assert isinstance(depends, dict), f"{name}: depends_on with conditions, not a plain list"
        for dependency, how in depends.items():
            assert how.get("condition") == "service_healthy", f"{name} waits for {dependency} to be healthy"
            assert services[dependency].get("healthcheck"), f"{dependency} has a healthcheck to wait for"


def test_compose_stop_grace_period_covers_the_drain() -> None:
    api = service(API)
    drain = environment(api).get("VAR_DRAIN_GRACE_S")
    assert drain, "VAR_DRAIN_GRACE_S is set explicitly, so that stop_grace_period can be checked against it"
    assert "stop_grace_period" in api, "the API has a stop_grace_period (Docker's default, 10 s, cuts the drain)"
    grace = duration_s(api["stop_grace_period"])
    assert grace > float(drain) + UVICORN_EXTRA_S, (
        f"stop_grace_period ({grace:g} s) is longer than VAR_DRAIN_GRACE_S ({drain} s) plus uvicorn's "
        f"{UVICORN_EXTRA_S} s, or Docker kills the server in the middle of its drain"
    )


def test_compose_api_settings() -> None:
    api = service(API)
    env = environment(api)
    check_settings(env)
    assert env.get("VAR_HOST") == "0.0.0.0"
    port = int(env.get("VAR_PORT", ServeSettings.model_fields["port"].default))
    assert [p.target for p in ports(api)] == [port], "the published port is the one the server listens on"
    assert env.get("VAR_MODEL_DIR", final().env()["VAR_MODEL_DIR"]) == final().env()["VAR_MODEL_DIR"], (
        "by default compose serves the demo model inside the image"
    )


def test_compose_api_file_system() -> None:
    config = compose_config(COMPOSE)
    api = service(API)
    assert api.get("read_only") is True, "the API's root file system is read-only"
    tmpfs = api.get("tmpfs") or []
    assert "/tmp" in [t.split(":")[0] for t in ([tmpfs] if isinstance(tmpfs, str) else tmpfs)], "/tmp is a tmpfs"
    found = {m.target: m for m in mounts(api, config)}
    for target in image_volumes():
        assert target in found and found[target].kind == "volume", f"a named volume holds the compile cache {target}"
    weights = found.get(WEIGHTS_MOUNT)
    assert weights and weights.read_only, f"released weights: a read-only mount at {WEIGHTS_MOUNT}"
    assert Path(weights.source).is_dir(), f"the default weights folder {weights.source} exists"


def test_compose_named_volumes() -> None:
    config = compose_config(COMPOSE)
    volumes = set(config.get("volumes") or {})
    assert len(volumes) >= 2, "named volumes for Prometheus's data and the compile cache"
    prometheus = service(PROMETHEUS)
    storage = next(
        (a.split("=", 1)[1] for a in prometheus.get("command") or [] if a.startswith("--storage.tsdb.path=")),
        "/prometheus",
    )
    assert any(m.target == storage and m.kind == "volume" for m in mounts(prometheus, config)), (
        f"Prometheus's data ({storage}) is in a named volume"
    )
    used = {m.source for svc in config["services"].values() for m in mounts(svc, config) if m.kind == "volume"}
    assert used == volumes, f"named volumes declared but not used, or the other way round: {used ^ volumes}"


def test_compose_bind_mounts_exist() -> None:
    config = compose_config(COMPOSE)
    binds = {m.target: m for svc in config["services"].values() for m in mounts(svc, config) if m.kind == "bind"}
    for m in binds.values():
        assert Path(m.source).exists(), f"{m.source} (mounted at {m.target}) does not exist"
        assert m.read_only, f"{m.source} is mounted read-only"
    assert Path(binds["/etc/prometheus/prometheus.yml"].source) == PROMETHEUS_CONFIG
    assert "--config.file=/etc/prometheus/prometheus.yml" in service(PROMETHEUS).get("command", [])
    assert Path(binds["/etc/grafana/provisioning"].source) == GRAFANA / "provisioning"


def test_compose_gpu_override() -> None:
    cpu, gpu = service(API), service(API, COMPOSE, COMPOSE_GPU)
    devices = gpu.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices") or []
    assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices), (
        "the GPU override reserves an NVIDIA GPU"
    )
    assert not cpu.get("deploy"), "the default (CPU) service reserves no GPU"
    index = (gpu.get("build") or {}).get("args", {}).get("TORCH_INDEX")
    assert index and index != CPU_INDEX, "the GPU override builds with a CUDA torch (build arg TORCH_INDEX)"
    assert gpu.get("image") != cpu.get("image"), "the CUDA image has a tag of its own"
    assert environment(gpu).get("VAR_DEVICE", "auto").startswith(("cuda", "auto"))
    check_settings(environment(gpu))


# --- Prometheus ---------------------------------------------------------------------------------------------


def test_promtool_check_config() -> None:
    result = run(tool("promtool"), "check", "config", str(PROMETHEUS_CONFIG))
    assert result.returncode == 0, f"promtool check config failed:\n{result.stdout}{result.stderr}"


def test_prometheus_scrapes_the_api_every_5s() -> None:
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    port = int(environment(service(API)).get("VAR_PORT", 8000))
    target = f"{API}:{port}"
    jobs = [
        j
        for j in config.get("scrape_configs") or []
        if any(target in sc.get("targets", []) for sc in j.get("static_configs") or [])
    ]
    assert len(jobs) == 1, f"one scrape job has the API service's {target} as target"
    job = jobs[0]
    interval = job.get("scrape_interval", (config.get("global") or {}).get("scrape_interval", "1m"))
    assert duration_s(interval) == 5, f"the API is scraped every 5 s, not {interval}"
    assert job.get("metrics_path", "/metrics") == "/metrics"
    assert job.get("scheme", "http") == "http"


# --- Grafana ------------------------------------------------------------------------------------------------


def provisioning(folder: Path) -> list[dict[str, Any]]:
    files = sorted([*folder.glob("*.yml"), *folder.glob("*.yaml")])
    assert files, f"no provisioning file in {folder}"
    docs = [yaml.safe_load(f.read_text()) for f in files]
    assert all(isinstance(d, dict) and d.get("apiVersion") == 1 for d in docs), f"{folder}: apiVersion 1"
    return docs


def test_grafana_datasource_is_the_prometheus_service() -> None:
    sources = [s for d in provisioning(GRAFANA_DATASOURCES) for s in d.get("datasources") or []]
    prometheus = [s for s in sources if s.get("type") == "prometheus"]
    assert len(prometheus) == 1, "one Prometheus data source"
    port = ports(service(PROMETHEUS))[0].target
    assert prometheus[0].get("url") == f"http://{PROMETHEUS}:{port}", "the data source is the compose service"
    assert prometheus[0].get("access", "proxy") == "proxy", "Grafana's server queries Prometheus, not the browser"
    assert prometheus[0].get("uid"), "a fixed uid, for the dashboards to refer to"


def test_grafana_dashboards_provider_and_home() -> None:
    providers = [p for d in provisioning(GRAFANA_PROVIDERS) for p in d.get("providers") or []]
    assert len(providers) == 1 and providers[0].get("type", "file") == "file", "one file dashboard provider"
    path = PurePosixPath(providers[0]["options"]["path"])
    config = compose_config(COMPOSE)
    grafana = service(GRAFANA_SERVICE)
    binds = {PurePosixPath(m.target): Path(m.source) for m in mounts(grafana, config)}
    assert binds.get(path) == GRAFANA_DASHBOARDS, f"{GRAFANA_DASHBOARDS} is mounted at the provider's path {path}"
    assert GRAFANA_DASHBOARDS.is_dir()
    home = PurePosixPath(environment(grafana)["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"])
    assert home.parent == path and home.suffix == ".json", "the home dashboard is a file of the provider's folder"


def test_grafana_anonymous_viewers() -> None:
    env = environment(service(GRAFANA_SERVICE))
    assert env.get("GF_AUTH_ANONYMOUS_ENABLED") == "true"
    assert env.get("GF_AUTH_ANONYMOUS_ORG_ROLE") == "Viewer", "anonymous visitors may only view"
