"""The CLI: help for every verb, user errors as one line with exit status 2."""

import subprocess
import sys

import pytest

from predet import cli


def test_help_lists_verbs(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for verb in ("data", "pretrain", "finetune", "export"):
        if cli._available({v[0][0]: v[1] for v in cli.VERBS}[verb]):
            assert verb in out


def test_no_verb_is_usage_error(capsys):
    assert cli.main([]) == 2


@pytest.mark.parametrize("path, module, _help, _args", cli.VERBS)
def test_every_available_verb_has_help(path, module, _help, _args, capsys):
    if not cli._available(module):
        pytest.skip(f"{module} not built")
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
    if "invalid choice" in r.stderr:
        pytest.skip("pretrain not built")
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "nope.yaml" in r.stderr
