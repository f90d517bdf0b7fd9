"""A newcomer's first hour with the `pmgd` command (issue 11): shipped configs, help text,
config-file errors, missing data, study parameter errors, and the Makefile's apt-get."""

import dataclasses
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pmgd_node.config import ConfigError, JobConfig, read_mapping

ROOT = Path(__file__).resolve().parents[2]
PMGD = shutil.which("pmgd") or os.path.join(os.path.dirname(sys.executable), "pmgd")


def pmgd(*args, env=None, timeout=120):
    return subprocess.run([PMGD, *args], capture_output=True, text=True, cwd=ROOT, timeout=timeout,
                          env=dict(os.environ, **(env or {})))


# --- shipped configs -------------------------------------------------------------------------------

def _study_of(path: Path) -> str | None:
    """configs/study-<name>[-…].toml holds parameters of study <name>; every other file a job."""
    return path.stem.split("-")[1] if path.stem.startswith("study-") else None


def test_every_shipped_config_loads_with_the_real_loaders():
    from services import studies
    from services.studies.sweep import resolve_params

    files = sorted((ROOT / "configs").iterdir())
    assert len(files) >= 6
    for path in files:
        study = _study_of(path)
        if study is None:
            JobConfig.load(str(path))
        else:
            params = resolve_params(studies.get(study), read_mapping(str(path)))
            assert set(read_mapping(str(path))) <= set(params)


def test_every_config_path_in_the_readme_exists_and_every_config_is_shown():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    mentioned = set(re.findall(r"configs/[\w.-]+\.(?:toml|json)", readme))
    assert mentioned, "the README shows no configs/ file"
    missing = sorted(p for p in mentioned if not (ROOT / p).is_file())
    assert not missing, f"README mentions files the repository does not have: {missing}"
    shipped = {f"configs/{p.name}" for p in (ROOT / "configs").iterdir()}
    assert shipped <= mentioned, f"configs no README command uses: {sorted(shipped - mentioned)}"
    for command in ("submit configs/", "--config configs/"):  # the commands use them, not only prose
        assert command in readme


# --- pmgd train --help -----------------------------------------------------------------------------

def _help_entries(text: str) -> dict[str, str]:
    """Each option's help entry, its wrapped lines joined, keyed by its first long flag."""
    entries: dict[str, str] = {}
    current = None
    for line in text.splitlines():
        m = re.match(r"^  (-\w, )?(--[\w-]+)", line)
        if m:
            current = m.group(2)
            entries[current] = line.strip()
        elif current is not None and line.startswith("   "):
            entries[current] += " " + line.strip()
        else:
            current = None
    return entries


def _expected_default(value) -> str | None:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, tuple):
        return " ".join(str(v) for v in value)
    if value == "":
        return None  # said in words
    return str(value)


def test_train_help_shows_every_real_default_once_and_never_repeats_a_flag_name():
    r = pmgd("train", "--help", env={"COLUMNS": "100"})
    assert r.returncode == 0, r.stderr
    entries = _help_entries(r.stdout)
    assert "(default: None)" not in " ".join(entries.values())
    for f in dataclasses.fields(JobConfig):
        if f.name == "node_links":  # nested: config files only
            continue
        flag = "--" + f.name.replace("_", "-")
        entry = entries.get(flag)
        assert entry is not None, f"no {flag} in pmgd train --help"
        assert entry.count("(default:") == 1, entry
        shown = entry.split("(default: ", 1)[1]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        expected = _expected_default(default)
        if expected is None:
            assert not shown.startswith((")", "None")), entry
        else:
            assert shown.startswith(expected + ")") or shown.startswith(expected + ","), (flag, expected, entry)
    for flag, entry in entries.items():  # e.g. not "--eta ETA" nor "--batch N  batch"
        name = flag[2:]
        words = entry[entry.index(flag) + len(flag):].split()
        assert not words or words[0] != name.upper().replace("-", "_"), f"{flag} repeats its name: {entry}"
        text = " ".join(words[1:]).split(" (default:")[0]
        for said in (text, " ".join(words)):
            assert said.lower() != name.replace("-", " "), f"{flag}'s help is its name: {entry}"


