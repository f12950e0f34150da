"""torch.compile around every quantizer: same indices, outputs, gradients and codebook state as eager
mode over several training steps (EMA updates, k-means init and dead-code restarts run inside the
compiled forward). aot_eager traces through Dynamo and AOTAutograd without needing a C++ toolchain."""

import copy

import pytest
import torch

from vqlib import FSQ, LFQ, ResidualVQ, VectorQuantize

QUANTIZERS = {
    "vq_ema_kmeans_restart": lambda: VectorQuantize(16, 64, decay=0.9, kmeans_init=True, dead_code_window=2),
    "vq_cosine_rotation": lambda: VectorQuantize(16, 64, distance="cosine", gradient_estimator="rotation"),
    "simvq": lambda: VectorQuantize(16, 64, reparam="simvq", codebook_update="gradient"),
    "rvq": lambda: ResidualVQ(16, 64, 3, quantizer_dropout=0.5),
    "rvq_simvq_rotation": lambda: ResidualVQ(
        16, 64, 3, reparam="simvq", codebook_update="gradient", gradient_estimator="rotation"
    ),
    "fsq": lambda: FSQ([8, 5, 5, 5], dim=16),
    "lfq": lambda: LFQ(dim=16, codebook_size=256),
}


@pytest.mark.parametrize("name", list(QUANTIZERS))
def test_compiled_training_matches_eager(name):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    eager = QUANTIZERS[name]()
    compiled_module = copy.deepcopy(eager)
    compiled = torch.compile(compiled_module, backend="aot_eager")
    for step in range(3):
        x = torch.randn(4, 32, 16) * (1 + step)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        outs = []
        for module, inp in ((eager, xa), (compiled, xb)):
            out = module(inp)
            (out.quantized.square().mean() + out.loss.sum()).backward()
            outs.append(out)
        assert torch.equal(outs[0].indices, outs[1].indices), f"step {step}"
        torch.testing.assert_close(outs[1].quantized, outs[0].quantized)
        torch.testing.assert_close(xb.grad, xa.grad)
    # EMA sums may differ in the last bit (fused vs unfused float ops), nothing more
    for (key, a), b in zip(eager.state_dict().items(), compiled_module.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5, msg=key)
    for (key, a), b in zip(eager.named_parameters(), compiled_module.parameters()):
        torch.testing.assert_close(b.grad, a.grad, msg=key)
    assert counters["stats"]["unique_graphs"] >= 1  # Dynamo really captured graphs
