"""Static checks of the Dockerfiles, for CI without a Docker engine: ``python docker/check.py``.

Complements hadolint (generic Dockerfile lint) with what is specific to this project:

* the Python pins (docker/constraints.txt) are exact, cover torch/accelerate/deepspeed, and
  satisfy pyproject.toml's ranges; both images install through them (PIP_CONSTRAINT);
* the CUDA base image matches the CUDA that the pinned torch is built for;
* base images carry an explicit tag (never ``latest``);
* the final USER is a numeric non-root uid (Kubernetes' runAsNonRoot can only verify numbers);
* nothing secret-looking is set (ENV/ARG names or values) or copied (COPY/ADD sources);
* every COPY source exists, the entrypoint is in exec form, the ignore files exclude secrets.

Prints one line per problem and exits 1 if there is any.
"""

from __future__ import annotations

import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"
DOCKERFILES = {"cuda": DOCKER / "Dockerfile.cuda", "cpu": DOCKER / "Dockerfile.cpu"}
CONSTRAINTS = DOCKER / "constraints.txt"
REQUIRED_PINS = ("torch", "accelerate", "deepspeed")

# CUDA major.minor of torch's default (PyPI) Linux wheels. Read off the wheel's dependencies
# (pip install --dry-run --report - torch==X lists nvidia-cuda-runtime / cuda-toolkit): when
# the torch pin moves, add its entry here, then move the CUDA base image to match.
PYPI_TORCH_CUDA = {"2.13.0": "13.0"}

SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSW(OR)?D|API_?KEY|ACCESS_?KEY|PRIVATE_?KEY|CREDENTIAL|AUTH", re.I)
SECRET_VALUE = re.compile(r"hf_[A-Za-z0-9]{20,}|ghp_[A-Za-z0-9]{20,}|github_pat_\w{20,}|AKIA[0-9A-Z]{16}|"
                          r"sk-[A-Za-z0-9]{20,}|xox[abp]-[A-Za-z0-9-]{10,}|-----BEGIN [A-Z ]*PRIVATE KEY")
SECRET_PATH = re.compile(r"(^|/)(\.env(\..*)?|\.netrc|\.ssh|id_(rsa|ed25519|ecdsa)|\.aws|\.huggingface|"
                         r"[^/]*\.pem|[^/]*\.key|[^/]*token[^/]*)$", re.I)
IGNORE_MUST_EXCLUDE = (".git", "**/.venv", "**/.env", "**/.netrc", "**/.ssh", "**/*.pem")


