import torch

from vqlib.compress.calibration import probe_batch


def test_probe_batch_keeps_the_first_sequence_of_hf_batches():
    ids = torch.arange(12).reshape(3, 4)
    mask = torch.ones(3, 4, dtype=torch.long)
    probe = probe_batch({"input_ids": ids, "attention_mask": mask, "use_cache": False, "pos": torch.arange(4)})
    assert torch.equal(probe["input_ids"], ids[:1]) and torch.equal(probe["attention_mask"], mask[:1])
    assert probe["use_cache"] is False and torch.equal(probe["pos"], torch.arange(4))  # no batch axis: whole


def test_probe_batch_leaves_other_batches_whole():
    x = torch.randn(5, 3)
    assert probe_batch(x) is x
    assert probe_batch((x,))[0] is x
    single = {"input_ids": torch.zeros(1, 4, dtype=torch.long)}
    assert probe_batch(single) is single
    no_ids = {"pixel_values": torch.randn(2, 3, 8, 8)}
    assert probe_batch(no_ids) is no_ids


def test_group_layers_skip_their_outputs_in_early_stopped_passes(monkeypatch):
    """q/k (before v) and gate (before up) are not computed in their statistics passes, and the
    compressed model is bit-identical to computing them."""
    from test_compress_blockwise import CFG, dequantized, tiny_llama, token_batches

    from vqlib.compress import VQConfig, calibration, compress

    linear_forward = torch.nn.Linear.forward

    def run():
        model = tiny_llama()
        names = {id(m): n for n, m in model.named_modules()}
        calls = []

        def counted(module, x):  # the class forward: what a skipped layer no longer runs
            calls.append(names[id(module)])
            return linear_forward(module, x)

        with monkeypatch.context() as m:
            m.setattr(torch.nn.Linear, "forward", counted)
            weights = dequantized(compress(model, VQConfig(**CFG), calibration=token_batches())[0])
        return weights, calls

    skipping, calls_skipping = run()
    monkeypatch.setattr(calibration, "_skip_outputs", lambda layers: [])
    computing, calls_computing = run()
    assert skipping.keys() == computing.keys()
    for name in skipping:
        assert torch.equal(skipping[name], computing[name]), name
    # Per block and batch: q, k and gate computed only in the other passes (3 blocks x 3 batches).
    for layer in ("q_proj", "k_proj", "mlp.gate_proj"):
        saved = sum(layer in c for c in calls_computing) - sum(layer in c for c in calls_skipping)
        assert saved == 3 * 3, layer
    assert sum("v_proj" in c for c in calls_computing) == sum("v_proj" in c for c in calls_skipping)
