"""Data-free, calibration-aware and scalar compression: quality ordering, sequential calibration,
filters, dtypes, reproducibility and every bad input the issue lists."""

import copy
import math

import pytest
import torch
from torch import nn

from vqlib.compress import ScalarLinear, VQConfig, VQLinear, algorithms, compress
from vqlib.compress.calibrated import gptq_vq, output_error
from vqlib.compress.calibration import collect_statistics, execution_order
from vqlib.compress.data_free import quantize_data_free
from vqlib.compress.format import decode_weight

SMALL = dict(vector_dim=4, codebook_bits=5, kmeans_iters=10, finetune_steps=10)


class Block(nn.Module):
    """Attention-like block: q/k/v read the same tensor, then an MLP."""

    def __init__(self, dim=32, hidden=64):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        att = torch.softmax(self.q(x) @ self.k(x).transpose(-1, -2) / 8, -1) @ self.v(x)
        x = x + self.out(att)
        return x + self.fc2(torch.relu(self.fc1(x)))


def make_block(seed=0):
    torch.manual_seed(seed)
    return Block()


def correlated_batches(dim=32, n=4, tokens=64, seed=1):
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(dim, dim, generator=gen) * torch.linspace(0.1, 3, dim)
    return [(torch.randn(2, tokens // 2, dim, generator=gen) @ mix,) for _ in range(n)]


def rel_err(a, b):
    return float((a - b).norm() / b.norm())


def test_data_free_error_drops_with_codebook_bits_and_additive_codebooks():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(96, 128, generator=gen)
    errors = {}
    for name, fields in {
        "1x4": dict(codebook_bits=4),
        "1x6": dict(codebook_bits=6),
        "2x6": dict(codebook_bits=6, num_codebooks=2),
    }.items():
        cfg = VQConfig(algorithm="data_free", vector_dim=4, kmeans_iters=15, **fields)
        p = quantize_data_free(w, cfg, seed=0)
        q = decode_weight(p.codes, p.codebooks, p.scales, vector_dim=4, group_size=None, scale_group_size=None)
        errors[name] = rel_err(q, w)
    assert errors["1x4"] > errors["1x6"] > errors["2x6"]
    assert errors["2x6"] < 0.6 * errors["1x6"]


def test_gptq_vq_without_correlation_reduces_to_nearest_assignment():
    # With H = I the inverse-Hessian factor is diagonal: no error feedback, and the
    # Hessian weights are constant, so the codes must equal data-free VQ's.
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(64, 64, generator=gen)
    cfg = VQConfig(vector_dim=4, codebook_bits=5, kmeans_iters=10, finetune_steps=0)
    calibrated = gptq_vq(w, torch.eye(64), cfg, seed=3)
    data_free = quantize_data_free(w, cfg, seed=3)
    assert torch.equal(calibrated.codebooks, data_free.codebooks)
    assert torch.equal(calibrated.codes, data_free.codes)


def _layer_output_error(parts, w, h, cfg):
    q = decode_weight(
        parts.codes,
        parts.codebooks,
        parts.scales,
        vector_dim=cfg.vector_dim,
        group_size=cfg.group_size,
        scale_group_size=None,
    )[:, : w.shape[1]]
    return output_error(q, w, h) / output_error(torch.zeros_like(w), w, h)


def test_error_feedback_and_finetune_lower_the_output_error():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(64, 96, generator=gen)
    x = torch.randn(512, 96, generator=gen) @ (torch.randn(96, 96, generator=gen) * torch.linspace(0.1, 2, 96))
    h = x.T @ x / 512
    base = VQConfig(vector_dim=4, codebook_bits=5, kmeans_iters=10, finetune_steps=0)
    data_free = _layer_output_error(quantize_data_free(w, base, 0), w, h, base)
    gptq = _layer_output_error(gptq_vq(w, h, base, 0), w, h, base)
    tuned_cfg = VQConfig(**{**base.to_dict(), "finetune_steps": 20})
    tuned = _layer_output_error(gptq_vq(w, h, tuned_cfg, 0), w, h, tuned_cfg)
    assert gptq < 0.85 * data_free
    assert tuned < 0.97 * gptq


@pytest.mark.parametrize("warm_iters", [0, 3])
def test_later_codebook_groups_warm_start_from_the_previous_group(monkeypatch, warm_iters):
    from vqlib.compress import codebooks

    calls = []

    def recording_kmeans(x, k, *, num_iters, init=None, **kwargs):
        calls.append((num_iters, init is not None))
        return real_kmeans(x, k, num_iters=num_iters, init=init, **kwargs)

    real_kmeans = codebooks.kmeans
    monkeypatch.setattr(codebooks, "kmeans", recording_kmeans)
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(64, 96, generator=gen)
    cfg = VQConfig(vector_dim=4, codebook_bits=5, group_size=32, kmeans_iters=10, kmeans_warm_iters=warm_iters)
    gptq_vq(w, torch.eye(96), cfg, 0)
    expected = [(10, False)] + [(3, True)] * 2 if warm_iters else [(10, False)] * 3
    assert calls == expected


def test_act_order_visits_salient_groups_first_and_keeps_the_format():
    # Input energy rises along the columns, with outliers in the last group: in storage order the
    # salient columns are quantized last, when no columns are left to absorb their error.
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(64, 96, generator=gen)
    energy = torch.linspace(0.1, 1, 96)
    energy[80:] *= 20
    x = torch.randn(1024, 96, generator=gen) @ (torch.randn(96, 96, generator=gen) * 0.3 + torch.eye(96)) * energy
    h = x.T @ x / 1024
    base = VQConfig(vector_dim=4, codebook_bits=5, group_size=32, kmeans_iters=10, finetune_steps=0)
    ordered = VQConfig(**{**base.to_dict(), "act_order": True})
    plain_err = _layer_output_error(gptq_vq(w, h, base, 0), w, h, base)
    act_err = _layer_output_error(gptq_vq(w, h, ordered, 0), w, h, ordered)
    assert act_err < 0.9 * plain_err
    # Equal energies: act-order is the storage order, so the result is bit-identical.
    flat = torch.eye(96)
    a, b = gptq_vq(w, flat, base, 0), gptq_vq(w, flat, ordered, 0)
    assert torch.equal(a.codes, b.codes) and torch.equal(a.codebooks, b.codebooks)


@pytest.mark.parametrize(
    "fields",
    [
        dict(group_size=16),
        dict(scale_granularity="group", scale_group_size=16),
        dict(codebook_dtype="int8", num_codebooks=2),
        dict(scale_granularity="none"),
    ],
)
def test_calibrated_format_variants_beat_data_free(fields):
    cfg = VQConfig(algorithm="calibrated", **{**SMALL, **fields})
    batches = correlated_batches()
    errs = {}
    for algorithm in ("data_free", "calibrated"):
        model, report = compress(
            make_block(), VQConfig(**{**cfg.to_dict(), "algorithm": algorithm}), calibration=batches
        )
        errs[algorithm] = sum(r.relative_error for r in report.compressed)
        assert all(r.error_kind == "output" for r in report.compressed)
    assert errs["calibrated"] < errs["data_free"]


@pytest.mark.parametrize("original_target", [True, False])
def test_layers_are_calibrated_on_already_compressed_inputs(original_target):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32))
    batches = [torch.randn(64, 32) for _ in range(3)]
    original_hidden = torch.cat([torch.relu(model[0](b)) for b in batches]).detach()
    weight2 = model[2].weight.detach().clone()
    cfg = VQConfig(**SMALL, original_output_target=original_target)
    model, report = compress(model, cfg, calibration=batches)
    assert [r.name for r in report.layers] == ["0", "2"]
    with torch.no_grad():
        hidden = torch.cat([torch.relu(model[0](b)) for b in batches])
        q2 = model[2].dequantize_weight()
    # The second layer saw the compressed first layer's outputs; its error is measured against
    # the original model's output (kind "output") or its own output on the same inputs ("layer").
    reference = original_hidden if original_target else hidden
    expected = float((hidden @ q2.T - reference @ weight2.T).norm() / (reference @ weight2.T).norm())
    assert report.layers[1].error_kind == ("output" if original_target else "layer")
    reported = report.layers[1].relative_error
    assert math.isclose(reported, expected, rel_tol=1e-4)
    other = hidden if original_target else original_hidden
    alternatives = [
        float((hidden @ q2.T - other @ weight2.T).norm() / (other @ weight2.T).norm()),
        float((original_hidden @ (q2 - weight2).T).norm() / (original_hidden @ weight2.T).norm()),
    ]
    assert not any(math.isclose(reported, a, rel_tol=1e-3) for a in alternatives)


def test_original_output_target_compensates_upstream_error():
    def deep(seed=0):
        torch.manual_seed(seed)
        layers = []
        for _ in range(5):
            layers += [nn.Linear(32, 32), nn.Tanh()]
        return nn.Sequential(*layers)

    gen = torch.Generator().manual_seed(3)
    mix = torch.randn(32, 32, generator=gen)
    batches = [torch.randn(128, 32, generator=gen) @ mix for _ in range(4)]
    held_out = torch.randn(512, 32, generator=gen) @ mix
    reference = deep()(held_out).detach()
    errors = {}
    for flag in (True, False):
        cfg = VQConfig(**{**SMALL, "codebook_bits": 4}, original_output_target=flag)
        model, _ = compress(deep(), cfg, calibration=batches)
        errors[flag] = rel_err(model(held_out).detach(), reference)
    assert errors[True] < 0.9 * errors[False]


def test_layers_sharing_an_input_form_one_group():
    model = make_block()
    layers = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    groups, calls = execution_order(model, layers, correlated_batches()[0])
    assert groups == [["q", "k", "v"], ["out"], ["fc1"], ["fc2"]]
    assert all(c == 1 for c in calls.values())


def test_padded_tokens_are_left_out_of_the_hessian():
    lin = nn.Linear(4, 2)
    model = nn.Sequential(lin)

    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, x, attention_mask):
            return self.inner(x)

    x = torch.randn(2, 3, 4)
    x[1, 2] = 1e4  # a padding token with a garbage activation
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    stats = collect_statistics(Wrapper(), {"inner.0": lin}, [{"x": x, "attention_mask": mask}], {"inner.0": 1})
    h = stats["inner.0"].hessian
    real = x[mask.bool()]
    assert torch.allclose(h, real.T @ real / 5)


