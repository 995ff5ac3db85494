"""Inference: fast, tiled upscaling with any srcompress model (method.md §9).

Modules: runners (one model on one backend), tiling (tiles and blending), tuning (the fastest backend
within 0.05 dB of fp32), upscale (arrays and files, the entry points). Import them directly.

Tiling. The LR image is cut into tiles whose sides are multiples of 8 (SwinIR's window, so a tile is
never padded) that overlap by `overlap` LR pixels. Each tile's output is weighted by a feathered mask
that is ~0 near an edge shared with a neighbour and rises linearly to 1 across the overlap (image
borders keep weight 1), and the weighted sum is divided by the summed weights: no seams (crop-and-paste
leaves them, xinntao/Real-ESRGAN#211). SwinIR inputs are reflect-padded once, for the whole image, to a
multiple of 8 (only when needed) and the output cropped, so tiles and whole-image passes see the same
border. The image and the output accumulator live in host memory, so only one tile's
activations are ever on the device (Real-ESRGAN#184). With `tile=None` the tile is sized from free
memory (the whole image when it fits) and halved on out-of-memory errors.

Backends (all take and return float32 RGB in [0, 1]):
- 'eager': the model as is, fp32.
- 'channels_last': fp32 on a channels-last copy of the model (oneDNN's preferred conv layout on CPU).
- 'sdpa': fp32 on a copy of a SwinIR model whose window attention runs through torch's fused
  `scaled_dot_product_attention` (same math; the explicit matmul + bias + mask + softmax of the model
  file, kept there for FLOP counting, makes ~5 passes over the (windows, heads, 64, 64) scores).
- 'bf16': autocast to bfloat16; falls back to fp32 when the output is not finite.
- 'fp16': autocast to float16, CUDA only and never for SwinIR (its activations overflow fp16 into
  NaN/black output, JingyunLiang/SwinIR#103, #180).
- 'onnxruntime': the model exported by core.onnx_export, run by an ONNX Runtime CPU session with one
  intra-op thread per core; the graph is cached on disk per model fingerprint (and per LR tile shape
  for SwinIR, whose graph is size-specific: the first image of a new shape pays an export of several
  seconds; use a fixed `tile` when serving SwinIR through it).
Every backend but 'eager' runs a copy with the sub-pixel tail folded (core.models.fold: EDSR and
classical SwinIR compute conv_last on the LR side, before the final PixelShuffle; same outputs).
`choose_backend` measures which of them is fastest on this machine *and* keeps the Y-PSNR within
0.05 dB of fp32, once per model and machine (the decision is cached as JSON). `backend=None` means
'eager'; pass 'auto' (or `prepare_backend(model, "auto")`) to use the measured choice.
"""
