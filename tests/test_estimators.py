"""Estimators of Δ₂^(D): the Gaussian-moment closed form against Monte Carlo and an independent moment formula."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import DT, gen

from lightning_curvprobe.functional import delta2_gaussian_moment, increment_coefficients, quadratic_surrogate
from lightning_curvprobe.functional.estimators import (
    _delta2_from_increments,
    _direct_increments,
    _gaussian_draws,
    _mean_and_stderr,
    _quadratic_error,
)


def random_coefficients(m: int, D: int, seed: int, *, a_scale: float = 1.0):
    """(a, c, B) with B symmetric and indefinite, batched over m added samples."""
    g = gen(seed)
    a = a_scale * torch.randn(m, generator=g, dtype=DT)
    c = torch.randn(m, D, generator=g, dtype=DT)
    M = torch.randn(m, D, D, generator=g, dtype=DT)
    return a, c, 0.5 * (M + M.transpose(-1, -2))


def gm_by_eigenbasis(a: float, c: torch.Tensor, B: torch.Tensor, sigma: float) -> float:
    """E[(a + c'ᵀy + ½ Σ μ_i y_i²)²] for y = Qᵀz ~ N(0, σ² I) in B's eigenbasis, term by term from Gaussian moments.

    Independent coordinates: E y_i = E y_i³ = 0, E y_i² = σ², E y_i⁴ = 3σ⁴, so E[y_i² y_j²] = σ⁴ (1 + 2·[i = j]),
    and every odd cross moment vanishes.
    """
    mu, Q = torch.linalg.eigh(B)
    cp = Q.T @ c
    D = mu.numel()
    s2 = sigma**2
    fourth = s2 * s2 * (torch.ones(D, D, dtype=DT) + 2 * torch.eye(D, dtype=DT))  # E[y_i² y_j²]
    e_lin_sq = float((cp * cp).sum()) * s2  # E[(c'ᵀy)²]
    e_quad = 0.5 * float(mu.sum()) * s2  # E[½ Σ μ y²]
    e_quad_sq = 0.25 * float(mu @ fourth @ mu)  # E[(½ Σ μ y²)²]
    # (a + L + Q)² = a² + L² + Q² + 2aL + 2aQ + 2LQ; E L = 0 and E[L Q] = 0 (odd moments)
    return a * a + e_lin_sq + e_quad_sq + 2 * a * e_quad


def quadratic_mc(a, c, B, sigma: float, num: int, seed: int, chunk: int = 200_000):
    """Mean and standard error of the squared surrogate over ``num`` draws (chunked to keep memory small)."""
    g = gen(seed)
    total = torch.zeros(a.shape[0], dtype=DT)
    total_sq = torch.zeros(a.shape[0], dtype=DT)
    done = 0
    while done < num:
        s = min(chunk, num - done)
        z = sigma * torch.randn(s, c.shape[-1], generator=g, dtype=DT)
        q2 = quadratic_surrogate(a, c, B, z) ** 2
        total += q2.sum(-1)
        total_sq += (q2 * q2).sum(-1)
        done += s
    mean = total / num
    var = (total_sq / num - mean * mean) * num / (num - 1)
    return mean, (var / num).sqrt()


@pytest.mark.parametrize(("D", "sigma"), [(1, 0.7), (3, 0.5), (6, 0.3)])
def test_gaussian_moment_equals_mc_expectation(D, sigma):
    """10⁶ draws: |MC − GM| ≤ 4 SE, SE estimated from the draws (the MC mean is asymptotically normal: a 4 SE miss
    has probability 6e-5 per comparison, and the seeds are fixed)."""
    a, c, B = random_coefficients(3, D, seed=D)
    gm = delta2_gaussian_moment(a, c, B, sigma)
    mean, se = quadratic_mc(a, c, B, sigma, 1_000_000, seed=100 + D)
    assert gm.shape == (3,)
    assert torch.all((mean - gm).abs() <= 4 * se), (mean, gm, se)
    assert torch.all(se < 0.01 * gm)  # the test has power: the SE is well below the value


@pytest.mark.parametrize("D", [1, 2, 5, 10])
def test_gaussian_moment_equals_eigenbasis_formula(D):
    a, c, B = random_coefficients(4, D, seed=10 + D)
    for sigma in (1e-3, 0.1, 2.0):
        gm = delta2_gaussian_moment(a, c, B, sigma)
        for j in range(4):
            ref = gm_by_eigenbasis(float(a[j]), c[j], B[j], sigma)
            assert math.isclose(float(gm[j]), ref, rel_tol=1e-12), (sigma, j, float(gm[j]), ref)


def test_gaussian_moment_unbatched_and_asymmetric_B():
    a, c, B = random_coefficients(1, 4, seed=3)
    a, c, B = a[0], c[0], B[0]
    gm = delta2_gaussian_moment(a, c, B, 0.4)
    assert gm.shape == ()
    # an asymmetric B defines the same quadratic form as its symmetric part
    K = torch.randn(4, 4, generator=gen(4), dtype=DT)
    skew = K - K.T
    torch.testing.assert_close(delta2_gaussian_moment(a, c, B + skew, 0.4), gm, rtol=1e-14, atol=0)
    assert math.isclose(float(gm), gm_by_eigenbasis(float(a), c, B, 0.4), rel_tol=1e-12)


def test_spectral_special_case():
    """a = 0, c = 0, B = diag(δλ): GM = (σ⁴/4)(2 Σ δλ² + (Σ δλ)²) exactly."""
    dl = torch.tensor([0.5, -1.25, 2.0, 0.125], dtype=DT)
    for sigma in (0.5, 1.0, 3.0):  # powers of two: every operation is exact in binary floating point
        gm = delta2_gaussian_moment(torch.tensor(0.0, dtype=DT), torch.zeros(4, dtype=DT), torch.diag(dl), sigma)
        expected = sigma**4 / 4 * (2 * float((dl * dl).sum()) + float(dl.sum()) ** 2)
        assert float(gm) == expected
    # B = diag(1, 3), σ = 1: tr B = 4, tr B² = 10 → (2·10 + 16)/4 = 9 (= ¼ E[(z1² + 3 z2²)²] = ¼ (3 + 6 + 27))
    assert (
        float(delta2_gaussian_moment(torch.tensor(0.0), torch.zeros(2), torch.diag(torch.tensor([1.0, 3.0])), 1.0))
        == (2 * 10 + 16) / 4
    )


def test_each_term_of_the_closed_form():
    """a, c, B one at a time give a², σ²‖c‖², (σ⁴/4)(2 tr B² + tr² B); together add the cross term a σ² tr B."""
    s = 0.5
    z1, z2 = torch.tensor(0.0, dtype=DT), torch.zeros(2, dtype=DT)
    B = torch.tensor([[1.0, 0.5], [0.5, -2.0]], dtype=DT)
    c = torch.tensor([3.0, -4.0], dtype=DT)
    a = torch.tensor(0.75, dtype=DT)
    zero_B = torch.zeros(2, 2, dtype=DT)
    assert float(delta2_gaussian_moment(a, z2, zero_B, s)) == 0.75**2
    assert float(delta2_gaussian_moment(z1, c, zero_B, s)) == s**2 * 25
    trB, trB2 = -1.0, 1.0 + 4.0 + 2 * 0.25
    assert math.isclose(float(delta2_gaussian_moment(z1, z2, B, s)), s**4 / 4 * (2 * trB2 + trB**2), rel_tol=1e-15)
    full = float(delta2_gaussian_moment(a, c, B, s))
    expected = 0.75**2 + 0.75 * s**2 * trB + s**2 * 25 + s**4 / 4 * (2 * trB2 + trB**2)
    assert math.isclose(full, expected, rel_tol=1e-15)


def test_quadratic_mc_error_shrinks_like_inverse_sqrt_S():
    """RMS error of the S-draw quadratic MC over R independent repetitions is sd(q²)/√S.

    With R = 400 repetitions, the relative standard deviation of an RMS estimate is about √((κ−1)/(4R)) where κ is the
    kurtosis of the MC error (3 for a normal error, κ ≈ 3 + excess(q²)/S in general): ≈ 0.035 at S = 10⁴ and < 0.06 at
    S = 100 here. A band of ±25 % around sd/√S is > 4 such standard deviations; the ratio of the two RMS errors
    (ideally √(10⁴/100) = 10) gets the band [10/1.4, 10·1.4].
    """
    a, c, B = random_coefficients(1, 3, seed=21)
    sigma = 0.5
    gm = delta2_gaussian_moment(a, c, B, sigma)[0]
    # sd of q² from a large independent sample
    g = gen(22)
    z = sigma * torch.randn(400_000, 3, generator=g, dtype=DT)
    sd = float((quadratic_surrogate(a, c, B, z)[0] ** 2).std())
    R = 400
    rms = {}
    for S in (100, 10_000):
        g = gen(23 + S)
        errs = torch.empty(R, dtype=DT)
        per_chunk = max(1, 400_000 // S)
        for r0 in range(0, R, per_chunk):
            r1 = min(R, r0 + per_chunk)
            z = sigma * torch.randn((r1 - r0) * S, 3, generator=g, dtype=DT)
            q2 = (quadratic_surrogate(a, c, B, z)[0] ** 2).reshape(r1 - r0, S)
            errs[r0:r1] = q2.mean(-1) - gm
        rms[S] = float(errs.pow(2).mean().sqrt())
        assert 0.75 <= rms[S] / (sd / math.sqrt(S)) <= 1.25, (S, rms[S], sd / math.sqrt(S))
    assert 10 / 1.4 <= rms[100] / rms[10_000] <= 10 * 1.4


def test_quadratic_surrogate_shapes_and_values():
    a, c, B = random_coefficients(2, 3, seed=30)
    z = torch.randn(5, 3, generator=gen(31), dtype=DT)
    q = quadratic_surrogate(a, c, B, z)
    assert q.shape == (2, 5)
    for j in range(2):
        for s in range(5):
            ref = a[j] + c[j] @ z[s] + 0.5 * z[s] @ B[j] @ z[s]
            torch.testing.assert_close(q[j, s], ref, rtol=1e-14, atol=1e-15)
    torch.testing.assert_close(_delta2_from_increments(q), (q * q).mean(-1), rtol=0, atol=0)


def test_increment_coefficients_hand_made():
    """k = 3, L_k = 2, g_k = (1, −2), H_k = diag(1, 3); two added samples."""
    a, c, B = increment_coefficients(
        torch.tensor(6.0, dtype=DT),  # k L_k
        3,
        torch.tensor([3.0, -6.0], dtype=DT),  # k Uᵀg_k
        torch.tensor([[3.0, 0.0], [0.0, 9.0]], dtype=DT),  # k UᵀH_kU
        torch.tensor([4.0, 1.0], dtype=DT),  # ℓ_j
        torch.tensor([[2.0, 0.0], [1.0, -2.0]], dtype=DT),  # Uᵀg_j
        torch.tensor([[[2.0, 1.0], [3.0, 5.0]], [[1.0, 0.0], [0.0, 3.0]]], dtype=DT),  # UᵀH_jU (first asymmetric)
    )
    # a = (ℓ_j − L_k)/(k+1); c = Uᵀ(g_j − g_k)/(k+1); B = sym(UᵀH_jU − UᵀH_kU)/(k+1)
    torch.testing.assert_close(a, torch.tensor([0.5, -0.25], dtype=DT), rtol=0, atol=0)
    torch.testing.assert_close(c, torch.tensor([[0.25, 0.5], [0.0, 0.0]], dtype=DT), rtol=0, atol=0)
    expected_B = torch.tensor([[[0.25, 0.5], [0.5, 0.5]], [[0.0, 0.0], [0.0, 0.0]]], dtype=DT)
    torch.testing.assert_close(B, expected_B, rtol=0, atol=0)
    assert a.dtype == c.dtype == B.dtype == DT


def test_increment_coefficients_tensor_count():
    """The base count may be a tensor (as in the metric's summed states): k = 4, L_k = 2.5."""
    a, c, B = increment_coefficients(
        torch.tensor(10.0, dtype=DT),
        torch.tensor(4.0, dtype=DT),
        torch.zeros(1, dtype=DT),
        torch.zeros(1, 1, dtype=DT),
        torch.tensor([7.5], dtype=DT),
        torch.tensor([[5.0]], dtype=DT),
        torch.tensor([[[10.0]]], dtype=DT),
    )
    assert float(a[0]) == 1.0 and float(c[0, 0]) == 1.0 and float(B[0, 0, 0]) == 2.0


def test_direct_increments_formula():
    base = torch.tensor([6.0, 9.0], dtype=DT)  # k L_k(w_s) for k = 3
    added = torch.tensor([[4.0, 3.0], [2.0, 7.0]], dtype=DT)
    inc = _direct_increments(base, torch.tensor(3.0, dtype=DT), added)
    torch.testing.assert_close(inc, torch.tensor([[0.5, 0.0], [0.0, 1.0]], dtype=DT), rtol=0, atol=0)


def test_gaussian_draws_use_only_the_generator():
    state = torch.get_rng_state()
    like = torch.zeros(1, dtype=DT)
    z1 = _gaussian_draws(1000, 3, 0.5, gen(1), like)
    z2 = _gaussian_draws(1000, 3, 0.5, gen(1), like)
    assert torch.equal(z1, z2) and z1.shape == (1000, 3) and z1.dtype == DT
    assert torch.equal(torch.get_rng_state(), state)
    # N(0, σ²): sample sd within 5 SE of σ (SE of the sd ≈ σ/√(2n) = 0.0065 for n = 3000)
    assert abs(float(z1.std()) - 0.5) < 5 * 0.5 / math.sqrt(2 * 3000)
    assert _gaussian_draws(4, 2, 1.0, gen(1), torch.zeros(1)).dtype == torch.float32


def test_mean_and_stderr():
    v = torch.tensor([1.0, 2.0, 3.0, 6.0], dtype=DT)
    mean, se = _mean_and_stderr(v)
    assert float(mean) == 3.0
    assert math.isclose(float(se), math.sqrt(((4 + 1 + 0 + 9) / 3) / 4), rel_tol=1e-15)
    mean1, se1 = _mean_and_stderr(torch.tensor([2.0], dtype=DT))
    assert float(mean1) == 2.0 and math.isnan(float(se1))


def test_quadratic_error_zero_on_exact_quadratic():
    """For L(w0 + z) = L0 + gᵀz + ½ zᵀΛz exactly, the relative error of the second-order model is 0."""
    lam = torch.tensor([2.0, 0.5], dtype=DT)
    g = torch.tensor([0.3, -0.1], dtype=DT)
    z = torch.randn(8, 2, generator=gen(2), dtype=DT)
    draw = 1.5 + z @ g + 0.5 * (z * z) @ lam
    assert float(_quadratic_error(torch.tensor(1.5, dtype=DT), g, lam, z, draw)) < 1e-14
    cubic = draw + (z**3).sum(-1)
    assert float(_quadratic_error(torch.tensor(1.5, dtype=DT), g, lam, z, cubic)) > 0.1


@pytest.mark.parametrize("sigma", [0.0, -1.0, float("inf"), float("nan")])
def test_gaussian_moment_rejects_bad_sigma(sigma):
    a, c, B = random_coefficients(1, 2, seed=0)
    with pytest.raises(ValueError, match="`sigma` must be a positive finite float"):
        delta2_gaussian_moment(a, c, B, sigma)


def test_gaussian_moment_rejects_non_number_sigma():
    a, c, B = random_coefficients(1, 2, seed=0)
    with pytest.raises(TypeError, match="`sigma` must be a positive finite float, got '1'"):
        delta2_gaussian_moment(a, c, B, "1")
