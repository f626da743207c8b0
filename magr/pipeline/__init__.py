"""The run: a model, its calibration data, and the block-by-block walk that quantizes it.

- ``sources`` (where the shared data and the embedded models are), ``models`` (loading, architecture checks,
  layer names), ``families`` (the window protocol of each model family: BOS per window or not), ``tokenizer``;
- ``data`` (WikiText-2 / C4 / TinyStories text and tokens, offline first), ``calibration_data`` (the
  ``Calibration`` settings and the released sampler), ``calibration`` (block inputs, block forwards, layer
  statistics H);
- ``blocks`` (``quantize_model``: one method applied block by block, OPTQ's procedure), ``checkpoints``
  (block checkpoints and resume keys), ``preflight`` (checks before any long work), ``persistence`` (run
  folders: metadata, grids, atomic writes), ``machine`` (what a result was measured on).

Imports: magr.core only.
"""
