"""The CLI: help for every verb, user errors as one line with exit status 2."""

import re
import subprocess
import sys

import pytest

from predet import cli

# every verb of DESIGN §4
DESIGN_VERBS = [("data", "synth"), ("data", "vocab"), ("data", "queries"), ("data", "shards"),
                ("pretrain",), ("export",), ("finetune",), ("evaluate",), ("analyze", "correlation"),
                ("compare",), ("demo",), ("bench", "step")]  # fmt: skip


def test_help_lists_verbs(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    listed = {line.split()[0] for line in capsys.readouterr().out.splitlines() if line.startswith("    ")}
    assert {v[0] for v in DESIGN_VERBS} <= listed
    for verb in (v for v in DESIGN_VERBS if len(v) == 2):
        with pytest.raises(SystemExit):
            cli.main([verb[0], "--help"])
        out = capsys.readouterr().out
        assert verb[1] in {line.split()[0] for line in out.splitlines() if line.startswith("    ")}, verb


def test_missing_dependency_is_one_line_naming_it(tmp_path):
    """Without OpenCV the data verbs stay listed, and running one names the package."""
    code = (
        "import sys; sys.modules['cv2'] = None\n"  # `import cv2` now raises ModuleNotFoundError
        "from predet import cli\n"
        "sys.exit(cli.main(['data', 'queries', '--manifest', 'm.jsonl', '--out', 'q']))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert r.stderr.strip().splitlines() == [
        "predet: error: 'predet data queries' needs the Python package 'cv2', which is not "
        "installed (pip install opencv-contrib-python-headless)"
    ]
    r = subprocess.run([sys.executable, "-c", code.replace("'queries', '--manifest', 'm.jsonl', "
                        "'--out', 'q'", "'--help'")], capture_output=True, text=True, cwd=tmp_path)  # fmt: skip
    assert r.returncode == 0 and "queries" in r.stdout and "synth" in r.stdout


def test_no_verb_is_usage_error(capsys):
    assert cli.main([]) == 2


@pytest.mark.parametrize("path, command, _help, _args", cli.VERBS)
def test_every_verb_has_help(path, command, _help, _args, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([*path, "--help"])
    assert e.value.code == 0
    assert "usage: predet " + " ".join(path) in capsys.readouterr().out


def test_python_dash_m_is_the_same_entry_point():
    r = subprocess.run([sys.executable, "-m", "predet", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "PreDet" in r.stdout


def test_user_error_is_one_line_exit_2(tmp_path):
    # a config that does not exist: one line on stderr, exit 2, no traceback
    r = subprocess.run(
        [sys.executable, "-m", "predet", "pretrain", "--config", str(tmp_path / "nope.yaml")],
        capture_output=True, text=True,
    )
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "nope.yaml" in r.stderr


def test_overrides_may_follow_flags_and_a_group_prints_its_own_help(capsys, monkeypatch):
    seen = {}
    monkeypatch.setattr("predet.commands.pretrain", lambda args: seen.update(vars(args)) or 0)
    assert cli.main(["pretrain", "--config", "c.yaml", "train.steps=1", "--overwrite", "train.lr=2"]) == 0
    assert seen["overrides"] == ["train.steps=1", "train.lr=2"] and seen["overwrite"] is True
    with pytest.raises(SystemExit) as e:  # what is neither a flag nor key=value is still refused
        cli.main(["pretrain", "--config", "c.yaml", "train.steps=1", "--overwrite", "stray"])
    assert e.value.code == 2 and "unrecognized arguments: stray" in capsys.readouterr().err
    assert cli.main(["data"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: predet data") and "synth" in err and "queries" in err


@pytest.mark.parametrize("verb", [["pretrain"], ["finetune", "--init", "scratch"]])
def test_resume_and_overwrite_together_is_a_usage_error(verb, tmp_path, capsys):
    """--resume continues a run, --overwrite deletes it: both at once resumed and dropped --overwrite."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "keep.txt").write_text("x")
    with pytest.raises(SystemExit) as e:
        cli.main([*verb, "--config", "c.yaml", "--out", str(run), "--resume", "--overwrite"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert re.search(r"argument --(overwrite|resume): not allowed with argument --(resume|overwrite)", err)
    assert (run / "keep.txt").read_text() == "x"