@dataclass
class Instruction:
    line: int  # 1-based line of the instruction's first physical line
    keyword: str  # upper case
    args: str  # the rest, continuation lines joined


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions with their arguments; comments and line continuations handled, heredocs not used here."""
    out: list[Instruction] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue  # comment lines inside a continued instruction are dropped by Docker too
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending.append(stripped[:-1])
            continue
        pending.append(stripped)
        joined = " ".join(p.strip() for p in pending if p.strip())
        keyword, _, args = joined.partition(" ")
        out.append(Instruction(start, keyword.upper(), args.strip()))
        pending = []
    if pending:
        raise ValueError("the last instruction ends with a line continuation")
    return out


def _kv_pairs(args: str) -> list[tuple[str, str]]:
    """ENV/ARG/LABEL arguments: ``K=V K2="v 2"`` or the legacy ``K V`` (ENV) / bare ``K`` (ARG)."""
    tokens = shlex.split(args, posix=True)
    if tokens and "=" not in tokens[0]:
        return [(tokens[0], " ".join(tokens[1:]))]
    return [tuple(t.split("=", 1)) if "=" in t else (t, "") for t in tokens]  # type: ignore[misc]


def read_pins(path: Optional[Path] = None) -> dict[str, str]:
    """name -> exact version from a constraints file; raises on anything but ``name==version``."""
    path = path or CONSTRAINTS
    pins: dict[str, str] = {}
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"([A-Za-z0-9_.-]+)==([0-9][A-Za-z0-9.+!-]*)", line)
        if not m:
            raise ValueError(f"{path.name}:{number}: '{line}' is not an exact pin (name==version)")
        pins[m.group(1).lower().replace("_", "-")] = m.group(2)
    return pins


def _pyproject(path: Optional[Path] = None) -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    return tomllib.loads((path or ROOT / "pyproject.toml").read_text())["project"]


def pyproject_extras() -> set[str]:
    return set(_pyproject().get("optional-dependencies", {}))


def pyproject_requirements(path: Optional[Path] = None) -> dict[str, str]:
    """name -> specifier set (as text) from [project] dependencies and optional dependencies."""
    from packaging.requirements import Requirement

    project = _pyproject(path)
    reqs = list(project.get("dependencies", []))
    for extra in project.get("optional-dependencies", {}).values():
        reqs.extend(extra)
    out: dict[str, str] = {}
    for text in reqs:
        req = Requirement(text)
        out[req.name.lower().replace("_", "-")] = str(req.specifier)
    return out


def check_pins() -> list[str]:
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    problems = []
    try:
        pins = read_pins()
    except ValueError as exc:
        return [str(exc)]
    ranges = pyproject_requirements()
    for name in REQUIRED_PINS:
        if name not in pins:
            problems.append(f"constraints.txt: {name} is not pinned (add {name}==<version>)")
    for name, version in pins.items():
        if name not in ranges:
            continue  # pinned for reproducibility only (no range to satisfy)
        if Version(version) not in SpecifierSet(ranges[name]):
            problems.append(f"constraints.txt: {name}=={version} is outside pyproject.toml's '{name}{ranges[name]}'")
    return problems


def _final_stage(instructions: list[Instruction]) -> list[Instruction]:
    last_from = max(i for i, ins in enumerate(instructions) if ins.keyword == "FROM")
    return instructions[last_from:]


def _arg_defaults(instructions: list[Instruction]) -> dict[str, str]:
    out: dict[str, str] = {}
    for ins in instructions:
        if ins.keyword == "ARG":
            for k, v in _kv_pairs(ins.args):
                if v:
                    out[k] = v
    return out


def check_dockerfile(path: Path, flavour: str) -> list[str]:
    name = path.name
    instructions = parse_dockerfile(path.read_text())
    problems: list[str] = []
    args = _arg_defaults(instructions)
    final = _final_stage(instructions)

    for ins in instructions:
        if ins.keyword == "FROM":
            image = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), ins.args.split()[0])
            if ":" not in image.rsplit("/", 1)[-1] or image.endswith(":latest"):
                problems.append(f"{name}:{ins.line}: base image '{image}' has no fixed tag")
        if ins.keyword in ("ENV", "ARG"):
            for key, value in _kv_pairs(ins.args):
                if SECRET_NAME.search(key):
                    problems.append(f"{name}:{ins.line}: {ins.keyword} {key} looks like a secret; pass it at run time")
                if SECRET_VALUE.search(value):
                    problems.append(f"{name}:{ins.line}: {ins.keyword} {key} has a token-like value")
        if ins.keyword in ("COPY", "ADD"):
            tokens = [t for t in shlex.split(ins.args) if not t.startswith("--")]
            for src in tokens[:-1]:
                if SECRET_PATH.search(src.rstrip("/")):
                    problems.append(f"{name}:{ins.line}: {ins.keyword} {src} copies a secret-looking path")
                elif src != "." and not (ROOT / src).exists():
                    problems.append(f"{name}:{ins.line}: {ins.keyword} source '{src}' does not exist in the repository")
                if src == ".":
                    problems.append(f"{name}:{ins.line}: '{ins.keyword} .' copies the whole context; name the paths")
        if ins.keyword == "RUN" and SECRET_VALUE.search(ins.args):
            problems.append(f"{name}:{ins.line}: RUN contains a token-like string")
        if ins.keyword == "RUN":
            for extras in re.findall(r"\.\[([A-Za-z0-9_,-]+)\]", ins.args):
                for extra in extras.split(","):
                    if extra not in pyproject_extras():
                        problems.append(f"{name}:{ins.line}: extra '{extra}' is not in pyproject.toml's optional-dependencies")

    users = [ins for ins in final if ins.keyword == "USER"]
    if not users:
        problems.append(f"{name}: no USER in the final stage: the image would run as root")
    else:
        user = users[-1].args.split(":")[0]
        if not user.isdigit():
            problems.append(f"{name}:{users[-1].line}: USER {users[-1].args} is not numeric (Kubernetes runAsNonRoot cannot verify it)")
        elif int(user) == 0:
            problems.append(f"{name}:{users[-1].line}: the final USER is root")
        entry = [i for i, ins in enumerate(final) if ins.keyword in ("ENTRYPOINT", "CMD")]
        if entry and final.index(users[-1]) > min(entry):
            problems.append(f"{name}:{users[-1].line}: USER comes after ENTRYPOINT/CMD")

    entrypoints = [ins for ins in final if ins.keyword == "ENTRYPOINT"]
    if not entrypoints or not entrypoints[-1].args.startswith("["):
        problems.append(f"{name}: ENTRYPOINT missing or in shell form (signals would not reach the job)")

    env = {k: v for ins in final if ins.keyword == "ENV" for k, v in _kv_pairs(ins.args)}
    constraint = env.get("PIP_CONSTRAINT", "")
    if not constraint.endswith("docker/constraints.txt"):
        problems.append(f"{name}: ENV PIP_CONSTRAINT must point at docker/constraints.txt (the pins)")
    if not any(ins.keyword == "COPY" and "docker/constraints.txt" in ins.args.split() for ins in final):
        problems.append(f"{name}: docker/constraints.txt is not copied before the installs")

    if flavour == "cuda":
        cuda, torch_cuda = args.get("CUDA_VERSION", ""), args.get("TORCH_CUDA", "")
        if not cuda.startswith(torch_cuda + ".") and cuda != torch_cuda:
            problems.append(f"{name}: ARG CUDA_VERSION={cuda} does not match ARG TORCH_CUDA={torch_cuda}")
        try:
            torch_pin = read_pins().get("torch", "")
        except ValueError:
            torch_pin = ""
        known = PYPI_TORCH_CUDA.get(torch_pin)
        if known is None:
            problems.append(f"{name}: the CUDA of torch=={torch_pin}'s PyPI wheel is not recorded in "
                            f"docker/check.py PYPI_TORCH_CUDA; add it, then align CUDA_VERSION/TORCH_CUDA")
        elif known != torch_cuda:
            problems.append(f"{name}: torch=={torch_pin} is built for CUDA {known}, but TORCH_CUDA={torch_cuda}")
        if not any("entrypoint.sh" in ins.args for ins in entrypoints):
            problems.append(f"{name}: ENTRYPOINT does not run docker/entrypoint.sh")
    if flavour == "cpu" and not any("tests/run.sh" in ins.args for ins in final if ins.keyword in ("ENTRYPOINT", "CMD")):
        problems.append(f"{name}: the CPU image must run the test suite (tests/run.sh)")

    ignore = path.with_name(path.name + ".dockerignore")
    if not ignore.is_file():
        problems.append(f"{name}: {ignore.name} missing (BuildKit reads it next to the Dockerfile)")
    else:
        entries = {line.strip() for line in ignore.read_text().splitlines() if line.strip() and not line.startswith("#")}
        for pattern in IGNORE_MUST_EXCLUDE:
            if pattern not in entries:
                problems.append(f"{ignore.name}: does not exclude {pattern}")
    return problems


def check_all() -> list[str]:
    problems = check_pins()
    for flavour, path in DOCKERFILES.items():
        problems += check_dockerfile(path, flavour)
    return problems


def main() -> int:
    problems = check_all()
    for p in problems:
        print(p)
    print(f"docker/check.py: {len(problems)} problem(s) in {', '.join(p.name for p in DOCKERFILES.values())}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
