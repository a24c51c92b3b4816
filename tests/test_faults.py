"""Faults: a run killed between any two of its state writes, or while a second run holds its --out, loses nothing and
mixes nothing. The kill is injected at the file-system calls a save makes (the tensors file appearing, the JSON that
commits it appearing, the old tensors file removed) as a KeyboardInterrupt, the way a signal stops the process."""
import json
import os

import pytest
import torch

import fcit
import files

ARGS = ["--setting", "cap-hom", "--methods", "disco", "--stages", "2", "--rounds", "2", "--clients", "5",
        "--clients-per-round", "5", "--batch-size", "8", "--eval-samples", "2", "--max-new-tokens", "3", "--quiet",
        "--workers", "1", "--threads", "1"]


@pytest.fixture(autouse=True)
def small_benchmarks(tmp_path_factory, monkeypatch):
    torch.set_num_threads(1)
    monkeypatch.setattr(fcit, "CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))
    monkeypatch.setattr(fcit, "MINI", dict(n_train=30, n_test=4))


def results(out):
    r = json.load(open(os.path.join(out, "results.json")))
    for m in r["methods"].values():
        m.pop("wall_s")
    return r


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "out"
    mp = pytest.MonkeyPatch()
    mp.setattr(fcit, "CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))
    mp.setattr(fcit, "MINI", dict(n_train=30, n_test=4))
    torch.set_num_threads(1)
    assert fcit.main(ARGS + ["--out", str(out)]) == 0
    mp.undo()
    return results(out)


@pytest.mark.parametrize("write", ["tensors", "json", "remove"])
def test_a_kill_between_state_writes_resumes_to_the_same_results(tmp_path, monkeypatch, reference, write):
    """The third save (mid-stage) is cut before its tensors file is written, between that file and the JSON that
    commits it, or between the commit and the removal of the previous tensors file; the rerun gives the uninterrupted
    run's results and leaves exactly the committed files."""
    calls = {"tensors": 0, "json": 0, "remove": 0}
    real_replace, real_remove = os.replace, os.remove

    def cut(kind):
        calls[kind] += 1
        if kind == write and calls[kind] == 3:
            raise KeyboardInterrupt(f"killed at the {kind} step of the third save")

    def replace(src, dst):                      # files.atomic_write's last step: the file appears whole
        if os.sep + "state" + os.sep in str(dst):
            cut("json" if str(dst).endswith(".json") else "tensors")
        real_replace(src, dst)

    def remove(path):
        if os.sep + "state" + os.sep in str(path) and not os.path.basename(path).startswith("."):   # not a temp file
            cut("remove")
        real_remove(path)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(os, "remove", remove)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        fcit.main(ARGS + ["--out", str(out)])
    monkeypatch.setattr(os, "replace", real_replace)
    monkeypatch.setattr(os, "remove", real_remove)
    assert fcit.main(ARGS + ["--out", str(out)]) == 0
    assert results(out) == reference
    left = sorted(os.listdir(out / "state"))
    assert left == sorted(["disco.json", json.load(open(out / "state" / "disco.json"))["tensors"]])   # no stray file


def test_a_busy_out_is_refused_and_a_stale_lock_taken_over(tmp_path, capsys):
    """OUT/.lock names a live process (this one): a run on that --out exits 2 naming its PID, and writes nothing. A lock
    of a process that has ended is taken over, the run completes, and the lock is gone afterwards."""
    import subprocess
    import sys
    out = tmp_path / "out"
    out.mkdir()
    (out / ".lock").write_text(json.dumps({"pid": os.getpid(), "start": files._started(os.getpid()), "since": "now"}))
    small = ARGS[:4] + ["--stages", "1", "--rounds", "1"] + ARGS[8:] + ["--out", str(out)]
    assert fcit.main(small) == 2
    assert f"in use by another run: PID {os.getpid()}" in capsys.readouterr().err
    assert sorted(os.listdir(out)) == [".lock"]
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(ended.stdout)                             # that process has exited: its lock is stale
    (out / ".lock").write_text(json.dumps({"pid": pid, "start": "12345", "since": "earlier"}))
    assert fcit.main(small) == 0
    assert not (out / ".lock").exists() and (out / "results.json").exists()


def _wait(cond, timeout):
    import time
    end = time.time() + timeout
    while time.time() < end:
        if cond():
            return True
        time.sleep(0.2)
    return False


def _group_alive(pgid):
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


@pytest.fixture(scope="module")
def stop_run(tmp_path_factory):
    """The command of a small two-method run with --workers 2 on a small FCIT-mini release, and its results when run
    without interruption (in this process, one method after another: the same results, tested in test_fcit.py)."""
    import mini
    d = tmp_path_factory.mktemp("stop")
    mini.make_fcit_mini(str(d / "release"), seed=0, n_train=16, n_test=2)
    args = ["--setting", "cap-hom", "--data-root", str(d / "release"), "--methods", "disco,finetune", "--lm-identity",
            "--on-full", "nearest", "--stages", "2", "--rounds", "2", "--clients", "5", "--clients-per-round", "5",
            "--batch-size", "8", "--eval-samples", "2", "--max-new-tokens", "3", "--quiet", "--threads", "1"]
    assert fcit.main(args + ["--workers", "1", "--out", str(d / "ref")]) == 0
    return args + ["--workers", "2"], results(d / "ref")


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGKILL"])
def test_a_stopped_run_leaves_no_worker_behind(tmp_path, stop_run, sig):
    """fcit.py with --workers 2 as a process of its own, stopped once a round is committed: SIGTERM stops its workers
    and releases the lock; after SIGKILL (no chance to stop them) the workers notice and exit on their own. Either
    way no process of the run is left, and the rerun completes with the results of an uninterrupted run."""
    import signal
    import subprocess
    import sys
    args, want = stop_run
    out = tmp_path / "out"
    argv = [sys.executable, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fcit.py"),
            *args, "--out", str(out)]
    run = subprocess.Popen(argv, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert _wait(lambda: (out / "state" / "disco.json").exists(), 120), run.stderr.read().decode()[-2000:]
    os.kill(run.pid, getattr(signal, sig))
    run.wait(30)
    assert _wait(lambda: not _group_alive(run.pid), 4)           # the workers are gone too, at once
    assert (out / ".lock").exists() == (sig == "SIGKILL")         # released on SIGTERM; stale after SIGKILL
    assert subprocess.run(argv, capture_output=True).returncode == 0
    assert results(out) == want


def test_a_record_cannot_read_outside_the_image_folder(tmp_path):
    """An image path that is absolute, climbs out with `..`, or follows a symlink out of the image folder is refused,
    naming the file and the record; a relative path inside it (even through a symlinked folder inside) is read."""
    import data
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    (images / "sub" / "ok.png").write_bytes(b"x")
    (images / "inside").symlink_to(images / "sub")
    (images / "escape").symlink_to(tmp_path)
    (tmp_path / "secret.png").write_bytes(b"x")
    rec = lambda img: {"id": "r1", "image": img, "conversations": [{"from": "human", "value": "<image>\\nq"},  # noqa
                                                                   {"from": "gpt", "value": "a"}]}
    path = tmp_path / "train.json"
    for bad in ("/etc/passwd", "../secret.png", "sub/../../secret.png", "escape/secret.png"):
        path.write_text(json.dumps([rec("sub/ok.png"), rec(bad)]))
        with pytest.raises(data.FCITDataError, match=r"train\.json: record 1 \(id='r1'\): image .* is outside"):
            data.load_examples(path, image_root=images)
    path.write_text(json.dumps([rec("sub/ok.png"), rec("inside/ok.png")]))
    assert [os.path.basename(ex.image) for ex in data.load_examples(path, image_root=images)] == ["ok.png"] * 2


@pytest.mark.parametrize("flag,value,message", [
    ("--lr", "inf", "--lr must be a finite number, not inf"),
    ("--tau", "nan", "--tau must be a finite number, not nan"),
    ("--seed", str(2 ** 70), "--seed must be in [0, 2^32)"), ("--seed", "-1", "--seed must be in [0, 2^32)"),
    ("--device", "foo", "--device 'foo': expected cpu, cuda or cuda:<index>"),
    ("--device", "meta", "--device 'meta': expected cpu, cuda or cuda:<index>"),
    ("--device", "cuda:7", "--device 'cuda:7': no such CUDA device")])
def test_bad_numbers_and_devices_exit_2_before_any_folder(tmp_path, capsys, flag, value, message):
    out = tmp_path / "out"
    assert fcit.main(ARGS + [flag, value, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not out.exists()


@pytest.mark.parametrize("where,message", [
    ("file", "is a file, not a folder"), ("below-file", "cannot be created: {} is a file"),
    ("read-only", "is not writable"), ("json-log-dir", "--json-log {!r}: expected a file path in an existing folder"),
    ("missing-adapters", "--adapters {!r} does not exist")])
def test_an_unusable_out_or_log_exits_2_before_any_folder(tmp_path, capsys, monkeypatch, where, message):
    """--out a file, below a file or in a folder that refuses writes; --json-log a folder; --eval-only of adapters that
    do not exist: exit 2 with one line naming the flag, and nothing is created (not even <adapters>/eval)."""
    (tmp_path / "afile").write_text("x")
    out, extra, name = tmp_path / "out", [], str(tmp_path / "afile")
    if where == "file":
        out = tmp_path / "afile"
    elif where == "below-file":
        out = tmp_path / "afile" / "out"
    elif where == "read-only":                  # as root chmod does not refuse; the kernel's answer is simulated
        real_open = os.open
        def refuse(path, *a, **k):             # noqa: E306
            if os.path.dirname(str(path)) == str(tmp_path):
                raise PermissionError(13, "Permission denied", str(path))
            return real_open(path, *a, **k)
        monkeypatch.setattr(os, "open", refuse)
    elif where == "json-log-dir":
        extra, name = ["--json-log", str(tmp_path)], str(tmp_path)
    else:
        name = str(tmp_path / "missing" / "stage1")
        extra, out = ["--eval-only", "--adapters", name], None
    before = sorted(os.listdir(tmp_path))
    assert fcit.main(ARGS + extra + (["--out", str(out)] if out else [])) == 2
    err = capsys.readouterr().err
    assert message.format(name) in err and "Traceback" not in err and err.count("\n") == 1
    assert sorted(os.listdir(tmp_path)) == before


@pytest.mark.parametrize("damage", ["config.json", "state.json", "state tensors"])
def test_a_damaged_out_exits_2_naming_the_file(tmp_path, capsys, damage):
    """A resume on an --out whose config.json or state JSON is not valid JSON, or whose state tensors file is cut in
    half: exit 2 with one line naming that file, no traceback."""
    import shutil
    out = tmp_path / "out"
    small = ARGS[:4] + ["--stages", "1", "--rounds", "1"] + ARGS[8:] + ["--out", str(out)]
    assert fcit.main(small) == 0
    st = json.load(open(out / "state" / "disco.json"))
    path = {"config.json": out / "config.json", "state.json": out / "state" / "disco.json",
            "state tensors": out / "state" / st["tensors"]}[damage]
    if damage == "state tensors":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        path.write_text(path.read_text()[:-7])
    capsys.readouterr()
    assert fcit.main(small) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "Traceback" not in err and err.count("\n") == 1
    shutil.rmtree(out)


def test_a_too_short_max_length_exits_2_naming_the_flag(tmp_path, capsys):
    assert fcit.main(ARGS[:4] + ["--stages", "1", "--rounds", "1"] + ARGS[8:] + ["--max-length", "1", "--out",
                                                                                  str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "max_length=1" in err and "Traceback" not in err


def _locked_rank(rank, port, out, codes):
    import sys
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    sys.stderr = open(os.path.join(codes, f"err{rank}"), "w")
    code = fcit.main(ARGS + ["--out", out])
    torch.distributed.destroy_process_group()
    open(os.path.join(codes, f"rc{rank}"), "w").write(str(code))


def test_a_busy_out_stops_every_rank(tmp_path):
    """Under torch.distributed only rank 0 takes the lock; when it is refused, every rank exits 2 (none waits for a
    collective that never comes), each saying why."""
    import socket

    import torch.multiprocessing as mp
    out = tmp_path / "out"
    out.mkdir()
    (out / ".lock").write_text(json.dumps({"pid": os.getpid(), "start": files._started(os.getpid()), "since": "now"}))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_locked_rank, args=(port, str(out), str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        assert (tmp_path / f"rc{rank}").read_text() == "2"
        assert f"in use by another run: PID {os.getpid()}" in (tmp_path / f"err{rank}").read_text()
