"""Deployment: a quantized run as a low-bit checkpoint that other libraries load.

``packing`` (b-bit codes into int32 words), ``export`` (GPTQ and compressed-tensors checkpoints from a run
folder), ``reload`` (the exported checkpoint read back by the third-party loaders, for the round trip).

Imports: magr.core and magr.pipeline; never magr.evaluation or magr.reproduction.
"""
