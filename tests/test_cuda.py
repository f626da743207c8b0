"""The core library on CUDA gives the CPU results (skipped without a GPU)."""
from __future__ import annotations

import pytest
import torch

from magr.core.optq import OPTQ
from magr.core.projection import project_l1_ball, prox_linf
from magr.core.quantizers import Grid, rtn
from magr.core.refinement import CD, cd_objective, cd_refine
from magr.core.solver import magr_ista

DAMP, EPS = CD.damp, CD.eps

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def exact_matmuls():
    """No TF32 shortcuts: the GPU must reproduce the CPU's float32 arithmetic up to rounding."""
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def problem(seed: int, out: int = 64, n: int = 128, tokens: int = 512):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(tokens, n, generator=g) @ (torch.randn(n, n, generator=g) / n**0.5)
    W = 0.05 * torch.randn(out, n, generator=g)
    W[::8, 3] = 0.5  # outliers
    return W, X.T @ X, X


def loss(X, Q, W) -> float:
    X, Q, W = X.double().cpu(), Q.double().cpu(), W.double().cpu()
    return float(((X @ (Q - W).T) ** 2).sum())


@pytest.mark.parametrize("method", ["sort", "newton"])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_projection_cuda_matches_cpu(method, dtype, tol):
    g = torch.Generator().manual_seed(0)
    V = torch.randn(256, 11008, generator=g).to(dtype)
    V[0] = 0.0
    V[1, :100] = 2.0  # ties
    radii = V.abs().sum(dim=1) * torch.rand(256, generator=g).to(dtype) * 1.2
    cpu = project_l1_ball(V, radii, method=method)
    gpu = project_l1_ball(V.to(CUDA), radii.to(CUDA), method=method)
    assert gpu.device.type == "cuda"
    scale = V.abs().amax(dim=1, keepdim=True)
    assert torch.all((gpu.cpu() - cpu).abs() <= tol * scale)


@pytest.mark.parametrize("method", ["sort", "newton"])
@pytest.mark.parametrize("group_size", [None, 128])
def test_prox_cuda_matches_cpu(method, group_size):
    V = torch.randn(512, 4096, generator=torch.Generator().manual_seed(1))
    cpu = prox_linf(V, 0.5, group_size, method)
    gpu = prox_linf(V.to(CUDA), 0.5, group_size, method)
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("projection", ["sort", "newton"])
@pytest.mark.parametrize("group_size,alpha", [(None, 1e-3), (32, 1e-4)])
def test_magr_cuda_matches_cpu(projection, group_size, alpha):
    W, H, _ = problem(2)
    kwargs = dict(alpha=alpha, iters=100, group_size=group_size, projection=projection,
                  dtype=torch.float64, return_info=True)
    cpu, info_cpu = magr_ista(W.double(), H.double(), **kwargs)
    gpu, info_gpu = magr_ista(W.double().to(CUDA), H.double().to(CUDA), **kwargs)
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(torch.tensor(info_gpu.objective), torch.tensor(info_cpu.objective),
                               rtol=1e-9, atol=0)
    # float32 on the GPU: same result up to float32 rounding
    gpu32 = magr_ista(W.to(CUDA), H.to(CUDA), alpha=alpha, iters=100, group_size=group_size,
                      projection=projection)
    torch.testing.assert_close(gpu32.cpu(), cpu.float(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group_size,actorder,static_groups", [
    (None, False, False), (None, True, False), (32, False, False), (32, True, False), (32, True, True),
])
def test_optq_cuda_matches_cpu(bits, group_size, actorder, static_groups):
    W, H, X = problem(3 + bits)
    step, grid = OPTQ(blocksize=64, actorder=actorder, static_groups=static_groups), Grid(bits, group_size)
    cpu, _ = step(W, H, grid)
    gpu, _ = step(W.to(CUDA), H.to(CUDA), grid)
    assert gpu.device.type == "cuda"
    # Rounding decisions may flip where float32 arithmetic differs in the last bit; they must be rare
    # and leave the layer loss unchanged.
    mismatch = ((gpu.cpu() - cpu).abs() > 1e-5).float().mean().item()
    assert mismatch <= 1e-3, f"{mismatch:.2%} of entries differ"
    assert loss(X, gpu, W) == pytest.approx(loss(X, cpu, W), rel=1e-3)


@pytest.mark.parametrize("group_size", [None, 32])
def test_cd_refine_cuda_matches_cpu(group_size):
    W, H, _ = problem(9)
    Q, p = rtn(W, Grid(2, group_size, beta=0.8))
    cpu, _ = cd_refine(Q, W, H, p, 3, DAMP, EPS)
    p_gpu = type(p)(p.scale.to(CUDA), p.zero.to(CUDA), p.maxq, p.g_idx.to(CUDA))
    gpu, _ = cd_refine(Q.to(CUDA), W.to(CUDA), H.to(CUDA), p_gpu, 3, DAMP, EPS)
    assert gpu.device.type == "cuda"
    mismatch = ((gpu.cpu() - cpu).abs() > 1e-5).float().mean().item()
    assert mismatch <= 1e-3, f"{mismatch:.2%} of entries differ"
    assert cd_objective(gpu.cpu(), W, H, DAMP, EPS) == pytest.approx(cd_objective(cpu, W, H, DAMP, EPS), rel=1e-4)
    assert cd_objective(gpu.cpu(), W, H, DAMP, EPS) <= cd_objective(Q, W, H, DAMP, EPS)


@pytest.mark.parametrize("cd_grid", ["keep", "refit"])
@pytest.mark.parametrize("group_size", [None, 32])
def test_compiled_cd_on_cuda_equals_the_cpu_kernel(group_size, cd_grid):
    """The Triton sweep gives the C kernel's codes (differences only at rounding ties, counted)."""
    from magr.core.cd_check import codes
    from magr.core.refinement import cd_refine_compiled

    W, H, _ = problem(10, out=96, n=128)
    grid = Grid(2, group_size, beta=0.8)
    Q, p = rtn(W, grid)
    refit = grid if cd_grid == "refit" else None
    cpu, p_cpu = cd_refine_compiled(Q, W, H, p, 30, DAMP, EPS, refit)
    p_gpu = type(p)(p.scale.to(CUDA), p.zero.to(CUDA), p.maxq, p.g_idx.to(CUDA))
    gpu, p_gpu = cd_refine_compiled(Q.to(CUDA), W.to(CUDA), H.to(CUDA), p_gpu, 30, DAMP, EPS, refit)
    differ = (codes(gpu.cpu(), p_gpu.cpu()) != codes(cpu, p_cpu)).float().mean().item()
    assert differ <= 1e-3, f"{differ:.2%} of codes differ"
