"""OBProx-SG (Chen et al., ECML-PKDD 2020), the stage-1 pruning optimizer (method.md §3.1).

Minimises f(θ) + λ‖θ‖₁ for every tensor it is given; the ℓ1 term is applied here, never added to the
loss. Plain SGD steps (no momentum, no weight decay), element-wise:

- Prox-SG:  z = θ − α·g;  θ ← sign(z)·max(|z| − αλ, 0).  Zeros may revive.
- Orthant:  ζ = sign(θ) (0 at zeros); trial θ̃ = θ − α·(g + λζ) on non-zeros, zeros unchanged;
            keep θ̃ only where θ̃·ζ > eps, else 0. Zeros stay frozen; sign flips and magnitudes ≤ eps
            become zero. eps is used only here.

Schedule, counted in epochs k: Prox-SG if k mod (N_P + N_O) < N_P, else orthant; with N_O = ∞
(OBProx-SG+, the default) that is N_P Prox-SG epochs, then orthant steps to the end. An epoch is
`epoch_size` optimizer *steps* (batches) — counting samples instead (the authors' bug) keeps the
orthant phase from ever starting; schedule="code-compat" reproduces that run: Prox-SG throughout.

The counters (`step_in_epoch`, `epoch`) live in the optimizer state, so state_dict()/load_state_dict()
carry them and a resumed run continues in the right phase.
"""

import math
from collections.abc import Callable, Iterable
from typing import Any, Literal

import torch

Phase = Literal["prox", "orthant"]
Schedule = Literal["correct", "code-compat"]

# Key of the schedule counters in Optimizer.state (a non-tensor key: state_dict() keeps it as is).
COUNTERS_KEY = "obproxsg_counters"


