"""The package as `pip install .` installs it (the container images do): a wheel holds every
file the services read at run time, not only the modules."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_wheel_holds_every_file_the_services_read(tmp_path):
    src = tmp_path / "src"  # a copy, as the image's build context: no build/ left from another build
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in ("pmgd", "pmgd_node", "services"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(src)], check=True, capture_output=True, timeout=300)
    (wheel,) = tmp_path.glob("pmgd_cluster-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    tracked = subprocess.run(["git", "ls-files", "pmgd", "pmgd_node", "services"], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout.split()
    missing = [path for path in tracked if path not in names]
    assert missing == [], f"the wheel lacks {missing}"
