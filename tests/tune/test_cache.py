"""The persistent cache: round trips, bad files, concurrent writers, export and import."""
import json
import multiprocessing
import os
import warnings
from pathlib import Path

import pytest
import torch

from fusion_backend.tune import cache as cache_module
from fusion_backend.tune.cache import (
    TuningCache,
    TuningCacheWarning,
    TuningStateError,
    cache_key,
    default_cache_dir,
    load_state,
    save_state,
)

RECORD = {"plan": {"attn0": "v1", "ffn0": "keep"}, "cost_ms": 1.25, "baseline_ms": 1.5,
          "measurements": 30}


@pytest.fixture
def cache(tmp_path):
    return TuningCache(tmp_path / "cache")


def _key(n=0):
    return cache_key(f"graph{n}", [(8, 1024, 768)], [torch.float16], "NVIDIA H100", "moderate")


def test_round_trip(cache):
    key = _key()
    assert cache.get(key) is None
    assert cache.put(key, RECORD)
    assert cache.get(key) == RECORD
    assert TuningCache(cache.directory).get(key) == RECORD  # another process's view
    assert cache.entries() == {key: RECORD}
    assert len(cache) == 1
    assert json.loads(cache.path_for(key).read_text())["record"] == RECORD
    assert cache.clear() == 1 and cache.get(key) is None and len(cache) == 0


def test_put_replaces_and_leaves_no_temporary_files(cache):
    key = _key()
    cache.put(key, RECORD)
    cache.put(key, {**RECORD, "cost_ms": 1.0})
    assert cache.get(key)["cost_ms"] == 1.0
    assert sorted(p.name for p in cache.directory.iterdir()) == [f"{key}.json"]


def test_key_covers_every_input_and_the_versions(monkeypatch):
    base = dict(graph_signature="g", shapes=[(2, 3)], dtypes=[torch.float32], device_name="H100",
                strategy="moderate")
    key = cache_key(**base)
    assert key == cache_key(**base) and len(key) == 64
    assert cache_key(**{**base, "shapes": (torch.Size([2, 3]),)}) == key  # same shapes, other types
    for field, value in [("graph_signature", "h"), ("shapes", [(2, 4)]), ("dtypes", [torch.float16]),
                         ("device_name", "A100"), ("strategy", "aggressive")]:
        assert cache_key(**{**base, field: value}) != key, field
    assert cache_key(**base, extra={"space": "abc"}) != key
    monkeypatch.setattr(cache_module, "library_versions",
                        lambda: {"torch": "9", "triton": "9", "truthfuse": "9"})
    assert cache_key(**base) != key


def test_versions_include_torch_triton_and_truthfuse():
    versions = cache_module.library_versions()
    assert set(versions) == {"torch", "triton", "truthfuse"}
    assert versions["truthfuse"] == "0.1.0"
    assert versions["torch"].split("+")[0] == torch.__version__.split("+")[0]


# the last: nesting deeper than json's recursion limit (RecursionError, no ValueError), which failed the compile
@pytest.mark.parametrize("content", ["{not json", "", "[1, 2]", '{"format": 1}', "\x00\x01",
                                     '{"format": 1, "record": ' + "[" * 100000 + "]" * 100000 + "}"])
def test_corrupted_file_warns_once_and_misses(cache, content):
    key = _key()
    cache.put(key, RECORD)
    cache.path_for(key).write_text(content)
    with pytest.warns(TuningCacheWarning) as caught:
        assert cache.get(key) is None
    assert len(caught) == 1 and str(cache.path_for(key)) in str(caught[0].message)
    cache.put(key, RECORD)  # the retune overwrites it
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cache.get(key) == RECORD


@pytest.mark.parametrize("field, value", [("truthfuse", "0.0.1"), ("format", 99)])
def test_foreign_version_warns_once_and_misses(cache, field, value):
    key = _key()
    cache.put(key, RECORD)
    envelope = json.loads(cache.path_for(key).read_text())
    envelope[field] = value
    cache.path_for(key).write_text(json.dumps(envelope))
    with pytest.warns(TuningCacheWarning, match="format|truthfuse") as caught:
        assert cache.get(key) is None
    assert len(caught) == 1


def test_file_under_the_wrong_name_is_a_miss(cache):
    cache.put("a", RECORD)
    os.replace(cache.path_for("a"), cache.path_for("b"))
    with pytest.warns(TuningCacheWarning, match="holds key"):
        assert cache.get("b") is None


def test_entries_skip_bad_files_with_one_warning(cache):
    cache.put("good", RECORD)
    cache.path_for("bad1").write_text("{")
    cache.path_for("bad2").write_text("[]")
    with pytest.warns(TuningCacheWarning, match="skipped 2") as caught:
        assert cache.entries() == {"good": RECORD}
    assert len(caught) == 1


