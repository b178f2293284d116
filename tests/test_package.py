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
    """Every install, check and test command of .ci/run is in the README as written (both tiers' commands)."""
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    keys = ("pip install", "check_comfyui", "pytest")
    commands = [line.strip() for line in ci.splitlines()
                if not line.lstrip().startswith("#") and any(k in line for k in keys)]
    # install with ComfyUI, its import check, install without, pytest, the tier again without ComfyUI
    assert len(commands) == 5, commands
    for command in commands:
        assert command in readme, f"README.md lacks the command .ci/run runs: {command}"
    assert "bash .ci/run" in readme and "COMFYUI_PATH" in readme
    assert "python -m int8_w8a8 demo" in readme


@pytest.mark.unit
def test_ruff_is_clean():
    ruff = shutil.which("ruff") or str(pathlib.Path(sys.executable).parent / "ruff")
    if not pathlib.Path(ruff).exists():
        pytest.skip("ruff is not installed (pip install -e .[test])")
    out = subprocess.run([ruff, "check", str(ROOT)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "int8_w8a8", *args], capture_output=True, text=True, timeout=300,
                          cwd="/")


@pytest.mark.unit
def test_demo_runs_on_cpu():
    out = _cli("demo", "--hidden", "128", "--tokens", "16", "--device", "cpu", "--repeats", "1")
    assert out.returncode == 0, out.stderr
    assert "single.linear1" in out.stdout and "torch twin check: exact" in out.stdout
    assert "weights:" in out.stdout and "MiB in INT8 (5" in out.stdout  # about half of BF16
    # the CPU's INT8 times are the reference path's, and the output says so
    assert "note: INT8 ran on the pure-torch reference path" in out.stdout and "need an NVIDIA GPU" in out.stdout


@pytest.mark.unit
def test_cli_usage(capsys):
    """Help on stdout with exit 0; a missing or unknown command or a bad option: usage, one error line, exit 2."""
    out = _cli("--help")  # the real entry point once; the other cases call its main() in this process
    assert out.returncode == 0 and "usage: python -m int8_w8a8" in out.stdout and not out.stderr, out
    assert "demo" in out.stdout and "info" in out.stdout
    out = _cli("demo", "--tokens", "-1")
    assert out.returncode == 2 and "argument --tokens: must be a positive whole number" in out.stderr, out
    from int8_w8a8.__main__ import main

    for args in (["demo", "--help"], ["info", "--help"]):
        with pytest.raises(SystemExit) as exit_:
            main(args)
        help_ = capsys.readouterr()
        assert exit_.value.code == 0 and f"usage: python -m int8_w8a8 {args[0]}" in help_.out and not help_.err
    bad = {
        (): "the following arguments are required",
        ("foo",): "unknown command 'foo'; the commands are demo, info",
        ("demo", "--tokens", "0"): "argument --tokens: must be a positive whole number, got 0",
        ("demo", "--hidden", "0"): "argument --hidden: must be a positive whole number, got 0",
        ("demo", "--hidden", "x"): "argument --hidden: invalid positive integer value: 'x'",
        ("demo", "--repeats", "-3"): "argument --repeats: must be a positive whole number, got -3",
        ("demo", "--device", "mps"): "argument --device: the demo runs on cpu or cuda, not mps",
        ("demo", "--device", "gpu0"): "argument --device: 'gpu0' is not a device; use cpu or cuda (cuda:N)",
        ("demo", "--hidden", "100", "--rotate-group", "64"): "--rotate-group 64 needs a hidden size that is a multiple",
        ("demo", "--bogus"): "unrecognized arguments: --bogus",
    }
    import torch

    if not torch.cuda.is_available():
        bad[("demo", "--device", "cuda")] = "sees no CUDA GPU here; use --device cpu"
    else:
        bad[("demo", "--device", f"cuda:{torch.cuda.device_count()}")] = "there is no cuda:"
    for args, message in bad.items():
        try:
            code = main(list(args))
        except SystemExit as exc:
            code = exc.code
        out = capsys.readouterr()
        errors = [line for line in out.err.splitlines() if "error:" in line]
        assert code == 2 and not out.out, (args, code, out)
        assert len(errors) == 1 and message in errors[0], (args, out.err)
