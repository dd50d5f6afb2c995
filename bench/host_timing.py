"""Host-side timing shared by the GPU benchmarks: how long the Python that issues a step takes,
against the step's wall time, and where that host time goes (cProfile)."""
import cProfile
import io
import pstats
import time

import torch


def host_and_wall_ms(step, steps: int, warmup: int = 5) -> tuple:
    """(host issue ms, wall ms) per step: the time to issue `steps` steps before synchronizing,
    and with the synchronization. Equal numbers mean the host, not the GPU, sets the pace."""
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    issue_ms = (time.perf_counter() - t0) / steps * 1e3
    torch.cuda.synchronize()
    return issue_ms, (time.perf_counter() - t0) / steps * 1e3


def cprofile_text(step, steps: int, limit: int = 30, orders=("tottime",)) -> str:
    """The cProfile report of `steps` steps (synchronized at the end), top `limit` rows per order."""
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    prof.disable()
    text = io.StringIO()
    stats = pstats.Stats(prof, stream=text)
    for order in orders:
        stats.sort_stats(order).print_stats(limit)
    return text.getvalue()
