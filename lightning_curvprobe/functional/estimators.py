r"""Coefficients of the increment's quadratic model and the estimators of :math:`\Delta_2^{(D)}` (SPEC §1).

Everything here works on small tensors (sizes ``m``, ``D``, ``S``), batched over the added samples, and is shared by
:func:`~lightning_curvprobe.functional.probe_stability` and the :class:`~lightning_curvprobe.CurvatureStability`
metric, so that each formula lives in one place.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_curvprobe._checks import _check_positive_float


def _symmetrize(B: Tensor) -> Tensor:
    return 0.5 * (B + B.transpose(-1, -2))


def increment_coefficients(
    base_loss_sum: Tensor,
    base_count: Tensor | float,
    base_grad_sum: Tensor,
    base_hess_sum: Tensor,
    added_loss: Tensor,
    added_grad: Tensor,
    added_hess: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    r"""Coefficients of the model :math:`\delta_j(w_0 + Uz) \approx a_j + c_j^\top z + \tfrac12 z^\top B_j z`.

    From the base set's sums over its ``k`` samples (loss, projected gradient :math:`U^\top g`, projected Hessian
    :math:`U^\top H U`) and each added sample's own values:

    .. math::
        a_j = \frac{\ell_j - L_k}{k+1},\quad c_j = \frac{U^\top (g_j - g_k)}{k+1},\quad
        B_j = \frac{U^\top H_j U - U^\top H_k U}{k+1}\ \text{(symmetrised)}.

    Args:
        base_loss_sum: :math:`k L_k`, scalar.
        base_count: :math:`k`.
        base_grad_sum: :math:`k\, U^\top g_k`, shape ``(D,)``.
        base_hess_sum: :math:`k\, U^\top H_k U`, shape ``(D, D)``.
        added_loss: :math:`\ell_j`, shape ``(m,)``.
        added_grad: :math:`U^\top g_j`, shape ``(m, D)``.
        added_hess: :math:`U^\top H_j U`, shape ``(m, D, D)``.

    Returns:
        ``a`` of shape ``(m,)``, ``c`` of shape ``(m, D)``, ``B`` of shape ``(m, D, D)``.

    Example:
        >>> import torch
        >>> a, c, B = increment_coefficients(torch.tensor(6.0), 3, torch.zeros(1), torch.zeros(1, 1),
        ...                                  torch.tensor([4.0]), torch.ones(1, 1), torch.full((1, 1, 1), 8.0))
        >>> a, c, B
        (tensor([0.5000]), tensor([[0.2500]]), tensor([[[2.]]]))
    """
    k = base_count
    kp1 = k + 1
    a = (added_loss - base_loss_sum / k) / kp1
    c = (added_grad - base_grad_sum / k) / kp1
    B = _symmetrize(added_hess - base_hess_sum / k) / kp1
    return a, c, B


def delta2_gaussian_moment(a: Tensor, c: Tensor, B: Tensor, sigma: float) -> Tensor:
    r"""Exact expectation of the squared quadratic surrogate under :math:`z \sim \mathcal N(0, \sigma^2 I_D)`.

    .. math::
        \mathrm{GM} = a^2 + a\sigma^2 \operatorname{tr}B + \sigma^2\lVert c\rVert^2
        + \frac{\sigma^4}{4}\bigl(2\operatorname{tr}(B^2) + (\operatorname{tr}B)^2\bigr)

    Batched over leading dimensions: ``a`` of shape ``(...)``, ``c`` of ``(..., D)``, ``B`` of ``(..., D, D)``.
    ``B`` is symmetrised first.

    Example:
        >>> import torch
        >>> delta2_gaussian_moment(torch.tensor(0.0), torch.zeros(2), torch.diag(torch.tensor([1.0, 3.0])), 1.0)
        tensor(9.)
    """
    sigma = _check_positive_float("sigma", sigma)
    B = _symmetrize(B)
    s2 = sigma * sigma
    tr = B.diagonal(dim1=-2, dim2=-1).sum(-1)
    tr_sq = (B * B).sum((-2, -1))  # tr(B^2) for symmetric B
    return a * a + a * s2 * tr + s2 * (c * c).sum(-1) + 0.25 * s2 * s2 * (2 * tr_sq + tr * tr)


def _gaussian_draws(num: int, dim: int, sigma: float, generator: torch.Generator, like: Tensor) -> Tensor:
    """``num`` draws of N(0, sigma^2 I_dim) from ``generator`` (on its device), returned on ``like``'s device/dtype."""
    z = torch.randn(num, dim, generator=generator, dtype=torch.float64, device=generator.device)
    return (sigma * z).to(device=like.device, dtype=like.dtype)


def quadratic_surrogate(a: Tensor, c: Tensor, B: Tensor, z: Tensor) -> Tensor:
    r"""Quadratic model :math:`a_j + c_j^\top z_s + \tfrac12 z_s^\top B_j z_s` per added sample and draw, ``(m, S)``."""
    B = _symmetrize(B)
    return a[:, None] + c @ z.T + 0.5 * torch.einsum("sd,mde,se->ms", z, B, z)


def _delta2_from_increments(increments: Tensor) -> Tensor:
    """Per added sample mean of squared increments over draws: ``(m, S) -> (m,)``."""
    return (increments * increments).mean(-1)


def _direct_increments(base_draw_loss_sum: Tensor, base_count: Tensor | float, added_draw_loss: Tensor) -> Tensor:
    r"""True increments :math:`\delta_j(w_s) = (\ell_j(w_s) - L_k(w_s))/(k+1)`, shape ``(m, S)``."""
    return (added_draw_loss - base_draw_loss_sum[None, :] / base_count) / (base_count + 1)


def _quadratic_error(
    base_loss: Tensor, base_grad: Tensor, eigenvalues: Tensor, z: Tensor, base_draw_loss: Tensor
) -> Tensor:
    r"""Relative error of the second-order model of :math:`L_k` along the draws ``z`` (SPEC §1).

    .. math::
        \frac{\operatorname{mean}_s |L_k(w_0+Uz_s) - L_k(w_0) - g^\top z_s - \tfrac12 z_s^\top \Lambda z_s|}
        {\operatorname{mean}_s |L_k(w_0+Uz_s) - L_k(w_0)|}

    with :math:`g = U^\top g_k` and :math:`\Lambda = U^\top H_k U = \operatorname{diag}(\lambda)`. A ratio of means is
    used so that a draw with a vanishing change cannot blow it up.
    """
    change = base_draw_loss - base_loss
    model = z @ base_grad + 0.5 * (z * z) @ eigenvalues
    return _quadratic_error_from_sums(change, model)


def _quadratic_error_from_sums(change: Tensor, model: Tensor) -> Tensor:
    """Ratio of means ``mean|change - model| / mean|change|`` per draw; any common scale (e.g. ``k``) cancels."""
    denom = change.abs().mean()
    return (change - model).abs().mean() / denom if float(denom) > 0 else torch.full_like(denom, float("nan"))


def _mean_and_stderr(values: Tensor) -> tuple[Tensor, Tensor]:
    """Mean over added samples and its standard error (NaN for a single sample)."""
    mean = values.mean()
    if values.numel() < 2:
        return mean, torch.full_like(mean, float("nan"))
    return mean, values.std(unbiased=True) / values.numel() ** 0.5
