"""The model zoo: EDSR, SwinIR and RLFN with official key names, presets and checkpoint I/O.

Import the submodules directly (`core.models.config`, `.presets`, `.build`, `.checkpoint`, one module
per family); this package file stays empty so that configs and presets load without torch.
"""
