"""The blob-key layout: where each kind of file lives in the bucket (one definition, used by api and worker).

models/{model_id}/{model.safetensors | config.json | model.onnx}
datasets/{dataset_id}/{image}
jobs/{job_id}/work/...        the worker's mirror of a job's work dir (checkpoints, state.json)
jobs/{job_id}/artifacts/{name}
"""

from __future__ import annotations

from store.blobs import join_key


def model_key(model_id: str, name: str) -> str:
    return join_key("models", model_id, name)


def dataset_prefix(dataset_id: str) -> str:
    return join_key("datasets", dataset_id)


def work_prefix(job_id: str) -> str:
    return join_key("jobs", job_id, "work") + "/"


def artifact_key(job_id: str, name: str) -> str:
    return join_key("jobs", job_id, "artifacts", name)
