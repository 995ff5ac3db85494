"""OBProx-SG (core.prune.obproxsg): the worked step of method.md §3.1, lasso against scikit-learn, the
phase schedule, and resuming from a state_dict."""

import copy
import io
import math
import warnings

import numpy as np
import pytest
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import Lasso

from core.prune import OBProxSG, default_prox_epochs, l1_norm

# method.md §3.1 worked step
THETA = [0.5, -0.3, 2e-4, 0.0, 1e-3, -5e-4]
GRAD = [0.1, -0.2, 0.0, 0.3, 0.02, -0.001]
PROX_EXPECTED = [0.489, -0.279, 0.0, -0.029, 0.0, 0.0]
ORTHANT_EXPECTED = [0.489, -0.279, 0.0, 0.0, 0.0, 0.0]


def test_worked_step_each_phase_on_the_same_theta() -> None:
    theta = torch.nn.Parameter(torch.tensor(THETA, dtype=torch.float64))
    opt = OBProxSG([theta], lr=0.1, lambda_=0.01, epoch_size=1, n_prox_epochs=1, eps=1e-4)
    expected_by_phase = {"prox": PROX_EXPECTED, "orthant": ORTHANT_EXPECTED}
    for phase in ("prox", "orthant"):
        assert opt.phase == phase
        with torch.no_grad():
            theta.copy_(torch.tensor(THETA, dtype=torch.float64))
        theta.grad = torch.tensor(GRAD, dtype=torch.float64)
        opt.step()
        print(phase, theta.tolist())
        torch.testing.assert_close(
            theta.detach(), torch.tensor(expected_by_phase[phase], dtype=torch.float64), atol=1e-12, rtol=0
        )
    assert opt.epoch == 2 and opt.step_in_epoch == 0


def lasso_problem(seed: int, n: int = 200, p: int = 30) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Random design, a sparse truth plus noise; returns X, y and the step 1/L (L = λ_max(XᵀX/n))."""
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(n, p, generator=gen, dtype=torch.float64)
    w_true = torch.zeros(p, dtype=torch.float64)
    w_true[:8] = torch.tensor([3.0, -2.0, 1.5, -1.0, 0.8, -0.6, 0.5, 0.4], dtype=torch.float64)
    y = X @ w_true + 0.3 * torch.randn(n, generator=gen, dtype=torch.float64)
    lipschitz = float(torch.linalg.eigvalsh(X.T @ X / n).max())
    return X, y, 1.0 / lipschitz


def lasso_objective(X: torch.Tensor, y: torch.Tensor, w: torch.Tensor, lam: float) -> float:
    """scikit-learn's Lasso objective: (1/2n)‖Xw − y‖² + λ‖w‖₁."""
    return float(((X @ w - y) ** 2).sum() / (2 * X.shape[0]) + lam * w.abs().sum())


def sklearn_lasso(X: torch.Tensor, y: torch.Tensor, lam: float) -> np.ndarray:
    model = Lasso(alpha=lam, fit_intercept=False, tol=1e-14, max_iter=1_000_000)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(X.numpy(), y.numpy())
    return model.coef_


