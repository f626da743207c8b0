"""Calibration inputs block by block: every block gets the keyword arguments (attention mask, rotary
embeddings) the model itself passes that layer, also for sliding-window and alternating attention."""
import torch

from magr.pipeline.calibration import block_forward, walk_blocks


def test_gemma2_blocks_see_their_own_sliding_window_mask():
    """Gemma2 alternates sliding-window (32 tokens here) and full attention: with 128-token calibration
    windows every block's inputs must equal the model's own hidden states."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    cfg = Gemma2Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=32)
    model = Gemma2ForCausalLM(cfg).eval()
    calib = torch.randint(3, 512, (2, 128), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hidden = model(calib, output_hidden_states=True).hidden_states
    for blk in walk_blocks(model, calib, "cpu"):
        torch.testing.assert_close(blk.inps, hidden[blk.index], msg=f"inputs of block {blk.index}")
        if blk.index + 1 < cfg.num_hidden_layers:  # the kwargs the statistics pass uses
            out = block_forward(blk.block, blk.inps, blk.kwargs)
            torch.testing.assert_close(out, hidden[blk.index + 1], msg=f"outputs of block {blk.index}")
