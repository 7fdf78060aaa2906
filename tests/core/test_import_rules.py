"""The package's import rules hold (scripts/check_imports.py), and the checker finds each kind of break."""

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("check_imports", ROOT / "scripts" / "check_imports.py")
check_imports = importlib.util.module_from_spec(spec)
spec.loader.exec_module(check_imports)


def test_the_package_keeps_its_import_rules():
    assert check_imports.violations(ROOT / "src") == []


def _package(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, text in {"maestro_lod/__init__.py": "", **files}.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path


@pytest.mark.parametrize("files, expected", [
    ({"maestro_lod/a.py": "from . import b\n", "maestro_lod/b.py": "from .a import x\n"},
     "circle of imports: maestro_lod.a, maestro_lod.b"),
    ({"maestro_lod/training/__init__.py": "", "maestro_lod/engine.py": "from .deploy import x\n",
      "maestro_lod/training/loop.py": "from ..engine import y\n", "maestro_lod/deploy.py": ""},
     "training reaches deploy: maestro_lod.training.loop -> maestro_lod.engine -> maestro_lod.deploy"),
    ({"maestro_lod/cli.py": "", "maestro_lod/lib.py": "import maestro_lod.cli\n"},
     "library module maestro_lod.lib imports maestro_lod.cli"),
    ({"maestro_lod/lib.py": "def f():\n    from . import other\n", "maestro_lod/other.py": ""},
     "maestro_lod/lib.py:2: imports maestro_lod.other inside a function or block"),
    ({"maestro_lod/engine.py": "from .runs import x\n", "maestro_lod/runs.py": ""},
     "maestro_lod.engine (engine) imports maestro_lod.runs (runs), a higher layer"),
])
def test_the_checker_reports_each_kind_of_break(tmp_path, files, expected):
    assert expected in check_imports.violations(_package(tmp_path, files))
