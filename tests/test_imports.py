"""The import rules of docs/architecture.md §3, read from the source (every import statement,
function-level ones included): the runtimes share the chip job and never import each other,
and the node's pure core is free of sockets and of its process shell."""

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def imports(relpath: str) -> set[str]:
    """Absolute module names a file imports (relative imports resolved)."""
    path = os.path.join(ROOT, relpath)
    package = os.path.dirname(relpath).replace(os.sep, ".")
    out = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            out.add(base)
            out.update(f"{base}.{alias.name}" for alias in node.names)
    return out


def files(folder: str) -> list[str]:
    return sorted(os.path.join(folder, f) for f in os.listdir(os.path.join(ROOT, folder)) if f.endswith(".py"))


def offending(paths: list[str], forbidden: tuple[str, ...]) -> dict[str, list[str]]:
    found = {p: sorted(m for m in imports(p) if m.startswith(forbidden)) for p in paths}
    return {p: ms for p, ms in found.items() if ms}


def test_the_helper_resolves_relative_imports():
    assert "pmgd_node.node.ParameterNode" in imports(os.path.join("pmgd_node", "shell", "process.py"))
    assert "zmq" in imports(os.path.join("pmgd_node", "shell", "process.py"))


def test_the_engine_and_the_broadcaster_never_import_each_other():
    assert offending(files("services/engine"), ("services.broadcaster",)) == {}
    assert offending(files("services/broadcaster"), ("services.engine",)) == {}


def test_the_chip_job_imports_no_runtime():
    runtimes = ("services.engine", "services.broadcaster", "services.api", "services.cluster")
    # The chip protocol's client (docs/chip-protocol.md) is the one module of the package with a
    # socket; the chip job reaches it only for a job that has a chip.
    assert "services/chip/client.py" in files("services/chip")
    assert offending([f for f in files("services/chip") if f != "services/chip/client.py"], runtimes + ("zmq",)) == {}
    assert offending(["services/chip/client.py"], runtimes) == {}


def test_the_node_core_imports_neither_zmq_nor_its_shell_nor_services():
    core = [f for f in files("pmgd_node") if f != "pmgd_node/__main__.py"]  # `python -m pmgd_node` starts the shell
    assert "pmgd_node/node.py" in core and "pmgd_node/shell/process.py" not in core
    assert offending(core, ("zmq", "pmgd_node.shell", "services", "prometheus_client", "torch")) == {}


def test_the_evaluator_imports_nothing_of_the_api():
    # The API calls the evaluator; what both serve at their HTTP edge is services/http_edge.py.
    assert offending(files("services/evaluator"), ("services.api",)) == {}
    assert "services.http_edge.Guard" in imports("services/evaluator/service.py")


def test_the_node_process_needs_neither_torch_nor_matplotlib():
    """The node image (Dockerfile `--target node`) ships without them: `pmgd node` must not import them."""
    import subprocess
    import sys

    code = ("import sys; from services.cli import main\n"
            "try:\n    main(['node', '--help'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('torch', 'matplotlib', 'fastapi', 'uvicorn') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]", out
