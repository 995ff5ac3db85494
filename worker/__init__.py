"""Compression workers: a Celery app (app.py), its task and reaper thread (tasks.py), the plain-Python
job runner (runner.py) with its lease heartbeat (heartbeat.py) and work dir mirror (mirror.py), the lease
reaper (reaper.py) and the ``srcompress worker`` command (cli.py)."""