def test_a_file_of_bytes_that_are_not_utf8_is_a_corrupt_file_everywhere(cache, tmp_path):
    """Disk corruption can leave bytes that do not decode: a miss with one warning for get, a
    skipped file for entries (`truthfuse cache show`, export), a truthfuse file for clear, and a
    TuningStateError for load_state; read_text's UnicodeDecodeError failed the compile and the CLI."""
    garbage = b"\xff\xfe\x00garbage\x80"
    key = _key()
    cache.put(key, RECORD)
    cache.put("good", RECORD)
    cache.path_for(key).write_bytes(garbage)
    with pytest.warns(TuningCacheWarning, match="not valid JSON") as caught:
        assert cache.get(key) is None
    assert len(caught) == 1
    with pytest.warns(TuningCacheWarning, match="skipped 1") as caught:
        assert cache.entries() == {"good": RECORD}
    assert len(caught) == 1
    assert cache.clear() == 2 and not cache.path_for(key).exists()
    state = tmp_path / "state.json"
    state.write_bytes(garbage)
    with pytest.raises(TuningStateError, match="not valid JSON"):
        load_state(state, cache)


def test_clear_deletes_only_truthfuse_files(cache):
    """A shared directory keeps its other JSON files; entries of another truthfuse version and a
    digest-named entry cut short are truthfuse's and go."""
    cache.put(_key(0), RECORD)
    cache.put(_key(1), RECORD)
    old = json.loads(cache.path_for(_key(1)).read_text())
    old["truthfuse"] = "0.0.1"
    cache.path_for(_key(1)).write_text(json.dumps(old))
    cache.path_for(_key(2)).write_text('{"format": 1, "trunc')
    for name, text in [("package.json", '{"mine": true}'), ("settings.json", '{"key": "settings"}'),
                       ("notes.json", "not json at all")]:
        (cache.directory / name).write_text(text)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TuningCacheWarning)
        assert cache.clear() == 3
    assert sorted(p.name for p in cache.directory.iterdir()) == ["notes.json", "package.json", "settings.json"]


def test_invalid_keys_and_records_are_errors(cache):
    for key in ["", "../escape", "a/b", ".hidden", None]:
        with pytest.raises(ValueError):
            cache.put(key, RECORD)
    with pytest.raises(ValueError):
        cache.put("k", {"cost_ms": float("nan")})  # not JSON
    with pytest.raises(TypeError):
        cache.put("k", {"obj": object()})
    assert cache.get("k") is None


def test_unwritable_directory_warns_once_instead_of_failing(tmp_path):
    """A compile reads, misses, tunes and writes through one cache: one warning, not two."""
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    cache = TuningCache(blocker / "cache")
    with warnings.catch_warnings():
        warnings.simplefilter("error", TuningCacheWarning)
        assert cache.get("k") is None  # no file can be under a file: a miss
    with pytest.warns(TuningCacheWarning, match="cannot write") as caught:
        assert cache.put("k", RECORD) is False
        assert cache.get("k") is None and cache.put("k", RECORD) is False
    assert len(caught) == 1


def test_unreadable_directory_warns_once_for_the_read_and_the_write(cache, monkeypatch):
    def refused(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "read_bytes", refused)
    monkeypatch.setattr(cache_module, "_write_json_atomically", refused)
    with pytest.warns(TuningCacheWarning, match="cannot read") as caught:
        assert cache.get("k") is None
        assert cache.put("k", RECORD) is False
    assert len(caught) == 1


# -- several processes at once -------------------------------------------------------------------


def _writer(directory, worker, n_keys, barrier):
    cache = TuningCache(directory)
    barrier.wait(timeout=60)  # start together, so the writes really overlap
    for i in range(n_keys):
        cache.put(f"w{worker}-k{i}", {"worker": worker, "i": i, "pad": "x" * 2000})
        cache.put("shared", {"worker": worker, "i": i, "pad": "y" * 2000})


def _reader(directory, rounds, barrier, errors):
    cache = TuningCache(directory)
    barrier.wait(timeout=60)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a torn file would warn; make it count
        for _ in range(rounds):
            try:
                record = cache.get("shared")
            except Warning as warning:
                errors.put(str(warning))
                return
            if record is not None and set(record) != {"worker", "i", "pad"}:
                errors.put(f"unexpected record {record}")
                return


def test_concurrent_writers_lose_nothing(tmp_path):
    context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods()
                                          else "spawn")
    directory = tmp_path / "cache"
    n_writers, n_keys = 4, 25
    barrier = context.Barrier(n_writers + 1)
    errors = context.Queue()
    processes = [context.Process(target=_writer, args=(directory, w, n_keys, barrier))
                 for w in range(n_writers)]
    processes.append(context.Process(target=_reader, args=(directory, 300, barrier, errors)))
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=60)
        assert process.exitcode == 0
    assert errors.empty(), errors.get()
    cache = TuningCache(directory)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        entries = cache.entries()
    expected = {f"w{w}-k{i}" for w in range(n_writers) for i in range(n_keys)} | {"shared"}
    assert set(entries) == expected
    for w in range(n_writers):
        for i in range(n_keys):
            assert entries[f"w{w}-k{i}"]["i"] == i
    assert entries["shared"]["i"] == n_keys - 1
    for path in directory.iterdir():
        json.loads(path.read_text())  # every file parses
        assert not path.name.startswith(".")  # no temporary file left behind


