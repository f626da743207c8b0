"""Quantize stories260K with fixed settings and print SHA-256 digests of the weights (tests/test_identity.py).

Run in the portable arithmetic mode (set by the caller before torch loads): ATEN_CPU_CAPABILITY=default
(torch's scalar kernels), MKL_CBWR=COMPATIBLE (MKL's SSE2 branch, the same on Intel and AMD), one thread.
It also prints a digest of a fixed float32 computation (matmul, Cholesky, eigenvalues, softmax, a model
forward): where that canary differs from the recorded one, this machine's arithmetic differs from the
recording machine's even in this mode, and weight digests cannot be compared.

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


def canary(model) -> str:
    g = torch.Generator().manual_seed(0)
    A = torch.randn(96, 64, generator=g)
    H = A.T @ A + 0.1 * torch.eye(64)
    tokens = torch.randint(3, 512, (2, 32), generator=g)
    with torch.no_grad():
        logits = model(tokens).logits
    return digest([H, torch.linalg.cholesky(H), torch.linalg.eigvalsh(H), torch.softmax(A, 1), A.sum(0), logits])


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
    out = {"canary": canary(model0), "cases": {}}
    for name, case in spec["cases"].items():
        model = copy.deepcopy(model0)
        res = quantize_model(model, calib, QuantConfig.build(**case["settings"]), device="cpu", progress=False)
        out["cases"][name] = digest(model.get_submodule(n).weight for n in sorted(res.params))
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1])
