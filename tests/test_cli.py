"""The `truthfuse` command: explain, bench, cache, and its one-line errors (exit status 2)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fusion_backend import cli
from fusion_backend.tune.cache import TuningCache

REPO = Path(__file__).resolve().parents[1]
SMALL = ["--arg", "batch=1", "--arg", "seq=8"]


@pytest.fixture(autouse=True)
def _repo_cwd(monkeypatch, tmp_path):
    """Factories resolve from the repository root; the tuning cache is private to the test."""
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("TRUTHFUSE_CACHE_DIR", str(tmp_path / "cache"))


def _one_line_error(capsys, rc, *expected):
    err = capsys.readouterr().err
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


def _run(argv):
    """main()'s status, also when argparse exits."""
    try:
        return cli.main(argv)
    except SystemExit as exc:
        return exc.code


# -- explain ----------------------------------------------------------------------------------

def test_explain_prints_the_report(capsys):
    rc = cli.main(["explain", "examples.truthgpt:build", *SMALL, "--arg", "metric=l1",
                   "--strategy", "aggressive", "--inner", "eager", "--no-cache"])
    out = capsys.readouterr().out
    assert rc == 0
    assert out.startswith("truthfuse: 1 graph(s)")
    fused_rows = [line for line in out.splitlines() if " fused " in line and "attention.l1_cdist" in line]
    assert len(fused_rows) == 2, out


@pytest.mark.parametrize("target, expected", [
    ("examples.truthgpt", "is not MODULE:FACTORY"),
    ("no_such_module_xyz:build", "cannot import module 'no_such_module_xyz'"),
    ("examples.truthgpt:no_such_factory", "has no attribute 'no_such_factory'"),
    ("examples.truthgpt:VOCAB", "not a callable factory"),
    ("examples.truthgpt:corpus_text", "must return (model, example_inputs)"),
    # a file path said "No module named 'examples/truthgpt'" (found by a sixteenth fuzz round)
    ("examples/truthgpt.py:build", "not a file path: write examples.truthgpt:build"),
    ("examples/truthgpt.py", "not a file path: write examples.truthgpt:FACTORY"),
    # run from another folder, the README's examples.truthgpt said only "No module named 'examples'"
    ("no_such_pkg_xyz.models:build", "run from the folder that holds no_such_pkg_xyz"),
])
def test_explain_bad_factory_is_one_line(capsys, target, expected):
    _one_line_error(capsys, cli.main(["explain", target]), expected)


def test_explain_factory_errors_are_reported(capsys):
    line = _one_line_error(capsys, cli.main(["explain", "examples.truthgpt:build", "--arg", "metric='l3'"]),
                           "raised ValueError")
    assert "dot, l2, l1, cosine" in line
    _one_line_error(capsys, cli.main(["explain", "examples.truthgpt:build", "--arg", "nonsense"]), "NAME=VALUE")


def test_explain_checks_what_the_factory_returns(capsys, tmp_path, monkeypatch):
    (tmp_path / "factories_for_cli_test.py").write_text(
        "import torch\n"
        "def three(): return 1, 2, 3\n"
        "def not_callable(): return 5, (torch.ones(2),)\n"
        "def bad_inputs(): return torch.nn.Identity(), 7\n"
        "def broken(): raise RuntimeError('boom')\n")
    monkeypatch.chdir(tmp_path)
    _one_line_error(capsys, cli.main(["explain", "factories_for_cli_test:three"]), "returned tuple of length 3")
    _one_line_error(capsys, cli.main(["explain", "factories_for_cli_test:not_callable"]), "as the model")
    _one_line_error(capsys, cli.main(["explain", "factories_for_cli_test:bad_inputs"]), "example_inputs of type int")
    _one_line_error(capsys, cli.main(["explain", "factories_for_cli_test:broken"]), "RuntimeError: boom")


