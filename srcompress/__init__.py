"""The `srcompress` command: the one entry point above core, api and worker (`python -m srcompress`)."""