# -- location ----------------------------------------------------------------------------------


def test_truthfuse_cache_dir_overrides_everything(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("TRUTHFUSE_CACHE_DIR", str(tmp_path / "mine"))
    assert default_cache_dir() == tmp_path / "mine"
    cache = TuningCache()
    cache.put("k", RECORD)
    assert (tmp_path / "mine" / "k.json").is_file()


def test_default_dir_follows_xdg_then_home(monkeypatch, tmp_path):
    monkeypatch.delenv("TRUTHFUSE_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "truthfuse"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "truthfuse"


# -- save_state / load_state --------------------------------------------------------------------


def test_save_and_load_state_round_trip(tmp_path):
    here = TuningCache(tmp_path / "here")
    for n in range(3):
        here.put(_key(n), {**RECORD, "n": n})
    state = tmp_path / "state.json"
    assert save_state(state, here) == 3
    there = TuningCache(tmp_path / "there")
    there.put("local-only", RECORD)
    assert load_state(state, there) == 3
    assert there.entries() == {**here.entries(), "local-only": RECORD}  # merged, nothing lost


def test_load_state_into_an_empty_cache_writes_there(monkeypatch, tmp_path):
    # An empty TuningCache is falsy (len 0); it must still be the cache written to.
    monkeypatch.setenv("TRUTHFUSE_CACHE_DIR", str(tmp_path / "default"))
    source = TuningCache(tmp_path / "src")
    source.put("k", RECORD)
    save_state(tmp_path / "state.json", source)
    empty = TuningCache(tmp_path / "empty")
    assert load_state(tmp_path / "state.json", empty) == 1
    assert empty.get("k") == RECORD
    assert not (tmp_path / "default").exists()
    assert save_state(tmp_path / "nothing.json", TuningCache(tmp_path / "none")) == 0
    assert json.loads((tmp_path / "nothing.json").read_text())["entries"] == {}


def test_save_state_to_a_folder_names_the_folder(tmp_path):
    """The atomic write's rename onto a folder raised an IsADirectoryError naming its temporary
    file; the error names the path given and says to give a file's."""
    with pytest.raises(IsADirectoryError, match=f"save_state: {tmp_path} is a folder; give the path of the file"):
        save_state(tmp_path, TuningCache(tmp_path / "c"))
    assert not [p for p in tmp_path.iterdir() if p.name != "c"]  # nothing written beside it


def test_save_and_load_state_use_the_default_directory(monkeypatch, tmp_path):
    monkeypatch.setenv("TRUTHFUSE_CACHE_DIR", str(tmp_path / "a"))
    TuningCache().put("k", RECORD)
    save_state(tmp_path / "state.json")
    monkeypatch.setenv("TRUTHFUSE_CACHE_DIR", str(tmp_path / "b"))
    assert load_state(str(tmp_path / "state.json")) == 1
    assert TuningCache().get("k") == RECORD


@pytest.mark.parametrize("content, message", [
    (None, "cannot read"),
    ("{broken", "not valid JSON"),
    ('{"entries": {}}', "not a truthfuse tuning state"),
    ('{"format": "truthfuse-tuning-state", "format_version": 7, "entries": {}}', "format version"),
    ('{"format": "truthfuse-tuning-state", "format_version": 1, "entries": []}', "entries"),
    ('{"format": "truthfuse-tuning-state", "format_version": 1, "truthfuse": "0.1.0",'
     ' "entries": {"../x": {}}}', "malformed"),
    ('{"format": "truthfuse-tuning-state", "format_version": 1, "truthfuse": "0.1.0",'
     ' "entries": {"abc": {"cost_ms": NaN}}}', "NaN is not a JSON number"),
])
def test_load_state_rejects_bad_files_clearly(tmp_path, content, message):
    path = tmp_path / "state.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(TuningStateError, match=message) as info:
        load_state(path, TuningCache(tmp_path / "cache"))
    assert isinstance(info.value, ValueError) and str(path) in str(info.value)


def test_load_state_from_another_version_warns_and_imports_nothing(tmp_path):
    source = TuningCache(tmp_path / "src")
    source.put("k", RECORD)
    path = tmp_path / "state.json"
    save_state(path, source)
    state = json.loads(path.read_text())
    state["truthfuse"] = "0.0.9"
    path.write_text(json.dumps(state))
    target = TuningCache(tmp_path / "dst")
    with pytest.warns(TuningCacheWarning, match="0.0.9"):
        assert load_state(path, target) == 0
    assert len(target) == 0


def test_state_file_is_plain_json(tmp_path):
    cache = TuningCache(tmp_path / "c")
    cache.put("k", RECORD)
    path = Path(tmp_path / "state.json")
    save_state(path, cache)
    state = json.loads(path.read_text())
    assert state["format"] == "truthfuse-tuning-state" and state["entries"] == {"k": RECORD}
    assert set(state["versions"]) == {"torch", "triton", "truthfuse"}
