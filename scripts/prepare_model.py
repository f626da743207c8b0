"""Load a model once (alias, GGUF, folder or hub id) and save it as a plain safetensors folder.

The pipeline's first stage: loading the embedded SmolLM2 GGUF de-quantizes 272 tensors and converts the
tokenizer once; every later stage loads the saved folder, which is much faster, and streams it one decoder block
at a time (README "Models larger than memory"). A source that is already a safetensors folder (a downloaded
checkpoint, or a hub id, whose safetensors files are downloaded first) is copied shard by shard in the requested
dtype, never loaded whole; a .gguf (or a hub model without safetensors files) is loaded whole once.

    python scripts/prepare_model.py --source smollm2-135m --out runs/model [--dtype float32]
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from magr.pipeline.models import DTYPES, load_model, model_source
from magr.pipeline.streaming import convert_folder, will_stream
from magr.pipeline.tokenizer import load_tokenizer


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", required=True, help="alias (smollm2-135m, stories260k), .gguf, folder or hub id")
    p.add_argument("--out", required=True, help="folder to write (save_pretrained)")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="dtype of the saved weights")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    out = Path(args.out)
    source = args.source
    if model_source(source)[0] == "hub":  # its safetensors folder, downloaded (or from the hub cache), then copied
        from huggingface_hub import snapshot_download

        source = snapshot_download(source, allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model"])
    if will_stream(source):
        convert_folder(model_source(source)[1], out, DTYPES[args.dtype], load_tokenizer(source))
    else:
        model, tokenizer = load_model(args.source, dtype=DTYPES[args.dtype])
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
    logging.getLogger("prepare").info("saved %s (%s) to %s", args.source, args.dtype, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