def test_bad_option_values_name_the_choices(capsys):
    line = _one_line_error(capsys, _run(["explain", "examples.truthgpt:build", "--strategy", "fast"]), "--strategy")
    assert "aggressive" in line and "moderate" in line
    _one_line_error(capsys, _run(["bench", "--metrics", "dot,l3"]), "l3", "dot, l2, l1, cosine")
    _one_line_error(capsys, _run(["bench", "--seqs", "64,x"]), "--seqs")
    _one_line_error(capsys, _run(["bench", "--batch", "0"]), "--batch must be at least 1")
    _one_line_error(capsys, _run(["cache", "shine"]), "show", "clear")
    _one_line_error(capsys, _run([]), "COMMAND")


def test_help_describes_every_command(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for word in ("explain", "bench", "cache", "TRUTHFUSE_LOG"):
        assert word in out
    for command in ("explain", "bench", "cache"):
        with pytest.raises(SystemExit):
            cli.main([command, "--help"])
        assert "usage: truthfuse " + command in capsys.readouterr().out


# -- bench ------------------------------------------------------------------------------------

def test_bench_cuda_without_a_device(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    _one_line_error(capsys, cli.main(["bench", "--device", "cuda"]), "no CUDA device")


def test_bench_plot_without_matplotlib(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    _one_line_error(capsys, cli.main(["bench", "--plot", "out.png", "--metrics", "l2"]), "pip install matplotlib")


def test_bench_writes_json(capsys, tmp_path):
    """The one Inductor run of this file: eager, Inductor and truthfuse on one tiny L2 case."""
    out = tmp_path / "bench.json"
    rc = cli.main(["bench", "--metrics", "l2", "--seqs", "16", "--no-model", "--reps", "1",
                   "--inner", "eager", "--json", str(out)])
    assert rc == 0
    data = json.loads(out.read_text())
    assert data["env"]["device"] == "cpu" and data["config"]["timer"].startswith("wall clock")
    (row,) = data["results"]
    assert (row["name"], row["seq"], row["fused_sites"]) == ("attention-l2", 16, 1)
    for key in ("eager_ms", "inductor_ms", "truthfuse_ms"):
        assert row[key] > 0
    assert row["speedup_vs_inductor"] == pytest.approx(row["inductor_ms"] / row["truthfuse_ms"])
    assert "attention-l2" in capsys.readouterr().out


def test_bench_mode_reaches_both_compilers(capsys, monkeypatch, tmp_path):
    """--mode is passed to Inductor and to truthfuse alike, and recorded; the forward+backward
    steps run from fresh gradients (what CUDA graphs need). Inductor is swapped for aot_eager here:
    the point is what it is asked for."""
    import torch

    seen = []
    real_compile = torch.compile

    def spy(fn, *, backend="inductor", mode=None, **kw):
        seen.append((backend if isinstance(backend, str) else type(backend).__name__,
                     mode if backend == "inductor" else backend.options.mode))
        return real_compile(fn, backend="aot_eager" if backend == "inductor" else backend, **kw)

    monkeypatch.setattr(torch, "compile", spy)
    out = tmp_path / "bench.json"
    rc = cli.main(["bench", "--metrics", "dot", "--seqs", "16", "--no-model", "--reps", "1", "--inner", "eager",
                   "--mode", "reduce-overhead", "--backward", "--json", str(out)])
    assert rc == 0
    assert seen == [("inductor", "reduce-overhead"), ("TruthfuseBackend", "reduce-overhead")]
    data = json.loads(out.read_text())
    assert data["config"]["mode"] == "reduce-overhead"
    assert all(data["results"][0][k] > 0 for k in ("eager_ms", "inductor_ms", "truthfuse_ms"))
    _one_line_error(capsys, _run(["bench", "--mode", "fast"]), "reduce-overhead")


def test_bench_goes_on_past_a_variant_that_fails(capsys, monkeypatch, tmp_path):
    """torch.cdist has no bf16 kernel on CPU (nor for p=1 on CUDA, at bench's default dtype there):
    eager's and Inductor's L2 row failed, and the whole command ended in their traceback (found
    by a sixteenth fuzz round). The row says which variants failed and why, truthfuse's time is
    kept, and --from-json reads the file back. Inductor is aot_eager here, as above."""
    import torch

    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, *, backend="inductor", mode=None, **kw: real_compile(
        fn, backend="aot_eager" if backend == "inductor" else backend, **kw))
    out = tmp_path / "bench.json"
    rc = cli.main(["bench", "--metrics", "l2", "--seqs", "16", "--no-model", "--reps", "1", "--inner", "eager",
                   "--dtype", "bf16", "--json", str(out)])
    assert rc == 0
    (row,) = json.loads(out.read_text())["results"]
    assert row["eager_ms"] is None and row["inductor_ms"] is None and row["truthfuse_ms"] > 0
    assert "cdist" in row["eager_error"] and row["speedup_vs_eager"] is None and row["fused_sites"] == 1
    printed = capsys.readouterr().out
    assert "eager failed: NotImplementedError" in printed and "truthfuse_error" not in row
    assert cli.main(["bench", "--from-json", str(out)]) == 0
    assert "inductor failed:" in capsys.readouterr().out


def test_bench_from_json_prints_and_plots_without_measuring(capsys, monkeypatch, tmp_path):
    """--from-json: rows measured elsewhere are printed and plotted; nothing is timed here."""
    rows = [{"name": "attention-l2", "seq": s, "eager_ms": 4.0, "inductor_ms": 2.0, "truthfuse_ms": 1.0,
             "speedup_vs_inductor": 2.0, "speedup_vs_eager": 4.0, "fused_sites": 1} for s in (1024, 2048)]
    path = tmp_path / "gpu.json"
    path.write_text(json.dumps({"env": {"card": "NVIDIA H100", "torch": "2.11"},
                                "config": {"batch": 4, "heads": 8, "head_dim": 64, "dtype": "bf16", "backward": True,
                                           "timer": "triton.testing.do_bench median"},
                                "results": rows}))
    monkeypatch.setattr(cli, "run_bench", lambda *a, **k: pytest.fail("measured"))
    plotted = []
    monkeypatch.setattr(cli, "_check_plot_support", lambda p: None)
    monkeypatch.setattr(cli, "_plot", lambda results, out, title: plotted.append((len(results), out, title)))
    assert cli.main(["bench", "--from-json", str(path), "--plot", str(tmp_path / "p.png")]) == 0
    out = capsys.readouterr().out
    assert out.count("attention-l2") == 2 and "NVIDIA H100" in out
    assert plotted == [(2, str(tmp_path / "p.png"), "NVIDIA H100: B=4 H=8 D=64 bf16, causal, fwd+bwd")]


def test_bench_from_json_rejects_other_files(capsys, tmp_path):
    path = tmp_path / "other.json"
    path.write_text(json.dumps({"results": []}))
    _one_line_error(capsys, cli.main(["bench", "--from-json", str(path)]), "not a file written by")


@pytest.mark.parametrize("data, named", [
    ({"env": {}, "config": {"dtype": "fp32", "backward": False}, "results": []}, "missing env.card"),
    ({"env": {"card": "x", "torch": "2"},
      "config": {"dtype": "fp32", "backward": False, "timer": "t", "batch": 1, "heads": 2, "head_dim": 32},
      "results": [{"name": "a"}]}, "missing results[0].seq"),
    ({"env": {"card": "x", "torch": "2"},
      "config": {"dtype": "fp32", "backward": False, "timer": "t", "batch": 1, "heads": 2, "head_dim": 32},
      "results": [{"name": "a", "seq": 8, "eager_ms": "1", "inductor_ms": 1, "truthfuse_ms": 1,
                   "speedup_vs_inductor": 1, "speedup_vs_eager": 1, "fused_sites": 1}]},
     "non-numeric results[0].eager_ms"),
    ({"env": [], "config": {}, "results": {}}, "env is not an object"),
])
def test_bench_from_json_names_what_is_missing_in_one_line(capsys, tmp_path, data, named):
    path = tmp_path / "partial.json"
    path.write_text(json.dumps(data))
    _one_line_error(capsys, _run(["bench", "--from-json", str(path)]), "not a file written by", named)


def test_bench_plot_calls(monkeypatch, tmp_path):
    """_plot against a stand-in matplotlib: one line per metric on each panel, saved to the path."""
    from unittest import mock

    plt = mock.MagicMock()
    fig, left, right = mock.MagicMock(), mock.MagicMock(), mock.MagicMock()
    plt.subplots.return_value = (fig, [left, right])
    matplotlib = mock.MagicMock(pyplot=plt)
    monkeypatch.setitem(sys.modules, "matplotlib", matplotlib)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", plt)
    rows = [{"name": f"attention-{m}", "seq": s, "speedup_vs_inductor": 2.0, "speedup_vs_eager": 3.0}
            for m in ("dot", "l2", "cosine") for s in (64, 16, 32)]
    cli._plot(rows, str(tmp_path / "p.png"), "title")
    matplotlib.use.assert_called_once_with("Agg")
    for ax in (left, right):
        assert ax.plot.call_count == 3
        xs = ax.plot.call_args_list[0].args[0]
        assert xs == [16, 32, 64]  # sorted by sequence length
    assert [c.kwargs["label"] for c in left.plot.call_args_list] == ["attention-dot", "attention-l2", "attention-cosine"]
    fig.savefig.assert_called_once()
    assert fig.savefig.call_args.args[0] == str(tmp_path / "p.png")


def test_bench_plot_draws_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    rows = [{"name": f"attention-{m}", "seq": s, "speedup_vs_inductor": 1.0 + s / 100, "speedup_vs_eager": 2.0}
            for m in ("dot", "l2") for s in (16, 32)]
    cli._plot(rows, str(tmp_path / "p.png"), "test")
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


# -- cache ------------------------------------------------------------------------------------

def _record():
    return {"plan": {"g0.attention.dot@matmul": "fuse"}, "cost_ms": 1.0, "baseline_ms": 2.0,
            "best_plan": {"g0.attention.dot@matmul": "fuse"}, "best_ms": 1.0, "strategy": "moderate",
            "measurements": 3, "seconds": 0.5, "reason": "fused: 2.00x faster", "history": [], "failures": []}


def test_cache_show_clear_export_import(capsys, tmp_path):
    directory = tmp_path / "cache"
    TuningCache(directory).put("a" * 64, _record())
    assert cli.main(["cache", "show"]) == 0
    out = capsys.readouterr().out
    assert str(directory) in out and "(1 entry)" in out and "aaaaaaaaaaaaaaaa" in out and "1/1 fused" in out

    state = tmp_path / "state.json"
    assert cli.main(["cache", "export", str(state)]) == 0
    assert "exported 1 entry" in capsys.readouterr().out
    assert cli.main(["cache", "clear"]) == 0
    assert "removed 1 entry" in capsys.readouterr().out
    assert len(TuningCache(directory)) == 0
    assert cli.main(["cache", "import", str(state)]) == 0
    assert "imported 1 entry" in capsys.readouterr().out
    assert TuningCache(directory).get("a" * 64)["reason"] == "fused: 2.00x faster"

    other = tmp_path / "other"
    assert cli.main(["cache", "--dir", str(other), "import", str(state)]) == 0
    capsys.readouterr()
    assert len(TuningCache(other)) == 1
    # --dir after the action as well as before it
    assert cli.main(["cache", "show", "--dir", str(other)]) == 0
    assert str(other) in capsys.readouterr().out
    assert cli.main(["cache", "clear", "--dir", str(other)]) == 0
    assert "removed 1 entry" in capsys.readouterr().out


@pytest.mark.parametrize("written, malformed, field", [
    ('"cost_ms": 1.0', '"cost_ms": "x"', "cost_ms"),
    ('"plan": {', '"plan": ["a"], "was": {', "plan"),
    ('"measurements": 3', '"measurements": 1e999', "measurements"),
])
def test_cache_show_lists_a_malformed_record_as_unusable(capsys, tmp_path, written, malformed, field):
    cache = TuningCache(tmp_path / "cache")
    cache.put("a" * 64, _record())
    path = cache.path_for("a" * 64)
    path.write_text(path.read_text().replace(written, malformed, 1))
    cache.put("b" * 64, _record())
    assert cli.main(["cache", "show"]) == 0
    out = capsys.readouterr().out.splitlines()
    bad = [line for line in out if "aaaaaaaaaaaaaaaa" in line]
    assert len(bad) == 1 and "unusable" in bad[0] and field in bad[0]
    assert any("bbbbbbbbbbbbbbbb" in line and "1/1 fused" in line for line in out)


def test_cache_import_of_a_bad_file(capsys, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    _one_line_error(capsys, cli.main(["cache", "import", str(bad)]), "not valid JSON")
    _one_line_error(capsys, cli.main(["cache", "import", str(tmp_path / "missing.json")]), "cannot read")


def test_cache_export_to_a_place_that_cannot_be_written(capsys, tmp_path):
    """An export onto a directory (or anywhere the OS refuses) was an IsADirectoryError traceback
    with status 1."""
    TuningCache(tmp_path / "cache").put("a" * 64, _record())
    _one_line_error(capsys, cli.main(["cache", "export", str(tmp_path)]), "cannot write", str(tmp_path))


def test_cache_import_into_a_place_that_cannot_be_written(capsys, tmp_path):
    """An import into a --dir that is a file warned from deep in the cache (a Python warning line
    and its source) and then printed 'imported 0 entries' with status 0."""
    TuningCache(tmp_path / "cache").put("a" * 64, _record())
    state = tmp_path / "state.json"
    assert cli.main(["cache", "--dir", str(tmp_path / "cache"), "export", str(state)]) == 0
    capsys.readouterr()
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    _one_line_error(capsys, cli.main(["cache", "--dir", str(not_a_dir), "import", str(state)]),
                    "imported 0 of the file's decisions", "cannot write")
    assert cli.main(["cache", "--dir", str(tmp_path / "other"), "import", str(state)]) == 0
    assert "imported 1 entry" in capsys.readouterr().out


def test_console_script_entry_point():
    """`python -m fusion_backend.cli` is what the `truthfuse` script runs: status and one line."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-m", "fusion_backend.cli", "explain", "nope"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip() == ("truthfuse explain: error: 'nope' is not MODULE:FACTORY "
                                   "(for example examples.truthgpt:build)")


@pytest.mark.parametrize("action", [["show"], ["clear"], ["export", "out.json"]])
def test_cache_commands_on_a_dir_that_is_a_file_say_so(capsys, tmp_path, action):
    """`cache --dir state.json show` (an exported state given as the directory) read the file as an
    empty cache: '0 entries', 'removed 0 entries' or an export of nothing, each with status 0."""
    TuningCache(tmp_path / "cache").put("a" * 64, _record())
    state = tmp_path / "state.json"
    assert cli.main(["cache", "export", str(state)]) == 0
    capsys.readouterr()
    action = [str(tmp_path / a) if a.endswith(".json") else a for a in action]
    _one_line_error(capsys, cli.main(["cache", "--dir", str(state), *action]),
                    f"the cache directory {state} is a file", "truthfuse cache import")
    assert not (tmp_path / "out.json").exists()


def test_cache_export_reports_unusable_files_in_one_line_each(capsys, tmp_path):
    """export skipped an unusable file with a Python warning (its file and source line) where show
    prints one 'warning:' line."""
    cache = TuningCache(tmp_path / "cache")
    cache.put("a" * 64, _record())
    (tmp_path / "cache" / ("b" * 64 + ".json")).write_text("{not json")
    assert cli.main(["cache", "export", str(tmp_path / "state.json")]) == 0
    captured = capsys.readouterr()
    assert "exported 1 entry" in captured.out
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: ") and "bbbbbbbb" in lines[0], lines
