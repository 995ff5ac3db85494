"""The work dir mirror: a job's work dir (checkpoints, state.json) kept in blob storage as it runs, so
that a re-queued job resumes from its last uploaded checkpoint on any worker."""

from __future__ import annotations

import shutil
from pathlib import Path

from store.blobs import BlobStore, download_dir, normalize_prefix

SKIPPED_SUFFIXES = (".tmp", ".part")  # files being written; their final name is uploaded later


class WorkdirMirror:
    """Keeps ``blobs[prefix]`` a copy of ``local_dir``, uploading only files that changed since the last
    sync (by size and mtime). Called from the training thread, between steps, so no file is half written
    (core writes checkpoints to a temp name and renames them)."""

    def __init__(self, blobs: BlobStore, local_dir: Path, prefix: str) -> None:
        self.blobs = blobs
        self.local_dir = local_dir
        self.prefix = normalize_prefix(prefix)
        self.synced: dict[str, tuple[int, int]] = {}  # relative path -> (size, mtime_ns) in storage

    def _local_files(self) -> dict[str, tuple[int, int]]:
        files = {}
        for path in sorted(self.local_dir.rglob("*")):
            if path.is_file() and not path.name.endswith(SKIPPED_SUFFIXES):
                stat = path.stat()
                files[path.relative_to(self.local_dir).as_posix()] = (stat.st_size, stat.st_mtime_ns)
        return files

    def restore(self) -> int:
        """Replace the local dir by the stored mirror; returns the number of files restored."""
        shutil.rmtree(self.local_dir, ignore_errors=True)
        self.local_dir.mkdir(parents=True, exist_ok=True)
        restored = download_dir(self.blobs, self.prefix, self.local_dir)
        self.synced = self._local_files()
        return len(restored)

    def sync(self) -> list[str]:
        """Upload new and changed files, delete stored files that no longer exist; returns the uploaded
        relative paths. state.json goes last, so the stored state never names a result whose files
        are not stored yet."""
        current = self._local_files()
        changed = [rel for rel, stamp in current.items() if self.synced.get(rel) != stamp]
        changed.sort(key=lambda rel: rel == "state.json")
        for rel in changed:
            self.blobs.put_file(self.prefix + rel, self.local_dir / rel)
            self.synced[rel] = current[rel]
        for rel in [rel for rel in self.synced if rel not in current]:
            self.blobs.delete(self.prefix + rel)
            del self.synced[rel]
        return changed
