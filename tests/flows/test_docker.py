"""docker/: the images and the compose file cannot be built here (no Docker engine), so this parses them
and checks that everything they reference exists: copied paths, `distillery`/`make` commands and their
options, config files, pinned versions, and that the compose services agree with each other.
"""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

from flows.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
DOCKERFILES = ("Dockerfile.cpu", "Dockerfile.gpu")
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
REPO_PATH = re.compile(r"(?<![\w/.-])((?:configs|docker|flows|tasks|storage|bench|tests)/[\w./-]*\w)")


def instructions(path: Path) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) of a Dockerfile, continuation lines joined and comments dropped."""
    result, pending = [], ""
    for line in path.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        keyword, _, args = (pending + line).strip().partition(" ")
        result.append((keyword.upper(), args.strip()))
        pending = ""
    return result


def shell_commands(run: str) -> list[list[str]]:
    """The simple commands of a RUN line (split on && and ;)."""
    return [shlex.split(part) for part in re.split(r"&&|;", run) if part.strip()]


def check_distillery(argv: list[str]) -> None:
    """``argv`` (after ``distillery``) must parse with the real CLI; every path option must exist."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit:
        pytest.fail(f"`distillery {' '.join(argv)}` is not a valid distillery command")
    for name in ("config", "accelerate_config"):
        value = getattr(args, name, None)
        if value is not None:
            assert (ROOT / value).is_file(), f"`distillery {' '.join(argv)}`: {value} is not in the repository"


def command_snippets(text: str) -> list[str]:
    """Where a reader finds commands: `backticks`, fenced blocks, and comment lines indented as usage."""
    fenced = re.findall(r"```\w*\n(.*?)```", text, re.DOTALL)
    inline = re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", text, flags=re.DOTALL))
    usage = [line for line in text.splitlines() if re.match(r"^#\s{3,}\S", line)]
    return fenced + inline + usage


def check_mentioned_commands(name: str, text: str) -> None:
    subcommands = set(build_parser()._subparsers._group_actions[0].choices)
    for snippet in command_snippets(text):
        for sub in re.findall(r"(?<![\w:-])distillery (\w[\w-]*)", snippet):
            assert sub in subcommands, f"{name} mentions `distillery {sub}`, which is not a subcommand"
        for target in re.findall(r"\bmake ([\w-]+)", snippet):
            assert target in makefile_targets(), f"{name} mentions `make {target}`, not a Makefile target"
    for path in REPO_PATH.findall(text):
        assert (ROOT / path).exists(), f"{name} mentions {path}, which is not in the repository"


def makefile_targets() -> set[str]:
    return set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), re.MULTILINE))


def embedded_packages() -> list[str]:
    return re.search(r"^EMBEDDED := (.+)$", (ROOT / "Makefile").read_text(), re.MULTILINE).group(1).split()


