"""Dump SmolLM2-135M's MagR inputs for benchmarks/bench_magr_layers.py: per block the weights of every linear
layer and MagR's features X (the last calibration window, float model, no quantization of earlier blocks).

    python benchmarks/smollm2_features.py --out /tmp/smollm2_H.pt [--nsamples 4 --seqlen 512 --seed 0]

Groups (layers sharing one input): qkv (q/k/v_proj), o (o_proj), gateup (gate/up_proj), down (down_proj).
The file holds {"blocks": [{group: {"X": (tokens x in) float32, "weights": {name: (out x in) float32}}}], ...}.
"""
from __future__ import annotations

import argparse

import torch

GROUPS = {"qkv": ("self_attn", ("q_proj", "k_proj", "v_proj")), "o": ("self_attn", ("o_proj",)),
          "gateup": ("mlp", ("gate_proj", "up_proj")), "down": ("mlp", ("down_proj",))}


@torch.no_grad()
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="/tmp/smollm2_H.pt")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--calib", default="c4")
    ap.add_argument("--nsamples", type=int, default=4)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    from magr.pipeline.calibration_data import get_calibration
    from magr.pipeline.models import decoder_layers, load_model

    model, tok = load_model(args.model)
    windows = get_calibration(args.calib, tok, args.nsamples, args.seqlen, args.seed)
    last = windows[-1:]  # MagR's X: the last calibration window (feature_source="last_sample")
    layers = decoder_layers(model)
    blocks = [{} for _ in layers]
    handles = []
    for i, layer in enumerate(layers):
        for g, (parent, names) in GROUPS.items():
            mod = getattr(getattr(layer, parent), names[0])
            blocks[i][g] = {"weights": {n: getattr(getattr(layer, parent), n).weight.detach().float().clone()
                                        for n in names}}

            def hook(_m, inp, _out, i=i, g=g):
                blocks[i][g]["X"] = inp[0].detach().reshape(-1, inp[0].shape[-1]).float().clone()

            handles.append(mod.register_forward_hook(hook))
    model(last)
    for h in handles:
        h.remove()
    torch.save({"blocks": blocks, "model": args.model, "calib": args.calib, "nsamples": args.nsamples,
                "seqlen": args.seqlen, "seed": args.seed}, args.out)
    print(f"wrote {args.out}: {len(blocks)} blocks, X of {last.shape[1]} tokens")


if __name__ == "__main__":
    main()
