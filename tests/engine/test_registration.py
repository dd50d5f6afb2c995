"""The backend is found by name in a fresh process, without importing truthfuse."""
import subprocess
import sys
import textwrap


def test_backend_registered_by_entry_point_in_fresh_process():
    code = textwrap.dedent("""
        import sys, torch
        assert "truthfuse" in torch._dynamo.list_backends(), torch._dynamo.list_backends()
        m = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU())
        x = torch.randn(3, 8)
        out = torch.compile(m, backend="truthfuse", options={"inner": "eager"})(x)
        torch.testing.assert_close(out, m(x))
        print("OK", "fusion_backend" in sys.modules)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().startswith("OK")
