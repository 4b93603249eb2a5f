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
    ("r.txt", "--export 'r.txt': unknown export format; expected a .json, .pickle, .pkl or .html "
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


def test_run_does_not_replace_a_file_that_is_not_a_profile(tmp_path, capsys):
    """`memprof run -o train.py train.py` replaced the script with a zip file."""
    script = tmp_path / "train.py"
    script.write_text(f"open({str(tmp_path / 'ran')!r}, 'a').write('x')\n")
    data = tmp_path / "notes.txt"
    data.write_text("precious\n")
    for target in (script, data):
        before = target.read_bytes()
        assert main(["run", "-o", str(target), str(script)]) == 2
        err = capsys.readouterr().err
        assert f"--output {str(target)!r}: exists and is not a memprof profile" in err
        assert target.read_bytes() == before
    assert not (tmp_path / "ran").exists()
    # an earlier profile is replaced, as every run of the same script does
    out = tmp_path / "train.memprof"
    assert main(["run", "-o", str(out), str(script)]) == 0
    assert main(["run", "-o", str(out), str(script)]) == 0
    assert (tmp_path / "ran").read_text() == "xx"


def test_a_saved_profile_gets_the_mode_a_new_file_gets(tmp_path):
    """Profiles were written 0600 (mkstemp's mode) whatever the umask: teammates could not
    read one in a shared output directory."""
    import torch
    import memprof
    old = os.umask(0o022)
    try:
        model = torch.nn.Linear(4, 2)
        with memprof.track(model, path=str(tmp_path / "run.memprof")):
            model(torch.randn(3, 4)).sum().backward()
    finally:
        os.umask(old)
    assert os.stat(tmp_path / "run.memprof").st_mode & 0o777 == 0o644


def test_run_output_with_a_name_too_long_or_a_file_for_a_directory(tmp_path, capsys,
                                                                   monkeypatch):
    """A name of 260 bytes passed the check, the script trained, and the save failed after
    it (File name too long); `-o train.py/x.memprof` said the directory did not exist."""
    script = tmp_path / "marker.py"
    script.write_text(f"open({str(tmp_path / 'ran')!r}, 'w').write('x')\n")
    monkeypatch.chdir(tmp_path)
    long_name = "a" * 260 + ".memprof"
    assert main(["run", "-o", long_name, str(script)]) == 2
    err = capsys.readouterr().err
    assert f"--output '{long_name}': a file name of 268 bytes; this file system takes " \
           "names of at most 255" in err
    assert main(["run", "-o", "marker.py/x.memprof", str(script)]) == 2
    err = capsys.readouterr().err
    assert f"--output 'marker.py/x.memprof': '{script}' is a file, not a directory" in err
    assert not (tmp_path / "ran").exists()


def test_track_refuses_a_path_that_is_no_profile_before_recording(tmp_path):
    """`track(path="train.py")` (a mistyped path) replaced the script with a profile; `memprof
    run -o` refused the same. A profile there is replaced, as before."""
    import torch
    import memprof
    victim = tmp_path / "train.py"
    victim.write_text("print('my training script')\n")
    model = torch.nn.Linear(4, 2)
    with pytest.raises(ValueError, match=r"track\(path=.*train.py'\): .* exists and is not a "
                                         r"memprof profile \(it would be replaced\)"):
        with memprof.track(model, path=str(victim)):
            model(torch.randn(3, 4)).sum().backward()
    assert victim.read_text() == "print('my training script')\n"
    assert not memprof._C.is_active()   # refused before recording started
    path = tmp_path / "run.memprof"
    for _ in range(2):   # the second block replaces the first's profile
        with memprof.track(model, path=str(path)):
            model(torch.randn(3, 4)).sum().backward()
    assert memprof.load(str(path)).peak > 0


def test_an_empty_file_at_the_path_is_replaced(tmp_path, capsys):
    """A NamedTemporaryFile or a scheduler's placeholder (empty) is no one's data: replaced."""
    import torch
    import memprof
    placeholder = tmp_path / "run.memprof"
    placeholder.write_bytes(b"")
    model = torch.nn.Linear(4, 2)
    with memprof.track(model, path=str(placeholder)):
        model(torch.randn(3, 4)).sum().backward()
    assert memprof.load(str(placeholder)).peak > 0
    script = tmp_path / "train.py"
    script.write_text("import torch\ntorch.ones(8).sum()\n")
    out = tmp_path / "cli.memprof"
    out.write_bytes(b"")
    assert main(["run", "-o", str(out), str(script)]) == 0, capsys.readouterr().err
    assert memprof.load(str(out)).meta is not None


def test_prof_save_refuses_what_track_path_refuses(tmp_path):
    """`prof.save("victim_train.py")` (a typo for .memprof) replaced the script with a zip, and
    a save into a missing directory raised an error that named memprof's temporary file."""
    import torch
    import memprof
    model = torch.nn.Linear(4, 2)
    with memprof.track(model) as prof:
        model(torch.randn(3, 4)).sum().backward()
    victim = tmp_path / "victim_train.py"
    victim.write_text("print('my training script')\n")
    with pytest.raises(ValueError, match=r"save\(.*victim_train.py'\): exists and is not a "
                                         r"memprof profile \(it would be replaced\)"):
        prof.save(str(victim))
    assert victim.read_text() == "print('my training script')\n"
    missing = tmp_path / "no_such_dir" / "run.memprof"
    with pytest.raises(ValueError, match=r"save\(.*run.memprof'\): directory .*no_such_dir' "
                                         r"does not exist") as err:
        prof.save(str(missing))
    assert ".tmp" not in str(err.value)
    with pytest.raises(ValueError, match="is a directory"):
        prof.save(str(tmp_path))
    assert memprof.load(prof.save(str(tmp_path / "ok.memprof"))).peak > 0


def test_track_refuses_a_missing_or_unwritable_directory_before_recording(tmp_path):
    """The block ran to its end, every autosave failed without a word, and the last save
    printed one line: a long run ended without its profile."""
    import os
    import torch
    import memprof
    model = torch.nn.Linear(4, 2)
    with pytest.raises(ValueError, match=r"track\(path=.*\): directory .*nodir' does not exist"):
        with memprof.track(model, path=str(tmp_path / "nodir" / "x.memprof"), autosave=0.5):
            raise AssertionError("the block must not start")
    assert not memprof._C.is_active()
    if os.geteuid() != 0:   # (root writes into a read-only directory)
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        try:
            with pytest.raises(ValueError, match=r"cannot create a file in"):
                with memprof.track(model, path=str(ro / "x.memprof")):
                    raise AssertionError("the block must not start")
        finally:
            ro.chmod(0o700)
    if os.path.isdir("/proc/self"):   # no file can be made there, for root either
        with pytest.raises(ValueError, match=r"cannot create a file in '/proc/self'"):
            with memprof.track(model, path="/proc/self/x.memprof"):
                raise AssertionError("the block must not start")


def test_an_export_never_replaces_a_profile(tmp_path, capsys):
    """`memprof run -o r.json` saved the profile as r.json; `memprof report r.json --export
    r.json` then replaced it with its own trace, and the profile was gone."""
    import torch
    import memprof
    path = tmp_path / "r.json"
    model = torch.nn.Linear(4, 2)
    with memprof.track(model) as prof:
        model(torch.randn(3, 4)).sum().backward()
    prof.save(str(path))              # a profile saved under an export's name (the API allows it)
    before = path.read_bytes()
    assert main(["report", str(path), "--export", str(path)]) == 2
    out, err = capsys.readouterr()
    assert f"--export {str(path)!r}: is a memprof profile (it would be replaced by the " \
           "export); give another file name" in err and out == ""
    with pytest.raises(ValueError, match="is a memprof profile"):
        memprof.export(prof, str(path))
    assert path.read_bytes() == before and memprof.load(str(path)).peak > 0
    # an earlier export is replaced, as before
    html = tmp_path / "r.html"
    assert main(["report", str(path), "--export", str(html)]) == 0
    assert main(["report", str(path), "--export", str(html)]) == 0


@pytest.mark.parametrize("name", ["r.html", "r.json", "r.pickle", "R.PKL"])
def test_run_output_named_as_an_export_is_refused_before_the_script(tmp_path, capsys, name):
    """`memprof run -o report.html train.py` trained, then wrote a zip file named
    report.html (a browser showed bytes); the report is an export of the profile."""
    script = tmp_path / "marker.py"
    script.write_text(f"open({str(tmp_path / 'ran')!r}, 'w').write('x')\n")
    target = tmp_path / name
    assert main(["run", "-o", str(target), str(script)]) == 2
    err = capsys.readouterr().err
    assert f"--output {str(target)!r}: a profile is a .memprof file" in err
    assert "memprof report" in err and "--export" in err and err.count("\n") == 1
    assert not (tmp_path / "ran").exists() and not target.exists()
