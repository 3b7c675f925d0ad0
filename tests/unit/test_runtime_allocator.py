"""The malloc of the processes that run a model (lorakit/train/runtime.py): which library is chosen, how
LORAKIT_ALLOCATOR overrides it, the environment the `lorakit` command re-executes itself with, and which commands
do."""

from __future__ import annotations

import sys

import pytest

from lorakit.train import runtime


@pytest.fixture
def libraries(tmp_path, monkeypatch):
    """A library directory searched instead of the system's; returns a function that 'installs' a library."""
    monkeypatch.setattr(runtime, "_library_directories", lambda environ: [str(tmp_path)])

    def install(name: str) -> str:
        path = tmp_path / name
        path.write_bytes(b"")
        return str(path)

    return install


def test_auto_chooses_tcmalloc_never_jemalloc(libraries):
    assert runtime.find_allocator({}) is None  # nothing installed: the C library's malloc
    libraries("libjemalloc.so.2")
    assert runtime.find_allocator({}) is None  # measured worse for training: not chosen on its own
    full = libraries("libtcmalloc.so.4")
    assert runtime.find_allocator({}) == full
    minimal = libraries("libtcmalloc_minimal.so.4")
    assert runtime.find_allocator({"LORAKIT_ALLOCATOR": "auto"}) == minimal


def test_system_and_an_explicit_path(libraries, tmp_path):
    libraries("libtcmalloc_minimal.so.4")
    assert runtime.find_allocator({"LORAKIT_ALLOCATOR": "system"}) is None
    own = tmp_path / "libmimalloc.so"
    own.write_bytes(b"")
    assert runtime.find_allocator({"LORAKIT_ALLOCATOR": str(own)}) == str(own)


def test_a_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(runtime.AllocatorChoiceError, match=r"LORAKIT_ALLOCATOR=.*no such file.*auto.*system"):
        runtime.find_allocator({"LORAKIT_ALLOCATOR": str(tmp_path / "libnothing.so")})


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="LD_PRELOAD is Linux's")
def test_environment_preloads_the_library_before_others(libraries):
    tcmalloc = libraries("libtcmalloc_minimal.so.4")
    environ = runtime.allocator_environment({"LD_PRELOAD": "/opt/libother.so", "KEEP": "1"})
    assert environ["LD_PRELOAD"] == f"{tcmalloc} /opt/libother.so" and environ["KEEP"] == "1"
    assert environ["TCMALLOC_RELEASE_RATE"] == "0"  # freed memory kept for reuse
    assert int(environ["TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD"]) >= 2 ** 40  # no stderr report per big block
    # already preloaded (the re-executed process, or the user's own choice), or declined: nothing to change
    assert runtime.allocator_environment({"LD_PRELOAD": "/usr/lib/libtcmalloc.so.4"}) is None
    assert runtime.allocator_environment({"LORAKIT_ALLOCATOR": "system"}) is None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="LD_PRELOAD is Linux's")
def test_the_users_settings_win_and_an_explicit_library_is_left_as_it_is(libraries, tmp_path):
    libraries("libtcmalloc_minimal.so.4")
    assert runtime.allocator_environment({"TCMALLOC_RELEASE_RATE": "5"})["TCMALLOC_RELEASE_RATE"] == "5"
    jemalloc = tmp_path / "libjemalloc.so.2"
    jemalloc.write_bytes(b"")
    environ = runtime.allocator_environment({"LORAKIT_ALLOCATOR": str(jemalloc)})
    assert environ["LD_PRELOAD"] == str(jemalloc) and "TCMALLOC_RELEASE_RATE" not in environ


def test_active_allocator_reads_ld_preload():
    assert runtime.active_allocator({"LD_PRELOAD": "/a/libfoo.so:/b/libjemalloc.so.2"}) == "libjemalloc.so.2"
    assert runtime.active_allocator({"LD_PRELOAD": "/a/libfoo.so"}) is None
    assert runtime.active_allocator({}) is None


def test_bad_choice_stops_the_command_with_one_line(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("LORAKIT_ALLOCATOR", str(tmp_path / "missing.so"))
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    monkeypatch.setattr(runtime.sys, "platform", "linux")
    with pytest.raises(SystemExit) as stopped:
        runtime.use_preferred_allocator()
    assert stopped.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("lorakit: error: LORAKIT_ALLOCATOR=") and len(err.strip().splitlines()) == 1


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="LD_PRELOAD is Linux's")
def test_assignments_for_a_users_own_program(libraries):
    """`env $(python -m lorakit.train.runtime) python train.py`: only the settings that change."""
    assert runtime.environment_assignments({}) == []  # nothing installed
    tcmalloc = libraries("libtcmalloc_minimal.so.4")
    assigned = runtime.environment_assignments({"HOME": "/root", "TCMALLOC_RELEASE_RATE": "0"})
    assert assigned[0] == f"LD_PRELOAD={tcmalloc}"
    assert [a.split("=")[0] for a in assigned[1:]] == ["TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD"]  # the rest is set
    assert runtime.environment_assignments({"LD_PRELOAD": tcmalloc}) == []  # already preloaded


@pytest.mark.parametrize("command, swaps", [
    ("train", True), ("demo", True), ("eval", True), ("generate", True), ("chat", True), ("serve", True),
    ("merge", False), ("inspect", False), ("data", False), ("bench", False), (None, False)])
def test_the_commands_that_run_a_model_take_the_preferred_malloc(monkeypatch, command, swaps):
    """`lorakit train|demo|eval|generate|chat|serve` re-execute on tcmalloc (or tune glibc) before torch is
    imported; the others (and a program that imports lorakit) leave the process's malloc alone. `bench` chooses
    its workers' malloc itself (bench/harness.py)."""
    from lorakit.cli import startup

    calls = []
    monkeypatch.setattr(startup, "running_as_command", lambda: True)
    monkeypatch.setattr(startup, "command_name", lambda: command)
    monkeypatch.setattr(runtime, "use_preferred_allocator", lambda: calls.append("preload"))
    monkeypatch.setattr(runtime, "tune_process", lambda: calls.append("tune"))
    monkeypatch.setattr(startup.signal, "signal", lambda *args: None)  # pytest's own Ctrl-C handler stays
    startup.install()
    assert calls == (["preload", "tune"] if swaps else [])
