"""Deployment: a quantized run as a low-bit checkpoint that other libraries load.

``packing`` (b-bit codes into int32 words), ``export`` (GPTQ, compressed-tensors and GGUF checkpoints from a run
folder), ``llamacpp`` (the GGUF file for llama.cpp: Q4_1 / Q8_0 blocks, written and read back), ``reload`` (the exported checkpoint read back by the third-party loaders, for the round trip).

Imports: magr.core and magr.pipeline; never magr.evaluation or magr.reproduction.
"""
