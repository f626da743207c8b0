"""Evaluation of a model, float or quantized: ``perplexity`` (the ``Evaluation`` settings; WikiText-2 / C4
windows, the GPTQ / MagR protocol) and ``zeroshot`` (lm-evaluation-harness on local copies of ARC, PIQA,
Winogrande; its task files in ``tasks/``).

Imports: magr.core and magr.pipeline; never magr.deploy or magr.reproduction.
"""
