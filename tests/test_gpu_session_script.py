"""bench/gpu_session.sh, checked without a GPU: every benchmark command it runs parses with that
script's own argument parser, and every test file it names exists.

The first session with a GPU gets 30 minutes of device time in 10-minute calls; a misspelt flag or
a renamed test file there costs a whole call. This runs each script's ``main`` with the script's
arguments and stops it right after ``parse_args`` succeeds (nothing is measured).
"""
from __future__ import annotations

import argparse
import importlib
import os
import re
import shlex
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "bench", "gpu_session.sh")
sys.path.insert(0, os.path.join(ROOT, "bench"))


def _commands() -> dict[str, list[str]]:
    """Each ``run <name> "$PY" ...`` line of the script (continuations joined): name -> arguments."""
    text = open(SCRIPT).read().replace("\\\n", " ")
    out = {}
    for line in text.splitlines():
        m = re.match(r'\s*run (\S+) "\$PY" (.*)$', line)
        if m:
            assert m.group(1) not in out, f"two commands log to {m.group(1)}.log"
            out[m.group(1)] = shlex.split(m.group(2).replace('"$RES"', "RES"))
    return out


BENCH_CMDS = {k: c for k, c in _commands().items() if c[0].startswith("bench/")}
PYTEST_CMDS = {k: c for k, c in _commands().items() if c[:2] == ["-m", "pytest"]}


class _Parsed(Exception):
    pass


def _stop_after_parsing(monkeypatch):
    """Make every ArgumentParser raise _Parsed(namespace) once parse_args succeeds (a bad flag or
    choice still exits 2 from inside parse_args)."""
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        raise _Parsed(original(self, args, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)


def test_the_script_runs_benchmarks_and_tests():
    # the parse below would pass vacuously on an empty list
    assert len(BENCH_CMDS) >= 15 and len(PYTEST_CMDS) == 7


@pytest.mark.parametrize("name", BENCH_CMDS)
def test_benchmark_arguments_parse(name, monkeypatch):
    cmd = BENCH_CMDS[name]
    script = cmd[0]
    assert os.path.isfile(os.path.join(ROOT, script)), script
    module = importlib.import_module(os.path.splitext(os.path.basename(script))[0])
    _stop_after_parsing(monkeypatch)
    with pytest.raises(_Parsed) as parsed:
        module.main(cmd[1:])
    ns = parsed.value.args[0]
    # every GPU-session benchmark runs on the GPU (bench_epoch: through its preset)
    device = ns.device if ns.device is not None else module.PRESETS[ns.preset]["device"]
    assert device == "cuda"


def test_benchmark_parser_rejects_a_misspelt_flag(monkeypatch, capsys):
    # the check above can fail: the same machinery on a flag no script has
    module = importlib.import_module("bench_fused")
    _stop_after_parsing(monkeypatch)
    with pytest.raises(SystemExit):
        module.main(["--device", "cuda", "--eager-ablations"])
    assert "unrecognized arguments: --eager-ablations" in capsys.readouterr().err


@pytest.mark.parametrize("name", PYTEST_CMDS)
def test_named_test_files_exist_and_markers_are_registered(name):
    cmd = PYTEST_CMDS[name]
    files = [a for a in cmd if a.startswith("tests/")]
    for f in files:
        assert os.path.isfile(os.path.join(ROOT, f)), f
    if "-m" in cmd[2:]:
        marker = cmd[2:][cmd[2:].index("-m") + 1]
        assert re.search(rf'^\s*"{marker}:', open(os.path.join(ROOT, "pyproject.toml")).read(), re.M), marker


def test_script_syntax_and_unknown_stage(tmp_path):
    assert subprocess.run(["bash", "-n", SCRIPT]).returncode == 0
    r = subprocess.run(["bash", SCRIPT, "nonsense"], cwd=ROOT, capture_output=True, text=True,
                       env=dict(os.environ, OUT=str(tmp_path)))
    assert r.returncode == 2 and "usage: bash bench/gpu_session.sh build|step|memory|epoch|graphs" in r.stderr


def test_stage_budget_stops_a_long_command_and_packs_what_ran(tmp_path):
    # the selftest stage: true, false, sleep 60, true under a 17 s budget. The sleep is stopped at the
    # budget, the last command is skipped, and the summary and tarball list all of it.
    import tarfile

    r = subprocess.run(["bash", SCRIPT, "selftest"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, OUT=str(tmp_path), STAGE_BUDGET_S="17"))
    assert r.returncode == 1, r.stdout + r.stderr
    assert "SKIPPED (budget spent): after_budget" in r.stdout and "FAILED: fails slow" in r.stdout
    summary = (tmp_path / "gpu_selftest_summary.md").read_text()
    assert "FAILED: fails slow" in summary and "SKIPPED (budget spent): after_budget" in summary
    timings = dict(line.split(" ", 1) for line in summary.split("## seconds per command")[1].splitlines()
                   if line.startswith(("ok ", "fails ", "slow ")))
    assert timings["ok"].endswith("(exit 0)") and timings["fails"].endswith("(exit 1)")
    assert timings["slow"].endswith("(exit 124)") and 14 <= int(timings["slow"].split()[0]) <= 19
    with tarfile.open(tmp_path / "gpu_selftest.tar.gz") as t:
        names = {os.path.basename(n) for n in t.getnames()}
    assert {"ok.log", "fails.log", "slow.log", "timings.txt"} <= names
    assert "stopped after" in (subprocess.run(["tar", "xzOf", str(tmp_path / "gpu_selftest.tar.gz"), "./slow.log"],
                                              capture_output=True, text=True).stdout)
    assert not list(tmp_path.glob("*.tmp"))