def requirement_name(token: str) -> str:
    return re.split(r"[=<>\[!~ ]", token, maxsplit=1)[0].lower()


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_copies_existing_paths_and_every_package(name):
    steps = instructions(DOCKER / name)
    copied = []
    for keyword, args in steps:
        if keyword in ("COPY", "ADD"):
            sources = [t for t in shlex.split(args) if not t.startswith("--")][:-1]
            for source in sources:
                assert (ROOT / source).exists(), f"{name}: COPY {source} does not exist in the repository"
            copied += [s.rstrip("/") for s in sources]
    packages = [p.rstrip("*") for p in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]]
    missing = [p for p in packages + ["pyproject.toml", "configs"] if p not in copied]
    assert not missing, f"{name} does not copy {missing}, which `pip install -e .` or the CLI needs"


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_base_and_packages_are_pinned(name):
    steps = instructions(DOCKER / name)
    bases = [args.split()[0] for keyword, args in steps if keyword == "FROM"]
    assert bases, f"{name} has no FROM"
    for image in bases:
        repository, _, tag = image.rpartition(":")
        assert repository and re.search(r"\d+\.\d+", tag) and tag != "latest", f"{name}: base {image} is not pinned"
    installs = [cmd for keyword, args in steps if keyword == "RUN" for cmd in shell_commands(args)
                if cmd[:2] == ["pip", "install"] or cmd[:3] == ["uv", "pip", "install"]]
    assert installs, f"{name} installs nothing"
    named = []
    for cmd in installs:
        tokens = cmd[cmd.index("install") + 1:]
        skip_next = False
        for token in tokens:
            if skip_next:
                skip_next = False
                continue
            if token in ("--index-url", "--override", "-r", "--extra-index-url"):
                skip_next = True
                continue
            if token.startswith(("-", ".")):
                if token.startswith(".["):
                    extras = token[2:-1].split(",")
                    assert set(extras) <= set(PYPROJECT["project"]["optional-dependencies"]), token
                continue
            assert "==" in token, f"{name}: `{token}` is not pinned with =="
            named.append(requirement_name(token))
    assert set(embedded_packages()) <= set(named), f"{name} misses embedded packages {embedded_packages()}"
    torch_pin = next(d for d in PYPROJECT["project"]["dependencies"] if requirement_name(d) == "torch")
    if name == "Dockerfile.cpu":
        assert any(t == torch_pin for cmd in installs for t in cmd), f"{name} must install {torch_pin} (CPU)"


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_commands_and_paths_exist(name):
    text = (DOCKER / name).read_text()
    steps = instructions(DOCKER / name)
    for keyword, args in steps:
        if keyword in ("CMD", "ENTRYPOINT"):
            argv = json.loads(args)  # exec form, so signals reach the process
            assert argv[0] == "distillery", f"{name}: {keyword} {argv}"
            check_distillery(argv[1:])
    env = dict(re.findall(r"(\w+)=(\S+)", " ".join(a for k, a in steps if k == "ENV")))
    volumes = [a for k, a in steps if k == "VOLUME"]
    assert volumes == [env["DISTILLERY_HOME"]], f"{name}: the artifact root must be the volume"
    assert env["HF_HUB_OFFLINE"] == "1"
    # Paths and commands in the usage comments too: they are what a reader will type.
    check_mentioned_commands(name, text)


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def test_compose_builds_existing_dockerfiles_and_pins_images(compose):
    for name, service in compose["services"].items():
        if "build" in service:
            context = (DOCKER / service["build"]["context"]).resolve()
            assert context == ROOT, f"{name}: the build context must be the repository root"
            assert (context / service["build"]["dockerfile"]).is_file(), f"{name}: no {service['build']}"
        else:
            tag = service["image"].rpartition(":")[2]
            assert re.search(r"\d+\.\d+", tag), f"{name}: image {service['image']} is not pinned"
        for dependency in service.get("depends_on", {}):
            assert dependency in compose["services"], f"{name} depends on unknown service {dependency}"


def test_compose_commands_are_real(compose):
    seen = set()
    for name, service in compose["services"].items():
        command = service.get("command")
        if command is None:
            continue
        assert isinstance(command, list), f"{name}: use the exec (list) form"
        if command[0] == "distillery":
            check_distillery(command[1:])
        elif command[0] == "prefect":
            assert command[1:3] in (["server", "start"], ["worker", "start"]), f"{name}: {command}"
        else:
            pytest.fail(f"{name}: unexpected command {command}")
        seen.add(tuple(command[:3]))
    assert {("prefect", "server", "start"), ("prefect", "worker", "start")} <= seen


def test_compose_services_agree(compose):
    services = compose["services"]
    server = next(s for s in services.values() if s.get("command", [])[:3] == ["prefect", "server", "start"])
    port = server["command"][server["command"].index("--port") + 1]
    server_name = next(n for n, s in services.items() if s is server)
    # The server stores its state in the PostgreSQL service with its credentials.
    db = urlparse(server["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"])
    assert db.scheme == "postgresql+asyncpg" and db.hostname in services
    pg = services[db.hostname]["environment"]
    assert (db.username, db.password, db.path.lstrip("/")) == (pg["POSTGRES_USER"], pg["POSTGRES_PASSWORD"],
                                                                 pg["POSTGRES_DB"])
    # Everything that runs flows talks to that server and shares the artifact volume.
    pools = {}
    for name, service in services.items():
        command = service.get("command", [])
        if service is server or name == db.hostname:
            continue
        api = urlparse(service["environment"]["PREFECT_API_URL"])
        assert (api.hostname, str(api.port), api.path) == (server_name, port, "/api"), name
        home = service["environment"]["DISTILLERY_HOME"]
        mounts = dict(reversed(v.split(":")[:2]) for v in service["volumes"])
        assert mounts.get(home) in compose["volumes"], f"{name}: {home} is not a named volume"
        if "--pool" in command:
            pools[command[0]] = command[command.index("--pool") + 1]
    assert pools.get("distillery") and pools.get("prefect") == pools["distillery"], \
        f"workers must poll the pool the deployments are registered in: {pools}"
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            assert "/" in source or source in compose["volumes"], f"{name}: volume {source} is not declared"


@pytest.mark.parametrize("name", ["compose.yaml", "README.md"])
def test_compose_and_readme_mention_only_real_commands(name):
    check_mentioned_commands(name, (DOCKER / name).read_text())
