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


def test_stats_keep_outputs_walks_the_same_inputs_and_statistics(stories260k):
    """stats(keep_outputs=True) runs each block once and hands its outputs on: every block then sees the same
    inputs, bit for bit, and gets the same statistics as the walk that forwards the block a second time."""
    from magr.pipeline.models import SEQUENTIAL_GROUPS

    model, _ = stories260k
    calib = torch.randint(3, 500, (10, 32), generator=torch.Generator().manual_seed(0))  # 10: a partial batch too

    calls = []
    hooks = [layer.register_forward_hook(lambda *a: calls.append(1)) for layer in model.model.layers]

    def walk(keep):
        seen = []
        for blk in walk_blocks(model, calib, "cpu"):
            if blk.index == 0:
                calls.clear()  # the embeddings' capture runs the rows through pass-through layers
            stats = blk.stats(SEQUENTIAL_GROUPS, keep_outputs=keep)
            assert (blk.outputs is not None) == keep
            seen.append((blk.inps.clone(), {name: (st.H.clone(), st.H_last.clone()) for name, st in stats.items()}))
        return seen, len(calls)

    (once, n_once), (twice, n_twice) = walk(True), walk(False)
    for h in hooks:
        h.remove()
    n = len(model.model.layers)
    assert n_once == 2 * n  # two batches (8 + 2 samples) through each block, once
    assert n_twice == 2 * (n - 1)  # the plain walk's second forward; its statistics passes stop before the end
    assert len(once) == len(twice) == len(model.model.layers)
    for (inps_a, stats_a), (inps_b, stats_b) in zip(once, twice):
        assert torch.equal(inps_a, inps_b)
        for name in stats_a:
            assert all(torch.equal(a, b) for a, b in zip(stats_a[name], stats_b[name]))
