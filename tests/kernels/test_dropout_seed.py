"""The fused ops' dropout seeds under torch.compile: drawn by an opaque op at run time, one per
call site, in the order eager draws them."""
import pytest
import torch
from torch._inductor.utils import run_and_get_code

from fusion_backend.ops import attention, feedforward


def two_sites(q, k, v, x, w1, w2):
    a = attention(q, k, v, dropout_p=0.5)
    b = attention(q, k, v, dropout_p=0.5)  # same inputs: only the seed can tell them apart
    f = feedforward(x, w1, None, w2, None, hidden_dropout_p=0.5)
    return a, b, f


def inputs():
    q, k, v = (torch.randn(1, 2, 24, 16) for _ in range(3))
    return q, k, v, torch.randn(24, 16), torch.randn(32, 16), torch.randn(16, 32)


def test_compiled_sites_draw_distinct_seeds_in_eager_order():
    args = inputs()
    torch.manual_seed(11)
    eager = two_sites(*args)
    assert not torch.equal(eager[0], eager[1])
    for backend in ("aot_eager", "inductor"):
        torch._dynamo.reset()
        torch.manual_seed(11)
        got = torch.compile(two_sites, backend=backend, fullgraph=True)(*args)
        for a, b in zip(got, eager):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_inductor_calls_the_seed_op_instead_of_generating_a_kernel_for_it():
    """A randint lowered by Inductor inside a CUDA graph becomes a C++ kernel that takes tens of
    seconds to build; the seed op must stay an opaque call."""
    torch._dynamo.reset()
    _, codes = run_and_get_code(torch.compile(two_sites, backend="inductor", fullgraph=True), *inputs())
    code = "\n".join(codes)
    assert code.count("truthfuse.dropout_seed") >= 3
    assert "randint" not in code.replace("truthfuse.dropout_seed", "")


def test_kernels_read_the_seed_on_the_device():
    """Every kernel that drops takes its seed as a pointer (SEED) and none as an int: a seed read
    on the host would need a sync per call and would be frozen into a CUDA graph, and an int seed
    made Triton compile a new kernel the first time a seed fell in another divisibility class.
    Checked on the compiled (not interpreted) kernels."""
    import os
    import subprocess
    import sys

    code = (
        "import inspect, triton\n"
        "from fusion_backend.kernels import attention, attention_l1, feedforward\n"
        "kernels = [(n, {p.name for p in k.params}) for m in (attention, attention_l1, feedforward)\n"
        "           for n, k in inspect.getmembers(m, lambda k: isinstance(k, triton.runtime.jit.JITFunction))\n"
        "           if n.endswith('_kernel')]\n"
        "print(sum('SEED' in p for _, p in kernels), [n for n, p in kernels if 'seed' in p])\n"
    )
    env = dict(os.environ, TRITON_INTERPRET="0")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    seeded, int_seeded = out.strip().split(" ", 1)
    assert int(seeded) == 11 and int_seeded == "[]", out


def test_eager_draw_is_the_ops_draw():
    """Plain eager calls draw the seed without the op; after one manual_seed both give the same
    seeds, on the anchor's device, and `reference_seed` predicts them."""
    from fusion_backend.ops.seed import SEED_HIGH, draw_seed, dropout_seed_op, reference_seed

    x = torch.randn(3)
    torch.manual_seed(11)
    eager = [draw_seed(x) for _ in range(3)]
    torch.manual_seed(11)
    op = [dropout_seed_op(x, SEED_HIGH) for _ in range(3)]
    torch.manual_seed(11)
    ref = [reference_seed(x.device) for _ in range(3)]
    assert [int(t) for t in eager] == [int(t) for t in op] == ref and len(set(ref)) == 3
    assert all(t.device == x.device and t.dtype == torch.int64 and t.dim() == 0 for t in eager + op)


def test_seed_argument_is_checked():
    from fusion_backend.kernels.philox import seed_arg

    x = torch.zeros(2)
    assert seed_arg(None, x) is x
    assert int(seed_arg(7, x)) == 7
    with pytest.raises(ValueError, match="int64"):
        seed_arg(torch.tensor(7, dtype=torch.int32), x)


@pytest.mark.parametrize("value, expected", [("", 16), (" 8 ", 8), ("abc", "must be 8 or 16, got 'abc'"),
                                             ("7", "must be 8 or 16, got '7'")])
def test_dropout_bits_variable_is_read_or_refused_clearly(value, expected):
    """Empty means unset (int('') stopped the import with "invalid literal for int()", as did any
    other non-number, naming neither the variable nor its values)."""
    import os
    import subprocess
    import sys

    code = "import fusion_backend.kernels.attention as a; print('BITS', a.DROPOUT_BITS)"
    env = {**os.environ, "TRUTHFUSE_ATTENTION_DROPOUT_BITS": value}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    if isinstance(expected, int):
        assert proc.returncode == 0 and f"BITS {expected}" in proc.stdout, proc.stderr[-2000:]
    else:
        assert proc.returncode != 0 and f"TRUTHFUSE_ATTENTION_DROPOUT_BITS {expected}" in proc.stderr, proc.stderr[-2000:]