def test_scalar_rtn_and_vq_reported_in_the_same_table():
    batches = correlated_batches()
    _, report = compress(
        make_block(), VQConfig(algorithm="scalar_rtn", scalar_bits=3, scalar_group_size=16), calibration=batches
    )
    assert {r.method for r in report.compressed} == {"scalar_rtn"}
    assert all(math.isclose(r.bits_per_weight, 3 + 24 / 16) for r in report.compressed)
    text = report.table()
    assert "fc2" in text and "bits/w" in text and "rel. error" in text and "whole model" in text


def test_compression_is_reproducible_and_seeded():
    batches = correlated_batches()
    states = []
    for seed in (0, 0, 1):
        model, _ = compress(make_block(), VQConfig(**SMALL, seed=seed), calibration=batches)
        states.append(model.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert not torch.equal(states[0]["fc1.codes"], states[2]["fc1.codes"])


def test_filters_skip_names_types_sizes_and_multihead_attention():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 32)
            self.attn = nn.MultiheadAttention(32, 4, batch_first=True)
            self.body = make_block()
            self.lm_head = nn.Linear(32, 10)

        def forward(self, ids):
            x = self.embed(ids)
            x = x + self.attn(x, x, x, need_weights=False)[0]
            return self.lm_head(self.body(x))

    torch.manual_seed(0)
    net = Net()
    ids = torch.randint(0, 10, (2, 16))
    cfg = VQConfig(
        algorithm="data_free",
        **{**SMALL, "finetune_steps": 0},
        skip_modules=["lm_head", "body.q"],
        skip_types=["Nothing"],
        min_weights=1025,
    )
    net, report = compress(net, cfg, calibration=[ids])
    status = {r.name: (r.status, r.reason) for r in report.layers}
    assert status["lm_head"] == ("skipped", "matched by skip_modules")
    assert status["body.q"][0] == "skipped"
    assert status["attn.out_proj"][0] == "skipped" and "MultiheadAttention" in status["attn.out_proj"][1]
    assert status["body.k"][0] == "skipped" and "min_weights" in status["body.k"][1]  # 32*32 = 1024 weights
    assert {n for n, (s, _) in status.items() if s == "compressed"} == {"body.fc1", "body.fc2"}
    assert isinstance(net.body.fc1, VQLinear) and isinstance(net.attn.out_proj, nn.Linear)
    net(ids)  # still runs
    _, report = compress(make_block(), VQConfig(**SMALL, algorithm="data_free", include_modules=["fc*"], skip_types=[]))
    assert {r.name for r in report.compressed} == {"fc1", "fc2"}
    with pytest.raises(ValueError, match="type Linear in skip_types"):
        compress(make_block(), VQConfig(**SMALL, algorithm="data_free", skip_types=["Linear"]))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_models(dtype):
    batches = [(b[0].to(dtype),) for b in correlated_batches()]
    ref_model = make_block()
    x = batches[0][0]
    with torch.no_grad():
        ref = ref_model.to(dtype)(x).float()
    for algorithm in ("calibrated", "scalar_rtn"):
        model = copy.deepcopy(ref_model)
        model, report = compress(model, VQConfig(algorithm=algorithm, **SMALL, scalar_bits=4), calibration=batches)
        assert len(report.compressed) == 6
        with torch.no_grad():
            y = model(x)
        assert y.dtype == dtype
        cos = torch.nn.functional.cosine_similarity(y.float().flatten(1), ref.flatten(1)).mean()
        assert cos > 0.95
        assert model.fc1.bias.dtype == dtype


