"""The wheels the GPU machine lacks, for scripts/gpu_prepare.sh: every dependency of
pyproject.toml (runtime and the `test` extra), and every dependency of theirs, that the
GPU image does not hold (scripts/gpu_image_packages.txt), downloaded one by one with
--no-deps for the image's CPython 3.12 on x86-64.

    python scripts/gpu_deps.py missing                 # the requirements to fetch, one a line
    python scripts/gpu_deps.py download DIR            # fetch them and their own missing needs

One by one, not `pip download` with dependencies: pip would also fetch what the image
already has (numpy, or torch and its CUDA wheels: gigabytes), and a second version of a
package the image holds would shadow its own on the GPU machine.
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path
from typing import Callable, Iterable

ROOT = Path(__file__).resolve().parents[1]
IMAGE_LIST = ROOT / "scripts" / "gpu_image_packages.txt"
# The GPU image's interpreter (device notes): CPython 3.12, manylinux x86-64.
TARGET = ["--python-version", "3.12", "--implementation", "cp", "--only-binary=:all:",
          "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux_2_17_x86_64",
          "--platform", "manylinux2014_x86_64"]


def normalize(name: str) -> str:
    """PEP 503: lower case, runs of -, _ and . as one -."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(req: str) -> str:
    m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", req)
    if not m:
        raise ValueError(f"cannot read a package name from requirement {req!r}")
    return normalize(m.group(1))


def image_packages(path: Path = IMAGE_LIST) -> set:
    lines = path.read_text(encoding="utf-8").splitlines()
    return {normalize(l.strip()) for l in lines if l.strip() and not l.startswith("#")}


def project_requirements(pyproject: Path = ROOT / "pyproject.toml", extras=("test",)) -> list:
    project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
    reqs = list(project.get("dependencies", []))
    for extra in extras:
        reqs += project.get("optional-dependencies", {}).get(extra, [])
    return reqs


# Environment markers as the GPU machine evaluates them (no extra asked for).
GPU_MARKER_ENV = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
                  "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
                  "implementation_name": "cpython", "platform_python_implementation": "CPython",
                  "extra": ""}


def applies_on_gpu(req: str) -> bool:
    """Whether a requirement's environment marker (after ';') holds on the GPU machine."""
    if ";" not in req:
        return True
    marker = req.split(";", 1)[1]
    try:
        from packaging.markers import Marker
    except ImportError:                    # without packaging: drop extras only
        return "extra" not in marker
    return Marker(marker).evaluate(GPU_MARKER_ENV)


def missing(requirements: Iterable[str], present: set) -> list:
    """The requirements that apply on the GPU machine and whose package is not in
    `present` (the first of each name kept, its marker dropped)."""
    out, seen = [], set()
    for req in requirements:
        if not applies_on_gpu(req):
            continue
        name = requirement_name(req)
        if name not in present and name not in seen:
            seen.add(name)
            out.append(req.split(";", 1)[0].strip())
    return out


def wheel_requirements(wheel: Path) -> list:
    """Requires-Dist lines of a wheel's METADATA."""
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        text = z.read(meta).decode("utf-8", errors="replace")
    return [line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("Requires-Dist:")]


def resolve(requirements: list, present: set, fetch: Callable[[str], Path]) -> list:
    """Fetch each missing requirement, then the missing needs of what was fetched, until
    nothing is missing. fetch(requirement) -> the wheel's path. -> the wheels, in order."""
    have = set(present)
    queue, wheels = missing(requirements, have), []
    while queue:
        req = queue.pop(0)
        name = requirement_name(req)
        if name in have:
            continue
        have.add(name)
        wheel = fetch(req)
        wheels.append(wheel)
        queue += missing(wheel_requirements(wheel), have)
    return wheels


def pip_fetch(dest: Path) -> Callable[[str], Path]:
    def fetch(req: str) -> Path:
        before = set(dest.glob("*.whl"))
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                        "--disable-pip-version-check", *TARGET, "-d", str(dest), req], check=True)
        new = sorted(set(dest.glob("*.whl")) - before)
        if not new:      # already there from an earlier run: the one whose name matches
            new = [w for w in dest.glob("*.whl") if normalize(w.name.split("-")[0]) == requirement_name(req)]
        if not new:
            raise RuntimeError(f"pip download {req!r} left no wheel in {dest}")
        return new[0]
    return fetch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=("missing", "download"))
    p.add_argument("dest", nargs="?", type=Path)
    args = p.parse_args(argv)
    present = image_packages()
    if args.command == "missing":
        print("\n".join(missing(project_requirements(), present)))
        return 0
    if args.dest is None:
        p.error("download needs a DIR")
    args.dest.mkdir(parents=True, exist_ok=True)
    for wheel in resolve(project_requirements(), present, pip_fetch(args.dest)):
        print(wheel.name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
