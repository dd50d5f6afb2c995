"""The host-side launch arithmetic agrees with Triton's own."""
import triton

from fusion_backend.kernels.runtime import cdiv, next_power_of_2


def test_cdiv_and_next_power_of_2_match_triton():
    for a in range(0, 600, 7):
        for b in (1, 3, 16, 64, 128):
            assert cdiv(a, b) == triton.cdiv(a, b)
    for n in list(range(1, 1100)) + [2**20 - 1, 2**20, 2**20 + 1]:
        assert next_power_of_2(n) == triton.next_power_of_2(n)