def test_flags_left_unset_never_override_a_config_file(tmp_path):
    from services.cli import build_parser, config_fields

    cfg = tmp_path / "job.toml"
    cfg.write_text('task = "parity3"\neta = 0.7\nseeds = 5\n')
    args = build_parser().parse_args(["train", "--config", str(cfg), "--seeds", "2"])
    assert not hasattr(args, "eta")  # unset flags are absent: the parser default is no value
    assert config_fields(args) == {"task": "parity3", "eta": 0.7, "seeds": 2}


# --- config files that do not parse ---------------------------------------------------------------

BROKEN = {"broken.toml": 'task = "parity2"\neta = 0.5\nseeds = \n',
          "broken.json": '{\n  "task": "parity2",\n  "eta": 0.5,\n}\n'}
LINE = {"broken.toml": 3, "broken.json": 4}


@pytest.mark.parametrize("command", ["train", "jobs", "study"])
@pytest.mark.parametrize("name", sorted(BROKEN))
def test_config_syntax_errors_exit_2_with_one_line_naming_file_and_line(tmp_path, name, command):
    path = tmp_path / name
    path.write_text(BROKEN[name])
    args = {"train": ["train", "--config", str(path)],
            "jobs": ["jobs", "--api", "http://127.0.0.1:9", "submit", str(path)],  # fails before any request
            "study": ["study", "noise", "--out", str(tmp_path / "out"), "--config", str(path)]}[command]
    r = pmgd(*args)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2, r.stderr
    assert len(lines) == 1, r.stderr
    assert name in lines[0] and f"line {LINE[name]}" in lines[0] and "column" in lines[0], lines[0]
    assert "Traceback" not in r.stderr and r.stdout == ""


def test_read_mapping_names_file_line_and_problem(tmp_path):
    path = tmp_path / "cut.toml"
    path.write_text('task = "parity2"\nfm_band = [0.1,\n')  # ends inside the array
    with pytest.raises(ConfigError, match=r"cut\.toml'.*line 2"):
        read_mapping(str(path))
    with pytest.raises(ConfigError, match=r"nowhere\.json': cannot read it"):
        read_mapping(str(tmp_path / "nowhere.json"))


# --- missing data ---------------------------------------------------------------------------------

def test_missing_fmnist_data_is_reported_before_any_progress_bar(tmp_path):
    r = pmgd("train", "--task", "fmnist", "--data-dir", str(tmp_path))
    assert r.returncode == 1
    assert "train-images-idx3-ubyte" in r.stderr
    assert "━" not in r.stderr and "training" not in r.stderr and "ticks ·" not in r.stderr, r.stderr


# --- study parameters -----------------------------------------------------------------------------

def test_study_parameter_errors_name_the_study_parameter(tmp_path):
    from services import studies
    from services.studies.sweep import resolve_params

    noise = studies.get("noise")
    for given, name in (({"sedes": 3}, "sedes"), ({"seeds": "many"}, "seeds"), ({"seeds": 0}, "seeds"),
                        ({"max_ticks": -5}, "max_ticks")):
        with pytest.raises(ConfigError) as err:
            resolve_params(noise, given)
        assert str(err.value).startswith(f"study parameter '{name}': "), str(err.value)
        assert "job config field" not in str(err.value)
    r = pmgd("study", "noise", "--out", str(tmp_path / "o"), "--set", "seeds=0")
    assert r.returncode == 2 and "study parameter 'seeds'" in r.stderr, r.stderr
    assert not (tmp_path / "o").exists()  # stopped before the study started


# --- make test's apt-get --------------------------------------------------------------------------

def test_browser_target_waits_for_the_dpkg_lock_and_the_readme_says_it_installs_chromium():
    # The commands make would run when chromium is missing (make is what README asks for).
    recipe = subprocess.run(["make", "-n", "-C", str(ROOT), "browser", "CHROMIUM=/nonexistent/chromium"],
                            capture_output=True, text=True, check=True).stdout
    calls = re.findall(r"apt-get[^;&|}]*", recipe)
    assert any(" update" in c for c in calls) and any(" install" in c for c in calls), recipe
    for call in calls:
        assert "-o DPkg::Lock::Timeout=300" in call, call
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    quick_start = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    assert "make test" in quick_start and "chromium" in quick_start and "apt-get" in quick_start
    assert "sudo" in quick_start or "root" in quick_start
