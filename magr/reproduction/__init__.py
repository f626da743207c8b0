"""The paper's reproduction: what the notebooks and the report are made of.

``cells`` (a Table 2 cell over its calibration seeds; rerun intervals and orderings), ``tables`` (Tables 2-4
and Markdown / CSV output), ``magnitudes`` (Figure 1), ``rank`` (Table 1), ``reported`` (reported values with
their stated uncertainty, and the reproduction check), ``notebook`` (what every notebook shares), ``paper``
(the paper's published numbers), ``alpha_sweep`` (the alpha ablation, layer by layer).

Imports: any magr sub-package and ``magr.runs``; nothing imports it but the CLI, the notebooks and scripts.
"""
