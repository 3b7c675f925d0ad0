"""The training processes' malloc (lorakit/train/runtime.py): which library is chosen, how LORAKIT_ALLOCATOR
overrides it, and the environment the `lorakit` command re-executes itself with."""

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


def test_auto_prefers_jemalloc_then_tcmalloc(libraries):
    assert runtime.find_allocator({}) is None  # nothing installed: the C library's malloc
    tcmalloc = libraries("libtcmalloc_minimal.so.4")
    assert runtime.find_allocator({}) == tcmalloc
    jemalloc = libraries("libjemalloc.so.2")
    assert runtime.find_allocator({"LORAKIT_ALLOCATOR": "auto"}) == jemalloc


def test_system_and_an_explicit_path(libraries, tmp_path):
    libraries("libjemalloc.so.2")
    assert runtime.find_allocator({"LORAKIT_ALLOCATOR": "system"}) is None
    own = tmp_path / "libmimalloc.so"
    own.write_bytes(b"")
    assert runtime.find_allocator({"LORAKIT_ALLOCATOR": str(own)}) == str(own)


def test_a_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(runtime.AllocatorChoiceError, match=r"LORAKIT_ALLOCATOR=.*no such file.*auto.*system"):
        runtime.find_allocator({"LORAKIT_ALLOCATOR": str(tmp_path / "libnothing.so")})


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="LD_PRELOAD is Linux's")
def test_environment_preloads_the_library_before_others(libraries):
    jemalloc = libraries("libjemalloc.so.2")
    environ = runtime.allocator_environment({"LD_PRELOAD": "/opt/libother.so", "KEEP": "1"})
    assert environ["LD_PRELOAD"] == f"{jemalloc} /opt/libother.so" and environ["KEEP"] == "1"
    assert environ["MALLOC_CONF"] == "dirty_decay_ms:-1,muzzy_decay_ms:-1"  # freed memory kept for reuse
    # the user's own jemalloc options come last, so they win
    environ = runtime.allocator_environment({"MALLOC_CONF": "dirty_decay_ms:1000"})
    assert environ["MALLOC_CONF"] == "dirty_decay_ms:-1,muzzy_decay_ms:-1,dirty_decay_ms:1000"
    # already preloaded (the re-executed process, or the user's own choice), or declined: nothing to change
    assert runtime.allocator_environment({"LD_PRELOAD": "/usr/lib/libtcmalloc.so.4"}) is None
    assert runtime.allocator_environment({"LORAKIT_ALLOCATOR": "system"}) is None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="LD_PRELOAD is Linux's")
def test_tcmalloc_keeps_freed_memory_unless_told_otherwise(libraries):
    libraries("libtcmalloc_minimal.so.4")
    assert runtime.allocator_environment({})["TCMALLOC_RELEASE_RATE"] == "0"
    assert runtime.allocator_environment({"TCMALLOC_RELEASE_RATE": "5"})["TCMALLOC_RELEASE_RATE"] == "5"
    assert "MALLOC_CONF" not in runtime.allocator_environment({})


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
    jemalloc = libraries("libjemalloc.so.2")
    assert runtime.environment_assignments({"HOME": "/root"}) == [
        f"LD_PRELOAD={jemalloc}", "MALLOC_CONF=dirty_decay_ms:-1,muzzy_decay_ms:-1"]
    assert runtime.environment_assignments({"LD_PRELOAD": jemalloc}) == []  # already preloaded