def test_shared_module_replaced_everywhere_and_linear_model():
    shared = nn.Linear(32, 32)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    model, report = compress(model, VQConfig(algorithm="data_free", **SMALL))
    assert isinstance(model[0], VQLinear) and model[0] is model[2] and len(report.compressed) == 1
    layer, report = compress(nn.Linear(32, 16), VQConfig(algorithm="scalar_rtn"))
    assert isinstance(layer, ScalarLinear) and report.layers[0].name == "<model>"


# ---- bad input --------------------------------------------------------------------------------


def test_no_eligible_layers():
    with pytest.raises(ValueError, match="no eligible nn.Linear layers.*no nn.Linear layers"):
        compress(nn.Sequential(nn.Conv1d(2, 2, 1)), VQConfig(algorithm="data_free"))
    with pytest.raises(ValueError, match="no eligible.*fc1: matched by skip_modules"):
        compress(make_block(), VQConfig(algorithm="data_free", skip_modules=["*"]))


def test_in_features_not_divisible_by_vector_dim():
    def model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(30, 64), nn.ReLU(), nn.Linear(64, 8))

    batches = [torch.randn(64, 30) for _ in range(2)]
    m, report = compress(model(), VQConfig(**SMALL, pad="pad"), calibration=batches)
    assert report.layers[0].status == "compressed" and "padded 30->32" in report.layers[0].reason
    assert m[0].in_padded == 32 and m(batches[0]).shape == (64, 8)
    assert report.layers[0].relative_error < 0.5
    m, report = compress(model(), VQConfig(**SMALL, pad="skip"), calibration=batches)
    assert report.layers[0].status == "skipped" and "not divisible" in report.layers[0].reason
    assert isinstance(m[0], nn.Linear) and isinstance(m[2], VQLinear)
    with pytest.raises(ValueError, match="in_features=30 is not divisible by vector_dim=4"):
        compress(model(), VQConfig(**SMALL, pad="error"), calibration=batches)


