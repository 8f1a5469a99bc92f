import subprocess
import sys

from edice_dist.cli import _overrides, main


def test_overrides_parse_both_forms():
    assert _overrides(["--lr=1e-4", "--epochs", "3", "--use-gpu"]) == {
        "lr": "1e-4", "epochs": "3", "use_gpu": "true"}


def test_user_error_is_one_paragraph_and_nonzero(tmp_path, capsys):
    rc = main(["info", str(tmp_path / "nothing-here")])
    err = capsys.readouterr().err
    assert rc == 1
    assert err.startswith("edice info: error:") and "nothing-here" in err
    assert "Traceback" not in err


def test_unknown_flags_rejected_where_no_overrides(tmp_path, capsys):
    try:
        main(["info", str(tmp_path), "--bogus=1"])
    except SystemExit as e:
        assert e.code == 2
    else:  # pragma: no cover
        raise AssertionError("argparse should exit")


def test_console_entry_point_runs():
    out = subprocess.run([sys.executable, "-m", "edice_dist", "--help"],
                         capture_output=True, text=True, check=True).stdout
    for cmd in ["simulate", "ingest", "info", "train", "finetune", "impute", "export", "evaluate"]:
        assert cmd in out
