"""A conversion ended by a signal leaves nothing beside its output; after a SIGKILL the next
conversion into the folder removes the leftover. Output paths: symlinks are followed (the
target replaced, the link kept), anything else that is not a regular file is refused; a full
disk is one line and no partial file.

The conversions run in real subprocesses with a hook that blocks once the temporary file has
data and says so on stdout: the test waits for that line (no sleeps), then signals.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tide_local.cli import main as tide
from tide_local.converters.testmodel import make_checkpoint
from tide_local.gguf import writer as writer_module
from tide_local.gguf.writer import PARTIAL_SUFFIX, remove_stale_partials

# argv: MODE HF_DIR OUT. MODE "main": block in the main thread inside a write of tensor data;
# "worker": block in a quantizing worker thread, so the main thread waits on its result.
_HOOK = r"""
import signal, sys, threading
from tide_local.converters import convert as convert_module
from tide_local.gguf import writer as writer_module

mode, hf_dir, out = sys.argv[1:4]
# the dispositions a conversion started from a terminal has, even when the tests run under nohup
# or in a background job (which ignore SIGHUP, SIGINT, SIGQUIT, and pass that on to children)
for name in ("SIGTERM", "SIGHUP", "SIGQUIT", "SIGUSR1"):
    signal.signal(getattr(signal, name), signal.SIG_DFL)
signal.signal(signal.SIGINT, signal.default_int_handler)
never = threading.Event()
calls = {"n": 0}

def ready():
    print("ready", flush=True)

if mode == "main":
    real_write = writer_module.GGUFStreamWriter.write

    def write(self, name, data):
        real_write(self, name, data)
        calls["n"] += 1
        if calls["n"] == 3:
            self._file.flush()
            ready()
            never.wait()

    writer_module.GGUFStreamWriter.write = write
else:
    real_encode = convert_module.encode_rows
    release = threading.Event()
    real_raise = writer_module._raise_interrupt

    def raise_interrupt(signum, frame):  # let the blocked worker finish, then clean up as usual
        release.set()
        return real_raise(signum, frame)

    writer_module._raise_interrupt = raise_interrupt

    def encode(rows, ggml_type):
        calls["n"] += 1
        if calls["n"] == 5:
            ready()
            release.wait()
        return real_encode(rows, ggml_type)

    convert_module.encode_rows = encode