def test_non_finite_weights_are_rejected_untouched():
    model = make_block()
    with torch.no_grad():
        model.fc2.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="'fc2' has 1 non-finite"):
        compress(model, VQConfig(algorithm="data_free", **SMALL))
    assert all(isinstance(m, nn.Linear) for m in [model.q, model.fc1, model.fc2])


def test_calibration_batches_that_do_not_fit():
    with pytest.raises(ValueError, match=r"calibration batch 0 \(\(Tensor\(4, 17\)"):
        compress(make_block(), VQConfig(**SMALL), calibration=[(torch.randn(4, 17),)])
    with pytest.raises(ValueError, match="needs calibration batches"):
        compress(make_block(), VQConfig(**SMALL))
    with pytest.raises(ValueError, match="empty iterable"):
        compress(make_block(), VQConfig(**SMALL), calibration=[])
    with pytest.raises(TypeError, match="iterable of batches"):
        compress(make_block(), VQConfig(**SMALL), calibration=3)


def test_more_codebook_entries_than_vectors():
    model = nn.Sequential(nn.Linear(32, 8), nn.ReLU(), nn.Linear(8, 128))
    batches = [torch.randn(16, 32)]
    _, report = compress(copy.deepcopy(model), VQConfig(**{**SMALL, "codebook_bits": 7}), calibration=batches)
    first, second = report.layers
    assert first.status == "skipped" and "only 64 vectors for 128 codebook entries" in first.reason
    assert second.status == "compressed"  # 128 x 2 vectors
    with pytest.raises(ValueError, match="strict=True"):
        compress(copy.deepcopy(model), VQConfig(**{**SMALL, "codebook_bits": 7}, strict=True), calibration=batches)
    with pytest.raises(ValueError, match="no eligible"):
        compress(copy.deepcopy(model), VQConfig(**{**SMALL, "codebook_bits": 12}), calibration=batches)


