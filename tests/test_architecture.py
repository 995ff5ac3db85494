"""The code's shape: what each room imports, facts defined once, modules of one responsibility.

Import checks run in a fresh interpreter (this one has imported everything already). The room rules
themselves (core imports no service code, api and worker never import each other, route modules import
no other route module) are import-linter contracts in pyproject.toml, run by scripts/test.sh.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ROOMS = ("core", "api", "worker", "store", "srcompress")
MAX_MODULE_LINES = 450


def modules_after_import(module: str) -> set[str]:
    code = f"import sys, {module}; print('\\n'.join(sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def source_files() -> list[Path]:
    return sorted(p for room in ROOMS for p in (REPO / room).rglob("*.py"))


def test_the_job_contract_loads_without_torch():
    loaded = modules_after_import("core.job")
    assert "torch" not in loaded
    assert not {m for m in loaded if m.startswith(("core.distill", "core.prune"))}


def test_the_api_loads_without_the_training_stages():
    loaded = modules_after_import("api.app")
    assert not {m for m in loaded if m.startswith(("core.distill", "core.prune", "core.pipeline", "worker"))}


def test_every_module_has_one_stated_responsibility_and_at_most_450_lines():
    too_long, undocumented = [], []
    for path in source_files():
        text = path.read_text()
        if len(text.splitlines()) > MAX_MODULE_LINES:
            too_long.append(f"{path.relative_to(REPO)}: {len(text.splitlines())}")
        if path.name != "__main__.py" and not ast.get_docstring(ast.parse(text)):
            undocumented.append(str(path.relative_to(REPO)))
    assert not too_long and not undocumented, (too_long, undocumented)


def test_job_states_are_the_contracts_stages():
    from core.job import STAGES
    from store import jobs

    assert jobs.RUNNING_STATES[1:] == STAGES and jobs.RUNNING_STATES[0] == "preparing"
    assert set(jobs.JOB_STATES) == {"queued", *jobs.RUNNING_STATES, *jobs.TERMINAL_STATES}


def test_the_worker_consumes_the_task_the_api_sends():
    import worker.tasks  # noqa: F401 - registers the task
    from store.queue import TASK_NAME, TASK_QUEUE
    from worker.app import app

    assert TASK_NAME in app.tasks and app.conf.task_default_queue == TASK_QUEUE


# Each fact below is written in exactly one non-test module: a second copy is a bug waiting to diverge.
ONE_DEFINITION = {
    "the job stages": '"pruning", "compressing", "distilling"',
    "the Celery task name": '"srcompress.run_job"',
    "the Celery queue": '"srcompress.jobs"',
    "the worker command line": '"--without-mingle"',
    "the blob layout of models": 'join_key("models"',
    "the blob layout of job artifacts": '"artifacts", name',
    "a file's sha256": "digest.update(chunk)",
    "a validation error as one line": ".join(str(part) for part in",
    "eval mode save/restore": "was_training = ",
    "a model's family": "def model_family(",
    "a model's device": "def model_device(",
    "shape-only models": 'torch.device("meta")',
    "loading a loop's checkpoint": "set_rng_state(state",
    "the architecture triple": '(NamedTuple):\n    """An architecture as the paper\'s triple',
}


@pytest.mark.parametrize("fact", ONE_DEFINITION)
def test_each_fact_has_one_definition(fact):
    needle = ONE_DEFINITION[fact]
    holders = [str(p.relative_to(REPO)) for p in source_files() if needle in p.read_text()]
    assert len(holders) == 1, f"{fact} is written in {holders}"
