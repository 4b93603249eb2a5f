"""An output that cannot be written is said before the work, not after it: `run -o` in a
directory where no file can be made (the script ran and the profile was lost), `report
--export` with an unknown format or a missing directory, `recommend --html` likewise."""
import os

import pytest

from memprof.cli import main


def test_run_output_in_an_unwritable_directory_fails_before_the_script(tmp_path, capsys):
    if not os.path.isdir("/proc/self"):
        pytest.skip("needs /proc (Linux): a directory where even root cannot create a file")
    script = tmp_path / "marker.py"
    script.write_text(f"open({str(tmp_path / 'ran')!r}, 'w').write('x')\n")
    assert main(["run", "-o", "/proc/x.memprof", str(script)]) == 2
    err = capsys.readouterr().err
    assert "--output '/proc/x.memprof': cannot create a file in '/proc'" in err
    assert not (tmp_path / "ran").exists()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    import torch
    import memprof
    path = tmp_path_factory.mktemp("saved") / "run.memprof"
    model = torch.nn.Linear(4, 2)
    with memprof.track(model, path=str(path)):
        model(torch.randn(3, 4)).sum().backward()
    return str(path)


@pytest.mark.parametrize("target, message", [
    ("r.txt", "--export 'r.txt': unknown export format; expected a .json, .pickle or .html "
              "file name"),
    ("/nonexistent_dir_x/r.html", "--export '/nonexistent_dir_x/r.html': directory "
                                  "'/nonexistent_dir_x' does not exist"),
])
def test_report_export_is_checked_before_the_report(saved, capsys, target, message):
    assert main(["report", saved, "--export", target]) == 2
    out, err = capsys.readouterr()
    assert message in err and out == ""      # nothing printed before the error


def test_recommend_html_is_checked_before_the_search(capsys):
    assert main(["recommend", "--gpu", "v100-16gb", "--model", "mlp", "--html",
                 "/nonexistent_dir_x/plan.html"]) == 2
    out, err = capsys.readouterr()
    assert "--html '/nonexistent_dir_x/plan.html': directory '/nonexistent_dir_x' does not " \
           "exist" in err and out == ""
