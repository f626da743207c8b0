"""The math: everything between a layer's weight W, its statistics H = X^T X and its quantized weight Q.

- MagR (paper eq. (3), Algorithm 1): ``projection`` (l1-ball projection, l_inf prox), ``solver`` (the
  published ISTA), ``fista`` (the fast solver) with its fused prox step in ``kernels``, ``preprocessing``
  (the ``MagR`` step);
- quantizers and refinement: ``quantizers`` (grids, RTN), ``optq`` (OPTQ / GPTQ) with its compiled column
  loop ``optq_block``, ``refinement`` (coordinate descent, OPTQ-dagger) with its compiled sweep ``cd_sweep``
  (C) and ``cd_triton`` (CUDA), ``cd_check`` (code-by-code equality of two CD implementations);
- ``methods`` (a method = preprocessing + quantizer + refinement; the paper's presets) and ``settings`` (one
  config dataclass per step, one flat name per setting);
- ``cbuild`` builds the C sources beside it (``csrc/``) on first use.

Imports: torch and the standard library only; nothing from the other magr sub-packages.
"""
