"""What the core install promises: rendering imports none of the extras' libraries, and the
built-in layouts are package data with one source, the top-level ``layouts/`` folder.

The installed wheel itself (no extras, a fresh virtual environment, a real render) is tested by
``scripts/test-wheel``, which ``scripts/test`` runs after this suite.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from importlib import resources
from pathlib import Path

import pytest

from melter.extras import PROVIDES, extra_for
from melter.layout.model import BUILTIN_PACKAGE, builtin_names, load_layout

ROOT = Path(__file__).resolve().parents[2]
#: Top-level modules that only the farm, serve and deploy extras install.
EXTRA_MODULES = sorted({m for modules in PROVIDES.values() for m in modules})


def loaded_after(code: str) -> list[str]:
    """The top-level modules a fresh interpreter has loaded after running ``code``."""
    script = (f"import json, sys\n{code}\n"
              "print(json.dumps(sorted({m.partition('.')[0] for m in sys.modules})))")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.splitlines()[-1])  # type: ignore[no-any-return]


@pytest.mark.parametrize("code", [
    "import melter.render",
    "import melter.cli",
    "import melter.compose, melter.convert, melter.layout.model, melter.meeting, melter.plan",
    # What `melter render --help` runs: the whole command tree, farm and service included.
    "from melter.cli import main\nsys.argv = ['melter', 'render', '--help']\n"
    "try:\n    main()\nexcept SystemExit as exc:\n    assert exc.code == 0, exc.code",
], ids=["render", "cli", "core", "render-help"])
def test_the_core_imports_no_farm_service_or_docker_library(code: str) -> None:
    loaded = loaded_after(code)
    assert "melter" in loaded
    assert not set(loaded) & set(EXTRA_MODULES), sorted(set(loaded) & set(EXTRA_MODULES))


def test_the_extras_modules_are_importable_here() -> None:
    """The check above means something only where the extras are installed (``[test]``)."""
    assert "celery" in loaded_after("import melter.farm.celery_app")
    assert {"fastapi", "redis"} <= set(loaded_after("import melter.serve.api"))
    assert "docker" in loaded_after("import docker")


def test_a_missing_module_names_its_extra() -> None:
    assert extra_for("celery.exceptions") == "farm"
    assert extra_for("flower") == "farm"
    assert extra_for("redis") == "farm"
    assert extra_for("fastapi.responses") == "serve"
    assert extra_for("docker.errors") == "deploy"
    assert extra_for("numpy") is None and extra_for(None) is None


def test_the_builtin_layouts_are_package_data_from_the_layouts_folder() -> None:
    on_disk = sorted(p.stem for p in (ROOT / "layouts").glob("*.yaml"))
    assert on_disk == ["audio-only", "grid", "pip", "presentation", "side-by-side", "speaker"]
    assert builtin_names() == on_disk
    folder = resources.files(BUILTIN_PACKAGE)
    for name in on_disk:
        # One copy: the package data is the folder people edit, byte for byte.
        assert (folder / f"{name}.yaml").read_bytes() == (ROOT / "layouts" / f"{name}.yaml") \
            .read_bytes(), name
        assert load_layout(name).name == name


def test_no_builtin_layouts_is_an_error_not_an_empty_list(tmp_path: Path) -> None:
    """An install whose layout package holds no YAML (a broken build) fails in one line,
    where ``layouts list`` used to print nothing and succeed."""
    shutil.copytree(ROOT / "melter", tmp_path / "melter",
                    ignore=shutil.ignore_patterns("__pycache__"))
    empty = tmp_path / "melter" / "layout" / "builtin"
    empty.mkdir()
    (empty / "__init__.py").write_text("")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    for args in (["layouts", "list"], ["plan", str(ROOT / "tests" / "fixtures" /
                                                   "dev-two-party-h264"), "--layout", "grid"]):
        result = subprocess.run([sys.executable, "-c", "from melter.cli import main; main()",
                                 *args], capture_output=True, text=True, env=env,
                                cwd=tmp_path, timeout=120)
        assert result.returncode == 1, (args, result.stdout, result.stderr)
        assert result.stdout == ""
        assert result.stderr == (f"melter: error: no built-in layouts in {empty} (package "
                                 "melter.layout.builtin); reinstall melter\n"), args


def test_the_generated_c_file_is_ignored_and_not_tracked() -> None:
    ignored = subprocess.run(["git", "check-ignore", "-q", "melter/_fastpath.c"], cwd=ROOT)
    if ignored.returncode == 128:
        pytest.skip("not a git checkout")
    assert ignored.returncode == 0
    tracked = subprocess.run(["git", "ls-files", "melter/_fastpath.c"], cwd=ROOT,
                             capture_output=True, text=True, check=True)
    assert tracked.stdout == ""
