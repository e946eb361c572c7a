"""scripts/gpu_deps.py: which of pyproject's dependencies (and theirs) gpu_prepare.sh must
carry to the GPU machine as wheels: names normalised, environment markers evaluated as on
the GPU's CPython 3.12, what the image holds left out, and each fetched wheel's own needs
followed (with a fake fetch writing real wheel archives; no network)."""
import importlib.util
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def deps():
    pytest.importorskip("tomllib")
    spec = importlib.util.spec_from_file_location("gpu_deps", ROOT / "scripts" / "gpu_deps.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_missing_drops_what_the_image_has_and_markers_that_do_not_apply(deps):
    reqs = ["torch>=2.4", "gguf>=0.10", "Typing_Extensions", "tomli; python_version < '3.11'",
            "pywin32; sys_platform == 'win32'", "sphinx; extra == 'docs'", "nvtx",
            "GGUF==0.1", "uvloop; sys_platform == 'linux'"]
    present = {"torch", "typing-extensions"}
    assert deps.missing(reqs, present) == ["gguf>=0.10", "nvtx", "uvloop"]
    assert deps.missing(["Foo.Bar_baz>=1"], {"foo-bar-baz"}) == []


def test_the_image_list_and_the_project_requirements_are_read(deps):
    present = deps.image_packages()
    assert {"torch", "transformers", "safetensors", "pytest-timeout", "typing-extensions"} <= present
    reqs = [deps.requirement_name(r) for r in deps.project_requirements()]
    assert "torch" in reqs and "pytest-timeout" in reqs      # runtime and the test extra
    with pytest.raises(ValueError, match="package name"):
        deps.requirement_name(">=1.0")


def write_wheel(dest: Path, name: str, requires: list) -> Path:
    path = dest / f"{name}-1.0-py3-none-any.whl"
    meta = "Metadata-Version: 2.1\nName: {}\nVersion: 1.0\n".format(name)
    meta += "".join(f"Requires-Dist: {r}\n" for r in requires)
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{name}-1.0.dist-info/METADATA", meta)
    return path


def test_resolve_follows_each_wheels_missing_needs_once(deps, tmp_path):
    needs = {"app": ["lib-a>=2", "numpy", "lib-b; extra == 'fast'"],
             "lib_a": ["lib-c", "app"], "lib_c": ["numpy"], "other": ["lib-c"]}
    fetched = []

    def fetch(req):
        fetched.append(req)
        name = deps.requirement_name(req).replace("-", "_")
        return write_wheel(tmp_path, name, needs[name])
    wheels = deps.resolve(["app", "other", "numpy>=1"], {"numpy"}, fetch)
    assert fetched == ["app", "other", "lib-a>=2", "lib-c"]   # each once; numpy is in the image
    assert [w.name.split("-")[0] for w in wheels] == ["app", "other", "lib_a", "lib_c"]
