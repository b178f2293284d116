"""The package itself: imports, layout, one-way imports, metadata, lint, demo (the PTX of every GPU target:
test_targets.py)."""

from __future__ import annotations

import ast
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
LAYERS = ("kernels", "ops", "lora", "nodes")  # imports may only point left


def _run(code: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, cwd="/")


@pytest.mark.unit
def test_imports_need_neither_comfyui_nor_triton_nor_a_gpu():
    out = _run(
        "import sys, int8_w8a8, int8_w8a8.kernels as k\n"
        "assert 'comfy' not in sys.modules and 'triton' not in sys.modules, sorted(sys.modules)\n"
        "import torch\n"
        "assert hasattr(torch.ops.int8_w8a8, 'int8_linear')\n"
        "print(k.int8_linear.__name__)",
        env={"TRITON_INTERPRET": "0"},
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "int8_linear"


@pytest.mark.unit
def test_layout():
    for part in (*LAYERS, "tests", "bench"):
        assert (ROOT / part / "__init__.py").is_file() or part == "tests", part
    for f in ("__init__.py", "pyproject.toml", "README.md", ".ci/run", "kernels/reference.py"):
        assert (ROOT / f).is_file(), f


def _imports(path: pathlib.Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = (node.module or "").split(".")
            if node.level >= 2 and base[0]:  # from ..ops import x
                found.add(base[0])
            elif node.level >= 2:  # from .. import ops
                found.update(a.name for a in node.names)
            elif node.level == 0:
                found.add(base[0])
    return found


@pytest.mark.unit
def test_imports_point_one_way():
    for i, layer in enumerate(LAYERS):
        later = set(LAYERS[i + 1:])
        for path in (ROOT / layer).rglob("*.py"):
            names = _imports(path)
            assert not names & later, f"{path} imports {names & later}: only {LAYERS[:i]} may be imported"
            if layer == "kernels":
                assert not {n for n in names if n.startswith("comfy")}, f"{path} imports ComfyUI or comfy-kitchen"


@pytest.mark.unit
def test_registry_metadata():
    tomllib = pytest.importorskip("tomllib")
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    comfy = meta["tool"]["comfy"]
    for key in ("PublisherId", "DisplayName", "Icon", "requires-comfyui"):
        assert key in comfy, key
    deps = " ".join(meta["project"]["dependencies"])
    for dep in ("torch", "triton", "safetensors", "comfy-kitchen", "numpy"):
        assert dep in deps, dep
    markers = " ".join(meta["tool"]["pytest"]["ini_options"]["markers"])
    for tier in ("unit", "kernels", "integration", "gpu"):
        assert f"{tier}:" in markers


@pytest.mark.unit
def test_readme_commands_and_ci_agree():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    test_cmd = next(line for line in ci.splitlines() if "pytest" in line)
    assert test_cmd.strip() in readme
    assert "python -m int8_w8a8 demo" in readme


@pytest.mark.unit
def test_ruff_is_clean():
    ruff = shutil.which("ruff") or str(pathlib.Path(sys.executable).parent / "ruff")
    if not pathlib.Path(ruff).exists():
        pytest.skip("ruff is not installed (pip install -e .[test])")
    out = subprocess.run([ruff, "check", str(ROOT)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.unit
def test_demo_runs_on_cpu():
    out = subprocess.run([sys.executable, "-m", "int8_w8a8", "demo", "--hidden", "128", "--tokens", "16",
                          "--device", "cpu", "--repeats", "1"], capture_output=True, text=True, timeout=300, cwd="/")
    assert out.returncode == 0, out.stderr
    assert "single.linear1" in out.stdout and "torch twin check: exact" in out.stdout
    assert "weights:" in out.stdout and "MiB in INT8 (5" in out.stdout  # about half of BF16


@pytest.mark.unit
def test_cli_usage():
    out = subprocess.run([sys.executable, "-m", "int8_w8a8"], capture_output=True, text=True, cwd="/")
    assert out.returncode == 2 and "demo" in out.stderr
