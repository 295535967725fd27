"""deploy/Dockerfile, linted by hadolint-style checks (no hadolint binary is installable here)
and kept in step with scripts/setup.sh, the README's set-up path."""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
SETUP = ROOT / "scripts" / "setup.sh"
BUILD_TOOLS = {"clang", "llvm", "libbpf-dev", "bpftool", "gcc", "libc6-dev", "python3-dev"}


@dataclass
class Instruction:
    cmd: str
    args: str
    line: int


@dataclass
class Stage:
    image: str
    name: str
    instructions: list[Instruction] = field(default_factory=list)

    def runs(self) -> list[str]:
        return [i.args for i in self.instructions if i.cmd == "RUN"]

    def apt_packages(self) -> set[str]:
        pkgs: set[str] = set()
        for run in self.runs():
            for part in re.split(r"&&|;", run):
                words = shlex.split(part.replace("\\\n", " "))
                if words[:2] == ["apt-get", "install"]:
                    pkgs |= {w for w in words[2:] if not w.startswith("-")}
        return pkgs


def parse(text: str) -> tuple[dict[str, str], list[Stage]]:
    """Instructions with continuation lines joined; ARGs before the first FROM resolved."""
    logical: list[Instruction] = []
    buf, start = "", 0
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.rstrip()
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if buf and line.lstrip().startswith("#"):
            continue
        if not buf:
            start = n
        if line.endswith("\\"):
            buf += line[:-1] + "\n"
            continue
        buf += line
        cmd, _, args = buf.strip().partition(" ")
        logical.append(Instruction(cmd.upper(), args.strip(), start))
        buf = ""
    assert not buf, "dangling line continuation"
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for ins in logical:
        if ins.cmd == "ARG" and not stages:
            k, _, v = ins.args.partition("=")
            global_args[k] = v
        elif ins.cmd == "FROM":
            words = ins.args.split()
            image = re.sub(r"\$\{(\w+)\}", lambda m: global_args[m.group(1)], words[0])
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else ""
            stages.append(Stage(image, name))
        else:
            assert stages, f"line {ins.line}: {ins.cmd} before FROM"
            stages[-1].instructions.append(ins)
    return global_args, stages


@pytest.fixture(scope="module")
def stages() -> dict[str, Stage]:
    _, parsed = parse(DOCKERFILE.read_text())
    return {s.name: s for s in parsed}


def external_images(stages: dict[str, Stage]) -> list[str]:
    return [s.image for s in stages.values() if s.image not in stages]


def test_multi_stage_with_named_targets(stages: dict[str, Stage]) -> None:
    assert {"build", "runtime", "agent", "controller"} <= set(stages)
    assert stages["agent"].image == "runtime" and stages["controller"].image == "runtime"
    _, parsed = parse(DOCKERFILE.read_text())
    assert parsed[-1].name == "agent", "a plain `docker build` should produce the agent"


def test_base_images_are_pinned(stages: dict[str, Stage]) -> None:
    images = external_images(stages)
    assert images
    for image in images:
        tag = image.partition("@")[0].partition(":")[2]
        assert tag or "@sha256:" in image, f"{image}: untagged base image (DL3006)"
        assert tag != "latest", f"{image}: latest (DL3007)"
        assert re.search(r"\d", tag) or "@sha256:" in image, f"{image}: moving tag, pin a release"
    assert stages["build"].image.startswith("debian:")
    assert stages["runtime"].image.startswith("debian:") and "slim" in stages["runtime"].image


def test_apt_hygiene(stages: dict[str, Stage]) -> None:
    for stage in stages.values():
        for run in stage.runs():
            if "apt-get install" in run:
                assert "--no-install-recommends" in run, "DL3015"
                assert re.search(r"-y\b|--yes", run), "DL3014"
                assert "apt-get update" in run, "update and install in one layer (DL3009)"
                assert "rm -rf /var/lib/apt/lists/*" in run, "apt lists not cleaned (DL3009)"
            assert not re.search(r"\bapt\s+(install|update)", run), "use apt-get (DL3027)"
            assert "sudo " not in run, "DL3004"
            assert not re.search(r"\bcurl\b.*\|\s*(ba)?sh|\bwget\b", run), "no downloads"


def test_no_add_of_urls_and_copy_is_used(stages: dict[str, Stage]) -> None:
    for stage in stages.values():
        for ins in stage.instructions:
            assert ins.cmd != "ADD", f"line {ins.line}: use COPY (DL3020), never ADD a URL"


def test_build_tools_stay_in_the_build_stage(stages: dict[str, Stage]) -> None:
    assert stages["build"].apt_packages() >= BUILD_TOOLS
    runtime_pkgs = set().union(
        *(stages[s].apt_packages() for s in ("runtime", "agent", "controller"))
    )
    assert runtime_pkgs >= {"libbpf1", "python3"}
    assert not runtime_pkgs & (BUILD_TOOLS | {"python3-venv", "python3-pip", "llvm-14"})
    copies = [
        i.args
        for s in ("runtime", "agent", "controller")
        for i in stages[s].instructions
        if i.cmd == "COPY"
    ]
    assert copies == ["--from=build /opt/tapio/venv /opt/tapio/venv"], copies


