"""The HTTP API (FastAPI): thin routes over a service layer (crud, serving, archives, uploads)."""
