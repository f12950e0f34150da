"""Code sweeps: exact coordinate descent on tr((Q - T) H (Q - T)^T) with the codebooks fixed."""

import pytest
import torch

from vqlib.compress import VQConfig
from vqlib.compress.calibrated import _AdditiveDecoder, output_error
from vqlib.compress.code_sweep import sweep_codes


def problem(out=5, inn=12, d=2, m=1, k=4, groups=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, inn, generator=g) + 0.5 * torch.randn(64, 1, generator=g)  # correlated inputs
    h = x.T @ x / 64 + 0.01 * torch.eye(inn)
    target = torch.randn(out, inn, generator=g)
    books = torch.randn(groups, m, k, d, generator=g)
    codes = torch.randint(0, k, (out, inn // d, m), generator=g)
    scale = torch.rand(out, inn // d, generator=g) + 0.5
    cfg = VQConfig(vector_dim=d, num_codebooks=m, codebook_bits=2, group_size=inn // groups, block_size=2 * d)
    return codes, books, scale, target, h, cfg


def decode(codes, books, scale, cfg):
    return _AdditiveDecoder(codes, tuple(books.shape), cfg).decode(books.reshape(-1, books.shape[-1]), scale)


def brute_force_sweep(codes, books, scale, target, h, cfg):
    """Try every entry for every (vector, codebook) in order, scoring the full objective row by row."""
    codes = codes.clone()
    out, n_vec, m = codes.shape
    for j in range(n_vec):
        for i in range(m):
            for r in range(out):
                best, best_cost = int(codes[r, j, i]), None
                for c in range(books.shape[2]):
                    codes[r, j, i] = c
                    e = decode(codes, books, scale, cfg)[r] - target[r]
                    cost = float(e @ h @ e)
                    if best_cost is None or cost < best_cost - 1e-9:
                        best, best_cost = c, cost
                codes[r, j, i] = best
    return codes


@pytest.mark.parametrize("m", [1, 2])
def test_sweep_equals_brute_force_coordinate_descent(m):
    codes, books, scale, target, h, cfg = problem(m=m)
    residual = decode(codes, books, scale, cfg) - target
    swept = sweep_codes(codes, books, scale, residual, h, cfg)
    assert torch.equal(swept, brute_force_sweep(codes, books, scale, target, h, cfg))


@pytest.mark.parametrize("m", [1, 2])
def test_sweeps_never_raise_the_objective_and_converge(m):
    codes, books, scale, target, h, cfg = problem(out=16, inn=32, d=4, m=m, k=8, seed=1)
    errors = [output_error(decode(codes, books, scale, cfg), target, h)]
    for _ in range(6):
        residual = decode(codes, books, scale, cfg) - target
        codes = sweep_codes(codes, books, scale, residual, h, cfg)
        errors.append(output_error(decode(codes, books, scale, cfg), target, h))
    assert errors[1] < 0.9 * errors[0]
    assert all(b <= a * (1 + 1e-6) for a, b in zip(errors, errors[1:]))
    # At a fixed point a further sweep changes nothing.
    residual = decode(codes, books, scale, cfg) - target
    again = sweep_codes(codes, books, scale, residual, h, cfg)
    assert torch.equal(again, codes) or output_error(decode(again, books, scale, cfg), target, h) < errors[-1]


def test_without_scales_is_unit_scales():
    codes, books, scale, target, h, cfg = problem(seed=2)
    ones = torch.ones_like(scale)
    residual = decode(codes, books, ones, cfg) - target
    assert torch.equal(
        sweep_codes(codes, books, None, residual, h, cfg), sweep_codes(codes, books, ones, residual, h, cfg)
    )


def test_calibrated_vq_with_code_sweeps_fits_the_layer_better():
    from vqlib.compress.calibrated import _target_and_hessian, gptq_vq
    from vqlib.compress.codebooks import column_scales

    g = torch.Generator().manual_seed(3)
    x = torch.randn(1024, 64, generator=g) @ torch.randn(64, 64, generator=g) * 0.3 + torch.randn(1024, 64, generator=g)
    h0, w = x.T @ x / 1024, torch.randn(48, 64, generator=g)

    def error(sweeps):
        cfg = VQConfig(vector_dim=4, codebook_bits=5, group_size=32, kmeans_iters=4, code_sweeps=sweeps)
        parts = gptq_vq(w, h0, cfg, seed=0)
        target, h = _target_and_hessian(w, h0, cfg, None)
        scale = column_scales(parts.scales, 64, cfg.scale_group_size)[:, ::4]
        return output_error(decode(parts.codes, parts.codebooks.float(), scale, cfg), target, h)

    assert error(1) < 0.97 * error(0)
    with pytest.raises(ValueError, match="code_sweeps"):
        VQConfig(code_sweeps=-1)