def test_bad_config_type():
    with pytest.raises(TypeError, match="expected a VQConfig"):
        compress(make_block(), "calibrated")
    with pytest.raises(TypeError, match="torch.nn.Module"):
        compress(lambda x: x, VQConfig())


# ---- registry ---------------------------------------------------------------------------------


def test_unknown_algorithm_lists_the_registered_ones():
    with pytest.raises(ValueError, match=r"algorithm: expected one of \['data_free', 'calibrated', 'scalar_rtn'\]"):
        VQConfig(algorithm="gptq")
    with pytest.raises(ValueError, match=r"unknown compression algorithm 'gptq'; registered: \['data_free'"):
        algorithms.get_algorithm("gptq")
    with pytest.raises(ValueError, match="already registered"):
        algorithms.register_algorithm(algorithms.get_algorithm("data_free"))


def test_a_registered_algorithm_is_used_without_changes_to_compress(monkeypatch):
    monkeypatch.setattr(algorithms, "_REGISTRY", dict(algorithms._REGISTRY))  # registrations end with the test
    seen = []

    def quantize(linear, weight, stats, cfg, seed):
        seen.append((tuple(weight.shape), weight.dtype, stats is not None))
        return algorithms.get_algorithm("scalar_rtn").quantize(linear, weight, stats, cfg, seed)

    def only_square(linear, cfg):
        rows, cols = linear.weight.shape
        return (None if rows == cols else f"not square ({rows}x{cols})"), ""

    algorithms.register_algorithm(
        algorithms.Algorithm("square_rtn", quantize, only_square, needs_calibration=True, vector_format=False)
    )
    with pytest.raises(ValueError, match="algorithm='square_rtn' needs calibration batches"):
        compress(make_block(), VQConfig(algorithm="square_rtn"))
    with pytest.raises(ValueError, match="target_bits_per_weight: needs a VQ algorithm"):
        VQConfig(algorithm="square_rtn", target_bits_per_weight=3.0)
    model, report = compress(
        make_block(), VQConfig(algorithm="square_rtn", scalar_bits=4), calibration=[torch.randn(2, 8, 32)]
    )
    status = {r.name: (r.status, r.reason, r.method) for r in report.layers}
    assert {n for n, s in status.items() if s[0] == "compressed"} == {"q", "k", "v", "out"}
    assert status["fc1"] == ("skipped", "not square (64x32)", "")
    assert seen == [((32, 32), torch.float32, True)] * 4 and report.compressed[0].method == "square_rtn"
    assert isinstance(model.q, ScalarLinear) and isinstance(model.fc1, nn.Linear)
