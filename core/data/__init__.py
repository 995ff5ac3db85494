"""Image data: MATLAB-compatible resizing, image decode/encode, evaluation sets, training patches.

Import the submodules directly (`core.data.imresize`, `.images`, `.datasets`, `.sample`); this package
file stays empty so that decoding an image does not import torch.
"""