def smooth_loss(X: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return ((X @ w - y) ** 2).sum() / (2 * X.shape[0])


@pytest.mark.parametrize(("seed", "lam"), [(0, 0.05), (1, 0.6), (2, 0.2), (3, 0.45), (4, 0.8)])
def test_lasso_matches_sklearn_and_orthant_phase_never_revives(seed: int, lam: float) -> None:
    X, y, lr = lasso_problem(seed)
    reference = sklearn_lasso(X, y, lam)
    support = reference != 0
    assert 0 < support.sum() < X.shape[1]
    assert np.abs(reference[support]).min() > 1e-3  # so eps = 1e-4 cannot cut a true coefficient
    reference_objective = lasso_objective(X, y, torch.from_numpy(reference), lam)

    w = torch.nn.Parameter(torch.zeros(X.shape[1], dtype=torch.float64))
    opt = OBProxSG([w], lr=lr, lambda_=lam, epoch_size=5, n_prox_epochs=40)  # 200 Prox-SG steps
    orthant_steps = 0
    for _ in range(1500):
        opt.zero_grad()
        smooth_loss(X, y, w).backward()
        phase = opt.phase
        before = w.detach().clone()
        opt.step()
        if phase == "orthant":
            orthant_steps += 1
            after = w.detach()
            assert torch.all(after[before == 0] == 0), "the orthant phase revived a zero"
            assert torch.all(after * before >= 0), "the orthant phase flipped a sign"
    assert orthant_steps == 1300

    found = w.detach()
    objective = lasso_objective(X, y, found, lam)
    print(
        f"seed {seed} λ {lam}: support {int(support.sum())}/{X.shape[1]}, objective {objective:.12f} "
        f"vs sklearn {reference_objective:.12f}"
    )
    np.testing.assert_array_equal(found.numpy() != 0, support)
    assert abs(objective - reference_objective) <= 1e-6 * abs(reference_objective)
    np.testing.assert_allclose(found.numpy(), reference, atol=1e-6)


def test_code_compat_is_prox_sg_throughout_and_also_solves_lasso() -> None:
    X, y, lr = lasso_problem(3)
    lam = 0.1
    reference = sklearn_lasso(X, y, lam)
    w = torch.nn.Parameter(torch.zeros(X.shape[1], dtype=torch.float64))
    opt = OBProxSG([w], lr=lr, lambda_=lam, epoch_size=1, n_prox_epochs=1, schedule="code-compat")
    for _ in range(1500):
        assert opt.phase == "prox"
        opt.zero_grad()
        smooth_loss(X, y, w).backward()
        opt.step()
    np.testing.assert_array_equal(w.detach().numpy() != 0, reference != 0)
    reference_objective = lasso_objective(X, y, torch.from_numpy(reference), lam)
    assert abs(lasso_objective(X, y, w.detach(), lam) - reference_objective) <= 1e-6 * reference_objective


def phases(opt: OBProxSG, steps: int) -> str:
    """The phase of each of the next `steps` steps, one letter each (p/o); params have no grads."""
    letters = []
    for _ in range(steps):
        letters.append(opt.phase[0])
        opt.step()
    return "".join(letters)


def test_schedule_counts_steps_per_epoch() -> None:
    param = torch.nn.Parameter(torch.ones(3))
    cyclic = OBProxSG([param], lr=0.1, lambda_=0.1, epoch_size=3, n_prox_epochs=2, n_orthant_epochs=1)
    assert phases(cyclic, 18) == "ppppppoooppppppooo"
    assert cyclic.epoch == 6 and cyclic.step_in_epoch == 0
    plus = OBProxSG([param], lr=0.1, lambda_=0.1, epoch_size=4, n_prox_epochs=2)
    assert phases(plus, 20) == "p" * 8 + "o" * 12
    assert (plus.epoch, plus.step_in_epoch) == (5, 0)
    compat = OBProxSG([param], lr=0.1, lambda_=0.1, epoch_size=1, n_prox_epochs=1, schedule="code-compat")
    assert phases(compat, 10) == "p" * 10
    assert torch.equal(param.detach(), torch.ones(3))  # no grads: nothing moved, counters still advanced


def test_gradless_tensors_are_skipped() -> None:
    moving = torch.nn.Parameter(torch.tensor([1.0, -1.0]))
    frozen = torch.nn.Parameter(torch.tensor([0.5, 0.0]))
    opt = OBProxSG([moving, frozen], lr=0.5, lambda_=0.2, epoch_size=1, n_prox_epochs=1)
    moving.grad = torch.tensor([0.0, 0.0])
    opt.step()
    torch.testing.assert_close(moving.detach(), torch.tensor([0.9, -0.9]))  # shrunk by lr·λ = 0.1
    assert torch.equal(frozen.detach(), torch.tensor([0.5, 0.0]))


def test_default_prox_epochs_and_l1_norm() -> None:
    assert [default_prox_epochs(e) for e in (1, 9, 10, 393, 1000)] == [1, 1, 1, 39, 100]
    params = [torch.tensor([1.0, -2.0]), torch.tensor([[0.5], [-0.25]])]
    assert l1_norm(params) == pytest.approx(3.75)


def test_bad_arguments_are_rejected() -> None:
    param = [torch.nn.Parameter(torch.ones(1))]
    with pytest.raises(ValueError, match="epoch_size"):
        OBProxSG(param, lr=0.1, lambda_=0.1, epoch_size=0, n_prox_epochs=1)
    with pytest.raises(ValueError, match="epoch_size"):
        OBProxSG(param, lr=0.1, lambda_=0.1, epoch_size=2.5, n_prox_epochs=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="lr"):
        OBProxSG(param, lr=0.0, lambda_=0.1, epoch_size=1, n_prox_epochs=1)
    with pytest.raises(ValueError, match="schedule"):
        OBProxSG(param, lr=0.1, lambda_=0.1, epoch_size=1, n_prox_epochs=1, schedule="fast")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="n_orthant_epochs"):
        OBProxSG(param, lr=0.1, lambda_=0.1, epoch_size=1, n_prox_epochs=1, n_orthant_epochs=1.5)


