"""Errors that a user caused and can fix. The CLI prints them as one line; the API maps them to 4xx."""


class UserError(ValueError):
    """Bad input: an unknown preset, a missing file, a checkpoint that does not fit, ..."""


class CheckpointError(UserError):
    """A checkpoint that cannot be loaded into the requested or detected architecture."""


class ImageError(UserError):
    """A file that is not a decodable image, or one over the size limits."""


class ImageTooLarge(ImageError):
    """An image over the pixel limit (the service's, or Pillow's decompression-bomb guard)."""


class Canceled(Exception):
    """Raised inside a stage when the caller's should_cancel() turned true."""


class Diverged(Exception):
    """A training loss stopped being finite (the lr or the loss weights are too large for the model)."""