from tide_local.cli import main
sys.exit(main(["convert", hf_dir, "-o", out, "--threads", "2"]))
"""


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("hf") / "tiny", preset="tiny", seed=3)


def _partials(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.name.endswith(PARTIAL_SUFFIX))


def _start_and_block(checkpoint: Path, out: Path, mode: str = "main") -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", _HOOK, mode, str(checkpoint), str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()  # the hook's "ready": the temporary file exists and has data
    if line.strip() != "ready":
        proc.kill()
        _, err = proc.communicate(timeout=60)
        pytest.fail(f"the conversion did not reach the hook: {line!r} {err}")
    partial = _partials(out.parent)
    assert len(partial) == 1 and partial[0].stat().st_size > 0
    return proc


@pytest.mark.parametrize("signame,mode", [
    ("SIGTERM", "main"), ("SIGHUP", "main"), ("SIGINT", "main"), ("SIGQUIT", "main"), ("SIGUSR1", "main"),
    ("SIGTERM", "worker"),
])
def test_a_signal_mid_conversion_leaves_nothing(checkpoint, tmp_path, signame, mode):
    out = tmp_path / "o.gguf"
    proc = _start_and_block(checkpoint, out, mode)
    signum = getattr(signal, signame)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signum, err
    assert list(tmp_path.iterdir()) == [], "nothing beside the output, and no output"
    lines = err.strip().splitlines()
    assert lines[-1].startswith("tide convert: interrupted") and "Traceback" not in err, err


def test_after_a_sigkill_the_next_conversion_cleans_up(checkpoint, tmp_path, capsys):
    out = tmp_path / "o.gguf"
    proc = _start_and_block(checkpoint, out)
    proc.kill()
    proc.communicate(timeout=60)
    [left] = _partials(tmp_path)  # SIGKILL cannot be handled: the temporary file stays ...
    assert tide(["convert", str(checkpoint), "-o", str(tmp_path / "other.gguf")]) == 0
    err = capsys.readouterr().err
    assert f"removed {left}" in err and "killed" in err  # ... until the next conversion into the folder
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.gguf"]


def test_a_conversion_in_progress_is_not_taken_for_a_leftover(tmp_path):
    import fcntl

    live = tmp_path / ".m.gguf.abcd1234.partial"
    stale = tmp_path / ".m.gguf.wxyz5678.partial"
    foreign = tmp_path / ".notes.txt.abcd1234.partial"  # our name pattern, not our contents
    for p in (live, stale):
        p.write_bytes(b"GGUF" + bytes(100))
    foreign.write_text("someone else's")
    with open(live, "rb") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # as a running conversion holds it
        removed = remove_stale_partials(tmp_path)
    assert [p for p, _ in removed] == [stale]
    assert live.exists() and foreign.exists() and not stale.exists()


def test_output_through_a_symlink_replaces_the_target_and_keeps_the_link(checkpoint, tmp_path):
    real_dir = tmp_path / "real"
    real_dir.mkdir()
    target = real_dir / "model.gguf"
    target.write_bytes(b"old")
    link = tmp_path / "link.gguf"
    link.symlink_to(target)
    assert tide(["convert", str(checkpoint), "-o", str(link), "--type", "f16"]) == 0
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert target.read_bytes()[:4] == b"GGUF"
    assert not _partials(real_dir) and not _partials(tmp_path)
    dangling = tmp_path / "dangling.gguf"
    dangling.symlink_to(real_dir / "new.gguf")
    assert tide(["convert", str(checkpoint), "-o", str(dangling), "--type", "f16"]) == 0
    assert dangling.is_symlink() and (real_dir / "new.gguf").read_bytes()[:4] == b"GGUF"


def _one_line_error(argv, capsys) -> str:
    assert tide(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err, err
    return err


def test_outputs_that_are_not_regular_files_are_refused_before_any_work(tmp_path, capsys):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    link_to_dir = tmp_path / "dirlink"
    link_to_dir.symlink_to(tmp_path)
    missing = tmp_path / "no-checkpoint"  # the output is checked first: its error comes first
    for out, words in [("/dev/null", "not a regular file"), (fifo, "not a regular file"),
                       (link_to_dir, "is a directory"), (tmp_path, "is a directory")]:
        err = _one_line_error(["convert", str(missing), "-o", str(out)], capsys)
        assert words in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dirlink", "fifo"]


class _FullDisk:
    """A file object that fails like a full disk after `room` bytes."""

    def __init__(self, real, room):
        self._real, self._room = real, room

    def write(self, data):
        n = memoryview(data).nbytes
        if n > self._room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._room -= n
        return self._real.write(data)

    def __getattr__(self, name):
        return getattr(self._real, name)


def test_a_full_disk_is_one_line_and_leaves_nothing(checkpoint, tmp_path, capsys, monkeypatch):
    real_fdopen = os.fdopen
    monkeypatch.setattr(writer_module.os, "fdopen", lambda fd, mode: _FullDisk(real_fdopen(fd, mode), 200_000))
    err = _one_line_error(["convert", str(checkpoint), "-o", str(tmp_path / "o.gguf"), "--threads", "1"], capsys)
    assert "disk is full" in err and "removed" in err, err
    assert list(tmp_path.iterdir()) == []
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the handlers are put back


def test_thread_counts_are_bounded(checkpoint, tmp_path, capsys):
    for threads in ("0", "-1", "100000"):
        err = _one_line_error(["convert", str(checkpoint), "-o", str(tmp_path / "o.gguf"), "--threads", threads],
                              capsys)
        assert "--threads must be between 1 and" in err
    assert list(tmp_path.iterdir()) == []
