"""benchmarks/gpu_check.py: without CUDA it explains itself and exits 0; its peak table and
FLOP/byte models."""
from __future__ import annotations

import io

import pytest
import torch

from benchmarks import gpu_check


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_without_cuda_says_why_and_exits_zero(capsys):
    assert gpu_check.main(["--no-timing"]) == 0
    text = capsys.readouterr().out
    assert "no CUDA GPU" in text and "torch.cuda.is_available() is False" in text


def test_run_accepts_the_parser_it_builds():
    import argparse

    parser = argparse.ArgumentParser()
    gpu_check.add_arguments(parser)
    args = parser.parse_args(["--lengths", "4096", "8192", "--dtype", "bfloat16", "--causal"])
    assert args.lengths == [4096, 8192] and args.dtype == "bfloat16" and args.causal
    if not torch.cuda.is_available():
        buf = io.StringIO()
        assert gpu_check.run(args, out=buf) == 0 and "no CUDA GPU" in buf.getvalue()


@pytest.mark.parametrize("name,half", [("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA H100 80GB HBM3", 989e12),
                                       ("NVIDIA H100 PCIe", 756e12), ("Tesla T4", 65e12)])
def test_known_peaks_by_device_name(name, half):
    peak = gpu_check.peak_for(name)
    assert peak.half == half and not peak.estimated


def test_unknown_device_gets_an_estimate_marked_as_such():
    peak = gpu_check.peak_for("Some Future GPU", sm_count=100, major=9)
    assert peak.estimated and peak.half == 100 * 2048 * 1.4e9 and peak.bandwidth > 0


def test_flop_models():
    # LSH: each query meets 2 * bucket_size keys per round; fwd + bwd = 3.5x the forward's 2 matmuls
    assert gpu_check.lsh_flops(8, 4096, 64, 64, 4) == 3.5 * 4 * 8 * 4096 * 128 * 64 * 4
    assert gpu_check.full_flops(8, 4096, 64, causal=True) == gpu_check.full_flops(8, 4096, 64, causal=False) / 2
    # LSH is linear in N, full attention quadratic
    assert gpu_check.lsh_flops(1, 8192, 64, 64, 1) == 2 * gpu_check.lsh_flops(1, 4096, 64, 64, 1)
    assert gpu_check.full_flops(1, 8192, 64, False) == 4 * gpu_check.full_flops(1, 4096, 64, False)
