"""The service's storage layer.

- settings: ``Settings`` (environment prefix ``SRCOMPRESS_``).
- tables: SQLAlchemy tables (api_keys, models, datasets, jobs, job_events, artifacts).
- db: ``make_engine``, ``session_factory``, ``read_session_factory``, ``init_db``, ``migrate``.
- jobs: the job state machine and the job event log; leases: workers' leases on jobs.
- keys: the blob-key layout; models: registering a model (files + row); queue: the task name,
  queue and worker command line.
- apikeys: creating, finding and revoking API keys (only hashes are stored).
- blobs: ``BlobStore`` on a local directory or S3, ``upload_dir``/``download_dir``.

Submodules are imported explicitly (``from store import jobs``); this package imports nothing itself.
"""
