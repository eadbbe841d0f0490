"""Inputs and the comparison shared by the Triton (interpreter) and CUDA kernel tests."""
import torch

from effqat_plugin.kernels import pack_int_weight
from effqat_plugin.kernels import reference as R


def rand_case(N, Kf, bits, gs, seed, device="cpu"):
    """Fresh random codes (every value in range, never all zero), zeros and positive scales."""
    g = torch.Generator().manual_seed(seed)
    maxq = (1 << bits) - 1
    ng = R.n_groups(gs, Kf)
    w = torch.randint(0, maxq + 1, (N, Kf), generator=g, dtype=torch.uint8)
    z = torch.randint(0, maxq + 1, (N, ng), generator=g, dtype=torch.uint8)
    s = torch.rand(N, ng, generator=g) * 0.05 + 0.01
    return pack_int_weight(w, bits).to(device), z.to(device), s.to(device), g


def close(got, ref, rel, what):
    """Max error within ``rel`` of the reference's largest magnitude; poison (NaN) left over fails."""
    assert torch.isfinite(got).all(), f"{what}: non-finite (poison left?)"
    err = (got.double() - ref.double()).abs().max().item()
    scale = max(ref.double().abs().max().item(), 1e-6)
    assert err <= rel * scale, f"{what}: max err {err:.3g} > {rel} * {scale:.3g}"
