"""One import name: the installed distribution adds exactly `trainguard` to site-packages,
and no module of ours imports the repository's folder names (daemon, layers, plugins,
testing) directly: run from the repository root those would import a second copy."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = ("daemon", "layers", "plugins", "testing")


def _our_sources() -> list[Path]:
    listed = subprocess.run(
        ["git", "ls-files", "*.py"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    return [ROOT / name for name in listed]


def test_no_module_imports_a_folder_name() -> None:
    offenders = []
    for path in _our_sources():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            offenders += [
                f"{path.relative_to(ROOT)}:{node.lineno} {name}"
                for name in names
                if name.split(".")[0] in FOLDERS
            ]
    assert offenders == []


def test_the_wheel_adds_exactly_one_import_name(tmp_path: Path) -> None:
    source = tmp_path / "source"  # built from a copy: setuptools writes build/ into its tree
    listed = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    for name in listed:
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, source / name)
    subprocess.run(
        [
            *(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps"),
            *("-w", str(tmp_path), str(source)),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("trainguard-*.whl")
    top = {name.split("/")[0] for name in zipfile.ZipFile(wheel).namelist()}
    assert {name for name in top if not name.endswith(".dist-info")} == {"trainguard"}


def test_python_m_trainguard_runs_outside_the_repository(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "trainguard", "--version"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("trainguard")


def test_the_daemon_loads_neither_the_simulator_nor_the_demo(tmp_path: Path) -> None:
    """The simulator and the demo are tools: `trainguard run` (the CLI, the supervisor and
    every built-in layer and plugin) must not import them."""
    probe = (
        "import sys\n"
        "from trainguard import cli, supervisor\n"
        "from trainguard.config import loads\n"
        "from trainguard.plugins.manager import build_manager, collect_layers\n"
        "cli.build_parser()\n"
        "collect_layers(build_manager(entry_points=False), loads(''))\n"
        "print(sorted(m for m in sys.modules if m.startswith('trainguard.')))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, check=True
    )
    loaded = done.stdout
    assert "trainguard.supervisor" in loaded and "trainguard.layers.webhook" in loaded, loaded
    assert (
        "trainguard.testing.simulator" not in loaded and "trainguard.testing.demo" not in loaded
    ), loaded


def test_the_daemon_loads_no_test_tooling(tmp_path: Path) -> None:
    """`trio.testing` brings pytest along (about 60 modules and their memory): the daemon's
    modules never import it, nor pytest itself."""
    probe = (
        "import sys\n"
        "from trainguard import cli, supervisor\n"
        "from trainguard.config import loads\n"
        "from trainguard.plugins.manager import build_manager, collect_layers\n"
        "collect_layers(build_manager(entry_points=False), loads(''))\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('pytest', '_pytest')\n"
        "      or m.startswith('trio.testing')))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, check=True
    )
    assert done.stdout.strip() == "[]", done.stdout