def make_run(seed: int) -> tuple[torch.nn.Linear, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    model = torch.nn.Linear(6, 3).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.3)
    inputs = torch.randn(20, 32, 6, generator=gen, dtype=torch.float64)  # 20 batches
    targets = torch.randn(20, 32, 3, generator=gen, dtype=torch.float64)
    return model, inputs, targets


def train(
    model: torch.nn.Linear, opt: OBProxSG, inputs: torch.Tensor, targets: torch.Tensor, batches: range
) -> None:
    for i in batches:
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(inputs[i]), targets[i]).backward()
        opt.step()


def make_optimizer(model: torch.nn.Module) -> OBProxSG:
    # 3 steps per epoch, 2 Prox-SG epochs then orthant: the resume point (step 5) is mid-epoch, in Prox-SG,
    # and the phase switches after it.
    return OBProxSG(model.parameters(), lr=0.3, lambda_=0.05, epoch_size=3, n_prox_epochs=2)


def test_resume_from_state_dict_is_bit_identical() -> None:
    model, inputs, targets = make_run(0)
    opt = make_optimizer(model)
    train(model, opt, inputs, targets, range(5))
    assert (opt.epoch, opt.step_in_epoch, opt.phase) == (1, 2, "prox")

    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    snapshot = opt.state_dict()
    train(model, opt, inputs, targets, range(5, 20))
    assert snapshot["state"]["obproxsg_counters"] == {"step_in_epoch": 2, "epoch": 1}  # not aliased

    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    resumed_model, _, _ = make_run(1)  # different weights, overwritten by the checkpoint
    resumed_model.load_state_dict(checkpoint["model"])
    resumed = make_optimizer(resumed_model)
    assert (resumed.epoch, resumed.step_in_epoch) == (0, 0)
    resumed.load_state_dict(checkpoint["opt"])
    assert (resumed.epoch, resumed.step_in_epoch, resumed.phase) == (1, 2, "prox")
    train(resumed_model, resumed, inputs, targets, range(5, 20))

    assert (resumed.epoch, resumed.step_in_epoch, resumed.phase) == (opt.epoch, opt.step_in_epoch, "orthant")
    assert resumed.epoch == 6 and resumed.step_in_epoch == 2
    for a, b in zip(model.parameters(), resumed_model.parameters(), strict=True):
        assert torch.equal(a, b)
    assert any(int((p == 0).sum()) > 0 for p in model.parameters())  # the run did sparsify something
    assert copy.deepcopy(resumed.state_dict())["state"]["obproxsg_counters"] == {
        "step_in_epoch": 2,
        "epoch": 6,
    }


def test_orthant_phase_with_infinite_cycle_is_mathematically_what_the_modulo_rule_says() -> None:
    # With N_O = ∞ the modulo rule k mod (N_P + N_O) < N_P reduces to k < N_P.
    param = torch.nn.Parameter(torch.ones(1))
    opt = OBProxSG([param], lr=0.1, lambda_=0.1, epoch_size=1, n_prox_epochs=3, n_orthant_epochs=math.inf)
    assert phases(opt, 1000) == "ppp" + "o" * 997
