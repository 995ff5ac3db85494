"""The preset table GET /v1/presets serves: params and MACs of every preset at every scale, counted on
shapes only and cached on disk."""

from __future__ import annotations

import json
import threading
from pathlib import Path

from api.schemas import PresetOut
from core import __version__
from core.complexity import config_complexity
from core.models.presets import PRESETS, preset_config


def compute_preset(name: str, scale: int) -> PresetOut:
    """A preset's params and MACs at the default LR size, counted on shapes only (no weights)."""
    counted = config_complexity(preset_config(name, scale))
    return PresetOut(
        name=name,
        family=PRESETS[name]["family"],
        scale=scale,
        params=counted.params,
        macs=counted.macs,
        gmacs=round(counted.macs / 1e9, 3),
        lr_size=counted.lr_size,
    )


class PresetTable:
    """Preset figures, computed on first request (SwinIR's MAC count takes seconds) and kept in a JSON
    file under ``<data_dir>/cache`` so that restarts and other API processes reuse them."""

    def __init__(self, cache_dir: Path) -> None:
        self.cache_file = cache_dir / f"presets-{__version__}.json"
        cache_file = self.cache_file
        self._lock = threading.Lock()
        self._rows: dict[str, PresetOut] = {}
        try:
            for item in json.loads(cache_file.read_text()):
                row = PresetOut.model_validate(item)
                self._rows[f"{row.name}x{row.scale}"] = row
        except (OSError, ValueError):
            pass

    def get(self, names: list[str], scales: list[int]) -> list[PresetOut]:
        with self._lock:
            missing = [(n, s) for n in names for s in scales if f"{n}x{s}" not in self._rows]
            for name, scale in missing:
                self._rows[f"{name}x{scale}"] = compute_preset(name, scale)
            if missing:
                self._save()
            return [self._rows[f"{n}x{s}"] for n in names for s in scales]

    def _save(self) -> None:
        try:
            self.cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.cache_file.with_suffix(f".{threading.get_ident()}.tmp")
            tmp.write_text(json.dumps([row.model_dump(mode="json") for row in self._rows.values()]))
            tmp.replace(self.cache_file)
        except OSError:
            pass  # a cache only