def default_prox_epochs(total_epochs: int) -> int:
    """N_P of the OBProx-SG+ rule: a tenth of the run, at least one epoch."""
    return max(1, total_epochs // 10)


def l1_norm(params: Iterable[torch.Tensor]) -> float:
    """‖θ‖₁ over all given tensors, accumulated in float64 (for logging the objective f + λ‖θ‖₁)."""
    return float(sum(p.detach().abs().sum(dtype=torch.float64) for p in params))


def schedule_phase(epoch: int, n_prox_epochs: int, n_orthant_epochs: float, schedule: Schedule) -> Phase:
    """The phase of epoch k (0-based) under the schedule."""
    if schedule == "code-compat":
        return "prox"
    if math.isinf(n_orthant_epochs):
        return "prox" if epoch < n_prox_epochs else "orthant"
    return "prox" if epoch % (n_prox_epochs + int(n_orthant_epochs)) < n_prox_epochs else "orthant"


@torch.no_grad()
def prox_sg_step_(param: torch.Tensor, grad: torch.Tensor, lr: float, lambda_: float) -> None:
    """In place: θ ← soft-threshold(θ − lr·g, lr·λ)."""
    param.add_(grad, alpha=-lr)
    shrunk = (param.abs() - lr * lambda_).clamp_(min=0)
    param.copy_(param.sign() * shrunk)


@torch.no_grad()
def orthant_step_(param: torch.Tensor, grad: torch.Tensor, lr: float, lambda_: float, eps: float) -> None:
    """In place: a step along the face gradient, projected back onto θ's orthant face (zeros frozen)."""
    orthant = param.sign()  # ζ: 0 at zeros, which therefore get no step and stay zero after projection
    face_grad = torch.where(orthant != 0, grad + lambda_ * orthant, torch.zeros_like(grad))
    trial = param - lr * face_grad
    param.copy_(torch.where(trial * orthant > eps, trial, torch.zeros_like(trial)))


class OBProxSG(torch.optim.Optimizer):
    """Orthant-based proximal SGD for min f(θ) + λ‖θ‖₁ over every tensor in `params`.

    Args:
        params: tensors or param groups; every tensor given is ℓ1-regularised (groups may set their own
            lr, lambda_, eps). Tensors without a gradient are skipped.
        lr: step size α.
        lambda_: ℓ1 weight λ.
        epoch_size: optimizer steps (batches) per epoch — not samples, not × world size.
        n_prox_epochs: N_P, Prox-SG epochs per cycle (see default_prox_epochs).
        n_orthant_epochs: N_O, orthant epochs per cycle; ∞ (default) = OBProx-SG+.
        eps: orthant projection threshold (1e-4 as in CDFI / the authors; the reference's default is 0).
        schedule: "correct" (default) or "code-compat" (Prox-SG for the whole run, as the authors' run).
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float,
        lambda_: float,
        epoch_size: int,
        n_prox_epochs: int,
        n_orthant_epochs: float = math.inf,
        eps: float = 1e-4,
        schedule: Schedule = "correct",
    ) -> None:
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if not lambda_ >= 0:
            raise ValueError(f"lambda_ must be >= 0, got {lambda_}")
        if not eps >= 0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        if isinstance(epoch_size, bool) or not isinstance(epoch_size, int) or epoch_size < 1:
            raise ValueError(
                f"epoch_size must be an integer >= 1 (optimizer steps per epoch), got {epoch_size!r}"
            )
        if isinstance(n_prox_epochs, bool) or not isinstance(n_prox_epochs, int) or n_prox_epochs < 0:
            raise ValueError(f"n_prox_epochs must be an integer >= 0, got {n_prox_epochs!r}")
        if not (math.isinf(n_orthant_epochs) or float(n_orthant_epochs).is_integer()) or n_orthant_epochs < 0:
            raise ValueError(
                f"n_orthant_epochs must be an integer >= 0 or math.inf, got {n_orthant_epochs!r}"
            )
        if n_prox_epochs + n_orthant_epochs == 0:
            raise ValueError("n_prox_epochs + n_orthant_epochs must be > 0")
        if schedule not in ("correct", "code-compat"):
            raise ValueError(f"schedule must be 'correct' or 'code-compat', got {schedule!r}")
        super().__init__(params, dict(lr=lr, lambda_=lambda_, eps=eps))
        self.epoch_size = epoch_size
        self.n_prox_epochs = n_prox_epochs
        self.n_orthant_epochs = n_orthant_epochs
        self.schedule: Schedule = schedule
        self.state[COUNTERS_KEY] = {"step_in_epoch": 0, "epoch": 0}

    # The counters are replaced (never mutated) on every step, so a state_dict() taken earlier keeps
    # the values it had when it was taken.
    @property
    def step_in_epoch(self) -> int:
        return int(self.state[COUNTERS_KEY].get("step_in_epoch", 0))

    @property
    def epoch(self) -> int:
        """k: completed epochs."""
        return int(self.state[COUNTERS_KEY].get("epoch", 0))

    @property
    def phase(self) -> Phase:
        """The phase the next step() will run."""
        return schedule_phase(self.epoch, self.n_prox_epochs, self.n_orthant_epochs, self.schedule)

    def _advance(self) -> None:
        step_in_epoch, epoch = self.step_in_epoch + 1, self.epoch
        if step_in_epoch == self.epoch_size:
            step_in_epoch, epoch = 0, epoch + 1
        self.state[COUNTERS_KEY] = {"step_in_epoch": step_in_epoch, "epoch": epoch}

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        phase = self.phase
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                if param.grad.is_sparse:
                    raise RuntimeError("OBProxSG does not support sparse gradients")
                if phase == "prox":
                    prox_sg_step_(param, param.grad, group["lr"], group["lambda_"])
                else:
                    orthant_step_(param, param.grad, group["lr"], group["lambda_"], group["eps"])
        self._advance()
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        if COUNTERS_KEY not in self.state:  # a state_dict from before any counters existed
            self.state[COUNTERS_KEY] = {"step_in_epoch": 0, "epoch": 0}
        else:  # own copy, so stepping never writes into the caller's dict
            self.state[COUNTERS_KEY] = dict(self.state[COUNTERS_KEY])
