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
