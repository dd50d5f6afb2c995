"""options={"monitor": True}: per-site calls, time and memory; nothing inserted when off; the
markers survive Inductor and leave training unchanged; TRUTHFUSE_LOG."""
import logging
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

import fusion_backend
from fusion_backend import logging_setup


MARKERS = ("truthfuse_monitor.begin", "truthfuse_monitor.end")


class TinyAttention(nn.Module):
    """Causal L2 attention with a learnable per-head temperature, as small as the kernels allow."""

    def __init__(self, d=16, heads=2, max_len=8):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)
        self.log_lam = nn.Parameter(torch.zeros(heads, 1, 1))
        self.register_buffer("future", torch.ones(max_len, max_len, dtype=torch.bool).triu(1))

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=-1)
        q, k, v = (t.view(B, T, self.heads, C // self.heads).transpose(1, 2) for t in (q, k, v))
        scores = -self.log_lam.exp() * torch.cdist(q, k) ** 2
        scores = scores.masked_fill(self.future[:T, :T], float("-inf"))
        y = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, C)
        return self.out(y)


def _options(**extra):
    return dict({"strategy": "aggressive", "inner": "eager", "cache": False}, **extra)


def _marker_nodes(gm):
    return [n for n in gm.graph.nodes if any(m in str(n.target) for m in MARKERS)]


def _site_metrics():
    """metrics() restricted to sites that ran since the last reset."""
    return {k: v for k, v in fusion_backend.metrics().items() if v["calls"]}


def test_monitor_off_inserts_nothing(inner_graphs):
    fusion_backend.reset_metrics()
    model = TinyAttention()
    compiled = torch.compile(model, backend=fusion_backend.backend(**_options()))
    compiled(torch.randn(2, 8, 16))
    final = inner_graphs[-1]
    assert any(n.meta.get("truthfuse_site") for n in final.graph.nodes), "the site was not fused"
    assert _marker_nodes(final) == []
    assert not hasattr(final, "_truthfuse_monitor_token")
    assert _site_metrics() == {}


def test_monitor_counts_calls_and_time_under_eager(inner_graphs):
    fusion_backend.reset_metrics()
    model = TinyAttention()
    compiled = torch.compile(model, backend=fusion_backend.backend(**_options(monitor=True)))
    x = torch.randn(2, 8, 16)
    for _ in range(3):
        compiled(x)
    assert len(_marker_nodes(inner_graphs[-1])) == 2
    stats = _site_metrics()
    assert len(stats) == 1, stats
    (site, s), = stats.items()
    assert "attention.l2_cdist" in site
    assert (s["rule"], s["kind"], s["variant"]) == ("attention.l2_cdist", "attention", "l2")
    assert "test_monitor.py:" in s["location"]
    assert s["calls"] == 3
    assert s["time_ms"] > 0 and s["min_ms"] <= s["mean_ms"] <= s["max_ms"]
    assert s["timer"] == "wall-clock" and s["device"] == "cpu" and s["peak_memory_bytes"] is None

    fusion_backend.reset_metrics()
    assert _site_metrics() == {}
    compiled(x)
    assert _site_metrics()[site]["calls"] == 1


def test_calls_overlapping_on_two_threads_are_each_counted():
    """Thread A's call begins, thread B's call runs whole, then A's ends: two calls. With one open
    start per site, B's begin overwrote A's and A's end found none."""
    import threading
    from types import SimpleNamespace

    from fusion_backend import monitor

    site = SimpleNamespace(rule=SimpleNamespace(name="test.threads"), location="test_monitor.py:1",
                           kind="attention", variant="dot")
    index = monitor._register("g0.test.threads@x", site)
    fusion_backend.reset_metrics()
    token, ops = torch.zeros(1), torch.ops.truthfuse_monitor
    a_began, b_done = threading.Event(), threading.Event()

    def call_a():
        ops.begin(token, index, [])
        a_began.set()
        b_done.wait(timeout=60)
        ops.end(token, index, [])

    thread_a = threading.Thread(target=call_a)
    thread_a.start()
    assert a_began.wait(timeout=60)
    thread_b = threading.Thread(target=lambda: (ops.begin(token, index, []), ops.end(token, index, [])))
    thread_b.start()
    thread_b.join(timeout=60)
    b_done.set()
    thread_a.join(timeout=60)
    assert fusion_backend.metrics()["g0.test.threads@x"]["calls"] == 2


def test_monitor_with_checkpointed_sites_compiles_and_lists_the_others():
    """A fused site inside torch.utils.checkpoint: the monitor's token, a buffer of the body's graph
    module, failed AOTAutograd's lookup of the model's buffers and the compile raised. Such sites
    are fused but not monitored (explain() says so); a site outside the checkpoint still is."""
    from torch.utils.checkpoint import checkpoint

    fusion_backend.reset_metrics()
    torch.manual_seed(0)
    inside, outside = TinyAttention(), TinyAttention()

    def model(x):
        return outside(checkpoint(inside, x, use_reentrant=False))

    x = torch.randn(2, 8, 16, requires_grad=True)
    backend = fusion_backend.backend(**_options(monitor=True))
    torch.compile(model, backend=backend)(x).square().mean().backward()
    assert [s.decision for r in backend.records for s in r.sites] == ["fused", "fused"]
    assert any("not monitored" in note for r in backend.records for note in r.notes)
    stats = _site_metrics()
    assert len(stats) == 1 and all(s["calls"] == 1 for s in stats.values()), stats
    torch._dynamo.reset()


def test_monitored_training_matches_unmonitored():
    torch.manual_seed(0)
    reference = TinyAttention()
    monitored = TinyAttention()
    monitored.load_state_dict(reference.state_dict())
    x = torch.randn(2, 8, 16)
    plain = torch.compile(reference, backend=fusion_backend.backend(**_options()))
    watched = torch.compile(monitored, backend=fusion_backend.backend(**_options(monitor=True)))
    plain(x).square().mean().backward()
    watched(x).square().mean().backward()
    for (name, a), b in zip(monitored.named_parameters(), reference.parameters()):
        assert a.grad is not None, name
        torch.testing.assert_close(a.grad, b.grad, msg=name)


def test_monitor_markers_bracket_the_kernel_under_inductor():
    """Inductor keeps begin -> fused op -> end in its generated code, and backward still works."""
    from torch._inductor import config as inductor_config
    from torch._inductor.utils import run_and_get_code

    fusion_backend.reset_metrics()
    model = TinyAttention()
    compiled = torch.compile(model, backend=fusion_backend.backend(**_options(inner="inductor", monitor=True)))
    x = torch.randn(2, 8, 16)
    with inductor_config.patch(fx_graph_cache=False):
        out, codes = run_and_get_code(compiled, x)
    out.sum().backward()
    assert model.log_lam.grad is not None and torch.isfinite(model.log_lam.grad).all()
    forward = next(c for c in codes if "truthfuse_monitor.begin" in c)
    begin = forward.index("truthfuse_monitor.begin.default(")
    kernel = forward.index("truthfuse.attention_fwd.default(")
    end = forward.index("truthfuse_monitor.end.default(")
    assert begin < kernel < end
    compiled(x)
    (s,) = _site_metrics().values()
    assert s["calls"] == 2 and s["time_ms"] > 0


# -- TRUTHFUSE_LOG ----------------------------------------------------------------------------

@pytest.fixture
def clean_logger():
    logger = logging.getLogger("truthfuse")
    saved = (logger.level, list(logger.handlers), logger.propagate)
    yield logger
    logger.setLevel(saved[0])
    logger.handlers[:] = saved[1]
    logger.propagate = saved[2]


def test_log_levels_and_torch_style_lines(clean_logger, capsys):
    others = {name: (logging.getLogger(name).level, list(logging.getLogger(name).handlers))
              for name in ("", "torch", "torch._dynamo")}
    assert logging_setup.configure("") is None
    assert logging_setup.configure("debug") == logging.DEBUG
    assert logging_setup.configure("debug") == logging.DEBUG  # idempotent: still one handler
    assert len([h for h in clean_logger.handlers if isinstance(h, logging_setup._Handler)]) == 1
    assert clean_logger.propagate is False
    clean_logger.debug("site %s kept", "g0.x")
    err = capsys.readouterr().err
    assert err.startswith("D") and "] [truthfuse] site g0.x kept" in err
    assert logging_setup.configure("info") == logging.INFO
    clean_logger.debug("hidden")
    assert capsys.readouterr().err == ""
    for name, (level, handlers) in others.items():  # other loggers are left alone
        assert logging.getLogger(name).level == level and logging.getLogger(name).handlers == handlers
    with pytest.warns(UserWarning, match="debug, info, warning, error"):
        assert logging_setup.configure("loud") is None


def test_truthfuse_log_env_var_logs_decisions():
    code = ("import torch, fusion_backend\n"
            "def f(q, k, v): return (q @ k.transpose(-2, -1) * 0.25).softmax(-1) @ v\n"
            "q = torch.randn(1, 2, 8, 16)\n"
            "options = {'strategy': 'aggressive', 'inner': 'eager', 'cache': False}\n"
            "fusion_backend.explain(f, q, q, q, options=options)\n")
    env = dict(os.environ, TRUTHFUSE_LOG="debug", TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stderr.splitlines() if "[truthfuse]" in line]
    assert any(line.startswith("I") and "graph 0: 1 site(s), 1 fused" in line for line in lines), done.stderr
    assert any(line.startswith("D") and "fused attention.dot" in line for line in lines), done.stderr
