"""The wheel and the image carry the product and nothing of the test kit.

The test kit (regtest/: node, PostgreSQL and SoftHSM2 harnesses, software keys and signer,
pytest plugins, the demo), tests/ and bench/ are used from the source tree only. The wheel is
really built (pip, as the Dockerfile does) from a copy of the tree: building in place would
leave build/ behind, whose stale files setuptools would pack into the next wheel.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

pytestmark = [pytest.mark.process]  # starts custody/hsm commands as OS processes

ROOT = Path(__file__).resolve().parents[1]
PRODUCT = frozenset({"pledge", "pledge_hwi", "custody", "hsm"})
NOT_SHIPPED = frozenset({"regtest", "tests", "bench", "scripts"})
# Words that name test-only code wherever it might hide in a product package.
TEST_ONLY_WORDS = ("softhsm", "testkeys", "software_signer", "pytest_plugin", "conftest", "test_")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    source = tmp_path_factory.mktemp("source") / "tree"
    shutil.copytree(
        ROOT,
        source,
        ignore=shutil.ignore_patterns(
            ".git",
            ".venv",
            ".cache",
            ".demo",
            "build",
            "dist",
            "*.egg-info",
            "__pycache__",
            ".*_cache",
            ".import_linter_cache",
            "*.db",
            "*.sqlite",
        ),
    )
    out = tmp_path_factory.mktemp("wheel")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--disable-pip-version-check",
            "-q",
            "-w",
            str(out),
            str(source),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, (
        "pip wheel failed (the dev extra brings setuptools>=70.1; run `make bootstrap`):\n"
        + result.stdout
        + result.stderr
    )
    (built,) = out.glob("pledge_custody-*.whl")
    return built


def _names(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as archive:
        return archive.namelist()


def test_the_wheel_holds_the_product_packages_only(wheel: Path) -> None:
    names = _names(wheel)
    top = {name.split("/")[0] for name in names if ".dist-info/" not in name}
    assert top == PRODUCT
    test_only = [n for n in names if any(w in n.rsplit("/", 1)[-1] for w in TEST_ONLY_WORDS)]
    assert test_only == []
    # and it is complete: the migrations the image runs with `custody migrate`
    assert "custody/db/migrations/env.py" in names
    assert any(re.fullmatch(r"custody/db/migrations/versions/0001_\w+\.py", n) for n in names)
    # and the console's templates, script and styles (the app mounts them at start)
    console = Path(ROOT / "custody" / "console")
    shipped = {
        f"custody/console/{p.relative_to(console).as_posix()}"
        for p in [*console.glob("templates/*"), *console.glob("static/*")]
    }
    assert shipped and shipped <= set(names), shipped - set(names)


def test_the_wheel_declares_the_three_commands(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        (entry_points,) = [
            n for n in archive.namelist() if n.endswith(".dist-info/entry_points.txt")
        ]
        text = archive.read(entry_points).decode()
    assert "custody = custody.cli:app" in text
    assert "hsm = hsm.cli:app" in text
    assert "pledge-hwi = pledge_hwi.cli:app" in text


def test_the_unpacked_wheel_imports_and_migrates_without_the_test_kit(
    wheel: Path, tmp_path: Path
) -> None:
    """What the image does: import the three commands and build the schema from the wheel,
    away from the source tree, and never load the test kit on the way."""
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(site)
    code = (
        "import sys\n"
        "import custody.cli, hsm.cli, pledge_hwi.cli\n"
        "from custody.db.migrate import current_revision, head_revision, upgrade\n"
        "from custody.db.session import make_engine\n"
        f"site = {str(site)!r}\n"
        "for name in ('pledge', 'pledge_hwi', 'custody', 'hsm'):\n"
        "    assert sys.modules[name].__file__.startswith(site), sys.modules[name].__file__\n"
        f"engine = make_engine('sqlite:///{tmp_path / 'image.db'}')\n"
        "upgrade(engine)\n"
        "assert current_revision(engine) == head_revision() is not None\n"
        "from custody.api.app import create_app\n"
        "from custody.config import Settings\n"
        "create_app(Settings(), engine)  # mounts the console's static files from the wheel\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in "
        f"{sorted(NOT_SHIPPED)!r})\n"
        "assert not loaded, loaded\n"
        "print('ok')\n"
    )
    env = {**os.environ, "PYTHONPATH": str(site)}
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,  # not the repository root: nothing from the source tree on sys.path
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
    # the miner's tool runs from the wheel alone too (`python -m pledge_hwi` = `pledge-hwi`)
    miner = subprocess.run(
        [sys.executable, "-m", "pledge_hwi", "--help"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert miner.returncode == 0, miner.stderr
    assert "show-address" in miner.stdout and "sign-file" in miner.stdout


def _dockerfile_copies() -> set[str]:
    text = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    copies: set[str] = set()
    for line in text.splitlines():
        words = line.split()
        if words[:1] == ["COPY"] and not any(w.startswith("--from") for w in words):
            copies.update(w.rstrip("/") for w in words[1:-1])
    return copies


def test_the_image_copies_what_the_wheel_packs_and_not_the_test_kit() -> None:
    copied = _dockerfile_copies()
    assert copied - {"pyproject.toml"} == PRODUCT, copied
    assert not copied & NOT_SHIPPED


def test_pyproject_packs_the_product_list() -> None:
    """The find rule names the product packages; the list above is the same one."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    include = set(config["tool"]["setuptools"]["packages"]["find"]["include"])
    assert {name for name in include if "." not in name} == PRODUCT
