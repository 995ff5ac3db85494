"""srcompress: compress deep image super-resolution models and serve them."""

__version__ = "0.1.0"
