"""Property-based fuzzing of every operation in /openapi.json (schemathesis) against a live server.

The server is the embedded default (SQLite, local blobs, a server-less broker) without a worker, so the
jobs the fuzzer submits stay queued and never take the machine's cores. Half of the generated requests
get real ids (a model, a dataset and a job made by the fixture) so that the fuzzer reaches past the 404s;
deletions keep their random ids so the real objects survive the run. Any 5xx, any status the spec does
not declare, or any body that does not match its declared schema fails the test.
"""

from __future__ import annotations

import io
import itertools
from dataclasses import dataclass

import httpx
import pytest
import schemathesis
import torch
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from core.models.build import create_model
from tests.service_helpers import create_key, png_bytes, uvicorn_server, zip_bytes
from tests.stores import free_port

pytestmark = [pytest.mark.service, pytest.mark.slow]

EXAMPLES_PER_OPERATION = 25
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@dataclass
class Live:
    url: str
    key: str
    ids: dict[str, str]  # path/body parameter name -> a real id


@pytest.fixture(scope="module")
def live(tmp_path_factory) -> Live:
    tmp = tmp_path_factory.mktemp("fuzz")
    env = {
        "SRCOMPRESS_DATA_DIR": str(tmp / "data"),
        "SRCOMPRESS_MAX_UPLOAD_BYTES": str(2 * 1024 * 1024),
        "SRCOMPRESS_MAX_PIXELS": str(300 * 300),
        "SRCOMPRESS_MAX_RUNNING_JOBS_PER_KEY": "2",
    }
    key = create_key(env, "fuzzer")
    with uvicorn_server(env, free_port(), tmp / "uvicorn.log") as url:
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=60) as client:
            buffer = io.BytesIO()
            torch.save(create_model("rlfn_s", 2).state_dict(), buffer)
            model = client.post("/v1/models", files={"file": ("rlfn_s_x2.pth", buffer.getvalue())})
            assert model.status_code == 201, model.text
            images = zip_bytes({"a.png": png_bytes(64, 64), "b.png": png_bytes(64, 64, seed=1)})
            dataset = client.post("/v1/datasets", files={"file": ("two.zip", images)})
            assert dataset.status_code == 201, dataset.text
            job = client.post(
                "/v1/jobs", json={"model": "rlfn_s", "scale": 2, "teacher_model_id": model.json()["id"]}
            )
            assert job.status_code == 202, job.text
            yield Live(
                url,
                key,
                {
                    "model_id": model.json()["id"],
                    "teacher_model_id": model.json()["id"],
                    "dataset_id": dataset.json()["id"],
                    "job_id": job.json()["id"],
                },
            )


_coin = itertools.count()


def with_real_ids(case, ids: dict[str, str]) -> None:
    """Every other request: the ids it names are real ones (not for deletions)."""
    if case.method == "DELETE" or next(_coin) % 2:
        return
    for name in list(case.path_parameters or {}):
        if name in ids:
            case.path_parameters[name] = ids[name]
    if isinstance(case.body, dict):
        for name in ("model_id", "teacher_model_id"):
            if name in case.body:
                case.body[name] = ids[name]


def test_every_operation_answers_within_its_schema(live: Live):
    schema = schemathesis.openapi.from_url(f"{live.url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 17
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(
            max_examples=EXAMPLES_PER_OPERATION,
            deadline=None,
            database=None,
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        def check(case) -> None:
            with_real_ids(case, live.ids)
            if case.path.endswith("/events"):  # a followed stream of a job that never runs never ends
                case.query = {**(case.query or {}), "follow": "false"}
            case.call_and_validate(
                base_url=live.url, headers={"Authorization": f"Bearer {live.key}"}, checks=CHECKS, timeout=60
            )

        print(operation.label)
        check()
