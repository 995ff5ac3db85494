"""A run's record in its workdir: `state.json` holds each finished stage's typed result and seconds and
the budget plan, so a killed run resumes where it stopped with the same schedule."""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel

from core.job import STAGES
from core.loop import load_checkpoint_state
from core.schedule import BudgetPlan


class RunState:
    """workdir/state.json: the typed result of each finished stage, its wall-clock seconds, and the
    job's budget plan (made once, so that a resumed run repeats the same schedule)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data = json.loads(path.read_text()) if path.exists() else {"results": {}, "seconds": {}}

    @property
    def plan(self) -> BudgetPlan | None:
        return BudgetPlan(**self.data["plan"]) if "plan" in self.data else None

    @plan.setter
    def plan(self, plan: BudgetPlan) -> None:
        self.data["plan"] = plan.model_dump()
        self._write()

    def done(self, stage: str) -> bool:
        return stage in self.data["results"]

    def get(self, stage: str) -> dict:
        return self.data["results"][stage]

    def put(self, stage: str, result: BaseModel | dict, seconds: float) -> None:
        self.data["results"][stage] = (
            result.model_dump(mode="json") if isinstance(result, BaseModel) else result
        )
        self.data["seconds"][stage] = seconds
        self._write()

    def _write(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=2))
        tmp.replace(self.path)


def resume_point(workdir: Path) -> dict[str, str | int]:
    """Where a run in `workdir` continues: its first unfinished stage and that stage's checkpoint
    iteration (0 when the stage has not saved one)."""
    state = RunState(Path(workdir) / "state.json")
    stage = next((s for s in STAGES if not state.done(s)), STAGES[-1])
    checkpoint = {"pruning": "prune.pt", "distilling": "distilling.pt"}.get(stage)
    saved = load_checkpoint_state(Path(workdir) / checkpoint) if checkpoint else None
    return {"stage": stage, "iteration": int(saved["iteration"]) if saved else 0}
