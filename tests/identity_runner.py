"""Quantize stories260K with fixed settings and print SHA-256 digests of the weights (tests/test_identity.py).

Run in the portable arithmetic mode (set by the caller before torch loads): ATEN_CPU_CAPABILITY=default
(torch's scalar kernels), MKL_CBWR=COMPATIBLE (MKL's SSE2 branch, the same on Intel and AMD), one thread.
It also prints digests of fixed float32 computations, one per kind of operation the quantization runs (the
canary): matmul, Cholesky, eigenvalues, softmax, a sum, a model forward on random tokens (2 x 32, and
of the calibration batch's shape), and OPTQ's own linear algebra at every input width of stories260K (the damped Cholesky,
its inverse, the upper factor of the inverse, the lazy-block update). Where one differs from the recorded
one, this machine's arithmetic differs from the recording machine's even in this mode (the test names the
operations), and weight digests cannot be compared.

    ATEN_CPU_CAPABILITY=default MKL_CBWR=COMPATIBLE python tests/identity_runner.py tests/data/identity.json
"""
from __future__ import annotations

import copy
import hashlib
import json
import sys

import torch


def digest(tensors) -> str:
    return hashlib.sha256(b"".join(t.detach().contiguous().numpy().tobytes() for t in tensors)).hexdigest()


def canary(model, calib_shape) -> dict[str, str]:
    """Digests of fixed float32 computations, one per kind of operation (see the module docstring)."""
    g = torch.Generator().manual_seed(0)
    A = torch.randn(96, 64, generator=g)
    H = A.T @ A + 0.1 * torch.eye(64)
    tokens = torch.randint(3, 512, (2, 32), generator=g)
    out = {"matmul": digest([H]), "cholesky": digest([torch.linalg.cholesky(H)]),
           "eigvalsh": digest([torch.linalg.eigvalsh(H)]), "softmax": digest([torch.softmax(A, 1)]),
           "sum": digest([A.sum(0)])}
    with torch.no_grad():
        out["forward"] = digest([model(tokens).logits])
        batch = torch.randint(3, 512, tuple(calib_shape), generator=g)  # random tokens: the digest reads no magr code
        out["forward_calibration"] = digest([model(batch).logits])
    for n in sorted({m.in_features for m in model.modules() if isinstance(m, torch.nn.Linear)}):
        X = torch.randn(512, n, generator=g)
        Hn = X.T @ X
        L = torch.linalg.cholesky_ex(Hn + 0.01 * torch.diagonal(Hn).mean() * torch.eye(n))[0]
        Hinv = torch.cholesky_inverse(L)
        U = torch.linalg.cholesky_ex(Hinv, upper=True)[0]
        bs = 128 if n > 128 else n // 2  # OPTQ's default lazy block, or a half
        Err = torch.randn(64, bs, generator=g)
        out[f"optq_linalg_{n}"] = digest([Hn, L, Hinv, U, Err @ U[:bs, bs:]])
    return out


def main(path: str) -> None:
    from magr.pipeline.calibration_data import get_calibration
    from magr.core.methods import QuantConfig
    from magr.pipeline.models import load_model
    from magr.pipeline.blocks import quantize_model

    torch.set_num_threads(1)
    spec = json.loads(open(path).read())
    model0, tok = load_model("stories260k")
    cal = spec["calibration"]
    calib = get_calibration(cal["calib"], tok, cal["nsamples"], cal["seqlen"], cal["seed"], sampler=cal["sampler"])
    out = {"canary": canary(model0, calib.shape), "cases": {}}
    for name, case in spec["cases"].items():
        model = copy.deepcopy(model0)
        res = quantize_model(model, calib, QuantConfig.build(**case["settings"]), device="cpu", progress=False)
        out["cases"][name] = digest(model.get_submodule(n).weight for n in sorted(res.params))
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1])
