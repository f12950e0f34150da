"""GPTQ through llmcompressor on SmolLM2-135M, in its own environment; writes the dequantized weights.

llmcompressor (the maintained GPTQ implementation of vLLM's project) requires transformers<=4.57.6,
while vqlib's stack pins transformers 5.24, so it cannot be installed beside vqlib. This script runs
in a second virtual environment and does only the quantization: it loads the fp32 model that
``bench_llm.py`` converted from the GGUF file (its cache folder, ``--model-dir``, safetensors/JSON) and the
calibration token ids ``bench_llm.py`` cut (``--calibration``, a safetensors file; no tokenizer runs here), runs
llmcompressor's ``oneshot`` with a ``GPTQModifier`` on the 210 decoder linears, and writes their
dequantized weights (fp32, what the quantized model computes with) to a safetensors file.
``bench_llm.py --methods gptq --gptq-python <that env's python>`` calls it and measures perplexity on
those weights in its own process, with the same code as every other method.

    python3 -m venv gptq-env && gptq-env/bin/pip install torch==2.9.1 llmcompressor
    gptq-env/bin/python benchmarks/gptq_llmcompressor.py --bits 4 --model-dir ~/.cache/vqlib-bench/smollm2-135m-fp32 \
        --calibration cal.safetensors --out gptq4.safetensors   # cal.safetensors: {"input_ids": (n, 256) int64}

Format (as GPTQ's paper and AutoGPTQ run low bits): b-bit integer levels, asymmetric, one scale and
one zero point per group of 64 input columns along each row (576 is not a multiple of 128); llmcompressor's
defaults otherwise (its activation ordering, dampening 0.01, block size 128). The weights are checked to lie on a
grid (at most 2**b distinct values per group, first and last row of every layer) before they are written.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

# llmcompressor's group quantization needs whole groups, and SmolLM2's 576-column layers hold 4.5 groups of 128
# (its observer fails on a partial group even with bypass_divisibility_checks), so GPTQ runs with groups of 64:
# more scale bits than the g128 of the other scalar methods, counted as such.
GROUP = 64


def gptq_recipe(bits: int):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from llmcompressor.modifiers.quantization import GPTQModifier

    weights = QuantizationArgs(num_bits=bits, type="int", symmetric=False, strategy="group", group_size=GROUP)
    scheme = QuantizationScheme(targets=["Linear"], weights=weights)
    return GPTQModifier(config_groups={"group_0": scheme}, ignore=["lm_head"], dampening_frac=0.01)


def calibration_dataset(calibration_ids: torch.Tensor):
    from datasets import Dataset

    ids = calibration_ids.tolist()
    return Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(row) for row in ids]})


def decoder_linear_weights(model) -> dict[str, torch.Tensor]:
    """{"model.layers.i.<...>.weight": fp32 tensor} for every nn.Linear inside the decoder blocks."""
    return {
        f"{name}.weight": module.weight.detach().float().contiguous()
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and ".layers." in f".{name}."
    }


def check_on_grid(weights: dict[str, torch.Tensor], bits: int) -> None:
    """In the first and last row of every layer, each group holds at most 2**bits distinct values (dequantized levels)."""
    for name, w in weights.items():
        starts = range(0, w.shape[1], GROUP)
        distinct = max(len(torch.unique(w[r, c : c + GROUP])) for r in (0, w.shape[0] - 1) for c in starts)
        if distinct > 2**bits:
            raise RuntimeError(f"{name}: {distinct} distinct values in a group of {GROUP}, expected <= {2**bits}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bits", type=int, required=True, choices=[2, 3, 4, 8])
    p.add_argument("--calibration", type=Path, required=True, help='safetensors file with "input_ids" (n, seq)')
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--model-dir", type=Path, required=True, help="the fp32 model bench_llm.py cached")
    p.add_argument("--out", type=Path, required=True, help="safetensors file for the dequantized decoder weights")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from llmcompressor import oneshot
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    model = AutoModelForCausalLM.from_pretrained(args.model_dir).float().eval()
    # oneshot wants a processor even for token ids; tokenizer.json directly, since the folder's tokenizer
    # config names a class (TokenizersBackend) that exists only in transformers 5.
    tok = PreTrainedTokenizerFast(tokenizer_file=str(args.model_dir / "tokenizer.json"))
    cal = load_file(str(args.calibration))["input_ids"]  # (n, seq) int64
    start = time.perf_counter()
    oneshot(
        model=model,
        dataset=calibration_dataset(cal),
        recipe=gptq_recipe(args.bits),
        processor=tok,
        max_seq_length=cal.shape[1],
        num_calibration_samples=cal.shape[0],
    )
    seconds = time.perf_counter() - start
    weights = decoder_linear_weights(model)
    check_on_grid(weights, args.bits)
    tmp = args.out.with_suffix(".partial")
    save_file(weights, str(tmp))
    tmp.replace(args.out)  # never a half-written file under the final name
    import llmcompressor
    import transformers

    info = dict(
        seconds=seconds,
        layers=len(weights),
        llmcompressor=llmcompressor.__version__,
        transformers=transformers.__version__,
        torch=torch.__version__,
    )
    print("GPTQ_RESULT " + json.dumps(info), flush=True)


if __name__ == "__main__":
    main()