def test_controller_is_non_root_and_agent_documents_root(stages: dict[str, Stage]) -> None:
    def user(stage: Stage) -> str:
        users = [i.args for i in stage.instructions if i.cmd == "USER"]
        assert users, f"{stage.name}: no USER"
        return users[-1]

    assert user(stages["controller"]).split(":")[0] not in {"0", "root"}
    assert user(stages["agent"]) == "0:0"
    for name, command in (("controller", "controller"), ("agent", "agent")):
        entry = [i.args for i in stages[name].instructions if i.cmd == "ENTRYPOINT"]
        assert entry and f'"tapio", "{command}"' in entry[0]


def setup_commands() -> list[str]:
    return [
        line.strip()
        for line in SETUP.read_text().splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]


def test_the_build_uses_the_commands_of_setup_sh(stages: dict[str, Stage]) -> None:
    """setup.sh: `$PY -m venv .venv`, `.venv/bin/python -m pip install -q --upgrade pip`,
    `.venv/bin/python -m pip install -q -e .`, `.venv/bin/python build_bpf.py`; the image does
    the same with its venv at /opt/tapio/venv, installing a wheel of the same checkout."""
    setup = setup_commands()
    venv = "/opt/tapio/venv/bin/python"
    runs = [re.sub(r"\s+", " ", r.replace("\\\n", " ")) for r in stages["build"].runs()]
    joined = " && ".join(runs)

    assert any(re.search(r"-m venv \.venv$", s) for s in setup)
    assert "python3 -m venv /opt/tapio/venv" in joined
    for cmd in (
        ".venv/bin/python -m pip install -q --upgrade pip",
        ".venv/bin/python build_bpf.py",
    ):
        assert cmd in setup, f"setup.sh changed: {cmd!r} not found; update the Dockerfile too"
        assert cmd.replace(".venv/bin/python", venv) in joined
    assert ".venv/bin/python -m pip install -q -e ." in setup
    assert f"{venv} -m pip wheel -q --no-deps -w /dist ." in joined
    assert f"{venv} -m pip install -q /dist/tapio-*.whl" in joined
    # Objects are compiled before the wheel is built, so the wheel ships them.
    order = [joined.index(venv + " build_bpf.py"), joined.index(venv + " -m pip wheel")]
    assert order == sorted(order)
    # build_bpf.py also generates the libbpf binding with cffi (setup.sh has it from `pip
    # install -e .`): cffi is in the venv before it runs, and the wheel's binding imports.
    assert joined.index(f'{venv} -m pip install -q "cffi>=') < joined.index(venv + " build_bpf.py")
    assert "import tapio.agent.cli, tapio.bpf.libbpf" in joined
    # setup.sh's build packages are all installed in the build stage.
    setup_pkgs = set(re.search(r"pkgs=\(([^)]*)\)", SETUP.read_text(), re.S).group(1).split())  # type: ignore[union-attr]
    needed = setup_pkgs - {"libbpf1", "iproute2", "util-linux"}
    assert needed <= stages["build"].apt_packages(), needed - stages["build"].apt_packages()


def test_btf_source_is_documented_and_overridable() -> None:
    text = DOCKERFILE.read_text()
    assert "ARG TAPIO_BTF=/sys/kernel/btf/vmlinux" in text
    assert 'build_bpf.py --btf "${TAPIO_BTF}"' in text


def test_the_parser_sees_bad_practice() -> None:
    bad = "FROM debian:latest AS x\nRUN apt-get install -y clang\nADD https://x/y /y\n"
    _, parsed = parse(bad)
    stage = {s.name: s for s in parsed}
    with pytest.raises(AssertionError):
        test_base_images_are_pinned(stage)
    with pytest.raises(AssertionError):
        test_apt_hygiene(stage)
    with pytest.raises(AssertionError):
        test_no_add_of_urls_and_copy_is_used(stage)


def test_pip_steps_take_the_ca_bundle_as_an_optional_build_secret(stages: dict[str, Stage]) -> None:
    """Behind a TLS-intercepting proxy: `--secret id=pipcert,src=<CA bundle>` reaches every pip
    call as PIP_CERT, without landing in a layer; without the secret pip uses its defaults."""
    text = DOCKERFILE.read_text()
    assert "--secret id=pipcert,src=" in text  # documented in the header
    pip_runs = [r for r in stages["build"].runs() if " -m pip " in r]
    assert pip_runs
    for run in pip_runs:
        assert run.startswith("--mount=type=secret,id=pipcert,required=false"), run
        assert "export PIP_CERT=/run/secrets/pipcert" in run
    assert not any("pipcert" in i.args for i in stages["build"].instructions if i.cmd == "ENV")


def test_the_runtime_stage_has_no_pip_and_labels_name_no_foreign_repository(
    stages: dict[str, Stage],
) -> None:
    final_build_run = stages["build"].runs()[-1]
    assert "pip uninstall -q -y pip setuptools" in final_build_run
    labels = " ".join(i.args for s in stages.values() for i in s.instructions if i.cmd == "LABEL")
    assert "org.opencontainers.image.licenses" in labels
    assert "://" not in labels, labels  # no source URL: the image names no hosting service
