"""The wheel ships every subpackage, the kernels as `lctrain_kernels` and the Hydra configs as `lctrain.conf`."""

import importlib.resources
import importlib.util
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# Source directory -> import name of the package it installs as.
TOP_LEVEL = {"lctrain": "lctrain", "kernels": "lctrain_kernels", "conf": "lctrain.conf"}
# What a source checkout holds that must never reach the wheel (build/, caches, venvs).
NOT_SOURCE = shutil.ignore_patterns(
    ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache",
    ".hypothesis", "outputs", "multirun", "wandb",
)


def setuptools_table():
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["tool"]["setuptools"]


def import_name(directory: Path) -> str:
    rel = directory.relative_to(ROOT)
    return ".".join([TOP_LEVEL[rel.parts[0]], *rel.parts[1:]])


def python_package_dirs():
    """Directories under lctrain/ and kernels/ holding Python code (with or without __init__.py)."""
    dirs = set()
    for top in ("lctrain", "kernels"):
        for py in (ROOT / top).rglob("*.py"):
            if "__pycache__" not in py.parts:
                dirs.add(py.parent)
    return dirs


def test_every_subpackage_is_listed():
    listed = set(setuptools_table()["packages"])
    dirs = python_package_dirs()
    # Sanity: the walk finds what the tree is known to hold.
    assert {ROOT / "lctrain", ROOT / "lctrain" / "attention", ROOT / "kernels"} <= dirs
    for top in ("lctrain", "kernels"):
        for init in (ROOT / top).rglob("__init__.py"):
            dirs.add(init.parent)
    missing = sorted(import_name(d) for d in dirs if import_name(d) not in listed)
    assert not missing, f"add {missing} to [tool.setuptools] packages in pyproject.toml"
    assert "lctrain.conf" in listed and (ROOT / "conf" / "__init__.py").is_file()


def test_listed_packages_exist_and_map_to_source():
    table = setuptools_table()
    assert table["package-dir"] == {"lctrain": "lctrain", "lctrain_kernels": "kernels", "lctrain.conf": "conf"}
    by_name = {v: k for k, v in TOP_LEVEL.items()}
    for package in table["packages"]:
        head = "lctrain.conf" if package.startswith("lctrain.conf") else package.split(".")[0]
        rest = package[len(head):].lstrip(".")
        path = ROOT / by_name[head] / Path(*rest.split(".")) if rest else ROOT / by_name[head]
        assert path.is_dir(), f"pyproject lists {package} but {path} does not exist"
    assert "kernels" not in table["packages"]


def test_yaml_configs_are_package_data():
    data = setuptools_table()["package-data"]["lctrain.conf"]
    assert "*.yaml" in data and "**/*.yaml" in data


def test_lctrain_kernels_is_the_repo_kernels_dir():
    import lctrain_kernels
    from lctrain_kernels.torch_blockwise import blockwise_attention

    assert Path(lctrain_kernels.__file__).resolve().parent == ROOT / "kernels"
    assert callable(blockwise_attention)


def test_bare_kernels_name_is_not_installed(tmp_path):
    # Outside the checkout (pytest puts the repo root on sys.path), `kernels` must not
    # resolve to this repo's kernels/: it would shadow PyPI's `kernels` package.
    code = "import importlib.util as u; s = u.find_spec('kernels'); print(s.origin if s else None)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin"}, timeout=60)
    assert proc.returncode == 0, proc.stderr
    origin = proc.stdout.strip()
    assert origin == "None" or not Path(origin).resolve().is_relative_to(ROOT), origin
    check = "import lctrain_kernels; print(lctrain_kernels.__file__)"
    proc = subprocess.run([sys.executable, "-c", check], cwd=tmp_path, capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin"}, timeout=60)
    assert proc.returncode == 0, proc.stderr  # the installed (editable) name does resolve


def test_conf_resources():
    conf = importlib.resources.files("lctrain.conf")
    assert (conf / "train.yaml").is_file()
    groups = {p.name for p in conf.iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert groups >= {"model", "data", "cp", "kernel", "optim", "logger", "experiment"}
    for group in groups:
        assert any(p.name.endswith(".yaml") for p in (conf / group).iterdir()), group
    assert (conf / "model" / "tiny.yaml").is_file()
    assert (conf / "experiment" / "cpu_demo.yaml").is_file()


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    # setuptools >= 70.1 builds wheels itself; older ones need the `wheel` package.
    if importlib.util.find_spec("setuptools") is None:
        pytest.skip("building the wheel needs setuptools importable (pip install setuptools)")
    if importlib.util.find_spec("setuptools.command.bdist_wheel") is None and (
        importlib.util.find_spec("wheel") is None
    ):
        pytest.skip("building the wheel needs setuptools>=70.1 or the `wheel` package (pip install wheel)")
    tmp = tmp_path_factory.mktemp("wheel")
    # Build from a clean copy of the checkout: an in-tree build reuses build/lib, where
    # modules deleted from the source would linger and reach the wheel.
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=NOT_SOURCE)
    out = tmp / "dist"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "--no-index", "-q", "-w", str(out), str(src)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (path,) = out.glob("lctrain-*.whl")
    return path


@pytest.mark.slow
def test_wheel_contents(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for expected in (
        "lctrain_kernels/__init__.py",
        "lctrain_kernels/torch_blockwise.py",
        "lctrain/conf/__init__.py",
        "lctrain/conf/train.yaml",
        "lctrain/conf/model/tiny.yaml",
        "lctrain/conf/experiment/cpu_demo.yaml",
        "lctrain/models/llama.py",
    ):
        assert expected in names, f"{expected} missing from {wheel.name}"
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"lctrain", "lctrain_kernels"}, f"unexpected top-level entries {tops}"
    # Every source module and every config of the checkout is in the wheel.
    for d in python_package_dirs():
        for py in d.glob("*.py"):
            assert f"{import_name(d).replace('.', '/')}/{py.name}" in names, py
    for yaml in (ROOT / "conf").rglob("*.yaml"):
        assert f"lctrain/conf/{yaml.relative_to(ROOT / 'conf').as_posix()}" in names, yaml


@pytest.mark.slow
def test_wheel_composes_configs(wheel, tmp_path):
    """The unpacked wheel alone (no source checkout) imports and composes the configs."""
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = (
        "import lctrain, lctrain_kernels, lctrain.models.llama\n"
        "from hydra import compose, initialize_config_module\n"
        "from lctrain.config import register_configs, validate\n"
        "register_configs()\n"
        "with initialize_config_module(config_module='lctrain.conf', version_base='1.3'):\n"
        "    cfg = compose('train', overrides=['experiment=cpu_demo', 'model=llama_150m'])\n"
        "assert validate(cfg, 2) == 1  # cpu_demo splits each sequence over 2 ranks\n"
        "print(lctrain.__file__, lctrain_kernels.__file__, cfg.model.dim, cfg.data.seq_len)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120,
        env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 0, proc.stderr
    lctrain_file, kernels_file, dim, seq_len = proc.stdout.split()
    assert Path(lctrain_file).is_relative_to(site) and Path(kernels_file).is_relative_to(site)
    assert (dim, seq_len) == ("768", "4096")
