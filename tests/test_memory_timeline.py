"""benchmarks.memory_timeline: the peak of live tensor bytes it reports is exact on a
known allocation pattern, and it finds the start of backward."""

import torch

from benchmarks.memory_timeline import MIB, timeline


def test_peak_of_a_known_allocation_pattern():
    def run() -> None:
        a = torch.ones(4 * MIB, dtype=torch.uint8)
        b = torch.ones(8 * MIB, dtype=torch.uint8)
        del a
        c = torch.ones(2 * MIB, dtype=torch.uint8)  # reuses nothing: 10 MiB live < 12
        del b, c

    found = timeline(run, "cpu", window_ms=10_000, min_bytes=MIB)
    assert 12 * MIB <= found.peak < 12 * MIB + 64 * 1024
    assert found.at_backward_start is None
    assert sorted(b for _, b, _ in found.allocations_before_peak) == [4 * MIB, 8 * MIB]


def test_live_bytes_at_the_start_of_backward():
    x = torch.randn(MIB // 4, requires_grad=True)  # 1 MiB of fp32

    def run() -> None:
        y = x.exp()  # saved for backward: 1 MiB live
        y.sum().backward()
        x.grad = None

    found = timeline(run, "cpu")
    assert MIB <= found.at_backward_start < MIB + 64 * 1024
    assert found.peak >= found.at_backward_start
