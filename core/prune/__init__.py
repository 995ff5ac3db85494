"""Stage 1: ℓ1 pruning with OBProx-SG (method.md §3)."""

from core.prune.obproxsg import OBProxSG, default_prox_epochs, l1_norm

__all__ = ["OBProxSG", "default_prox_epochs", "l1_norm"]
