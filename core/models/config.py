"""Typed, JSON-serialisable architecture configs for the three model families.

A config is everything needed to rebuild a network from scratch (weights come separately), so a
saved model is `config.json` + `model.safetensors` and never a pickled module.

The paper describes every network by a triple (N_c, N_l, N_b): channels, layers per block, blocks
(method.md §2, eq. (2)). `config.triple` reads it and `config.with_triple(...)` rebuilds a config with a
new one, which is all that stage 2 (compress) needs to re-instantiate a smaller student.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, TypeAdapter, model_validator

from core.errors import UserError

Scale = Literal[2, 3, 4]
SCALES: tuple[int, ...] = (2, 3, 4)
FAMILIES: tuple[str, ...] = ("edsr", "swinir", "rlfn")
# A saved model directory: the config, the weights, and (after export) the ONNX graph.
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
ONNX_FILE = "model.onnx"


class Triple(NamedTuple):
    """An architecture as the paper's triple (N_c, N_l, N_b): width, layers per block, blocks."""

    nc: int
    nl: int
    nb: int


class BaseConfig(BaseModel):
    """What every family's config shares, and the facts inference keys on (a family overrides them)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    fp16_safe: ClassVar[bool] = True  # activations stay inside fp16's range
    windowed_attention: ClassVar[bool] = False  # window attention: the fused `sdpa` path applies
    onnx_dynamic_shapes: ClassVar[bool] = True  # one exported graph serves every input size
    # Deployable formats (core.formats) this family converts to and passes its checks in; a job asking
    # for another is refused at submit time with `formats_note`.
    export_formats: ClassVar[frozenset[str]] = frozenset(
        ("onnx", "onnx_fp16", "onnx_int8", "openvino", "openvino_int8", "ncnn", "ncnn_fp16")
    )
    formats_note: ClassVar[str] = ""

    @property
    def pad_multiple(self) -> int:
        """The LR image is reflect-padded to a multiple of this before the network."""
        return 1

    @property
    def attention_values_per_token(self) -> int:
        """Attention scores per LR pixel (0 for a conv net): they can outweigh the widest feature map."""
        return 0

    def _rebuilt(self, **changes: Any) -> Any:
        # model_copy(update=...) skips validation; a full re-validate keeps the invariants.
        return type(self).model_validate({**self.model_dump(), **changes})


class EDSRConfig(BaseConfig):
    """EDSR in BasicSR's layout (method.md §2.1). N_l is always 1: a block is conv-ReLU-conv."""

    family: Literal["edsr"] = "edsr"
    scale: Scale
    num_feat: PositiveInt = 64
    num_block: PositiveInt = 16
    res_scale: float = 1.0
    # EDSR-PyTorch checkpoints may carry `sub_mean`/`add_mean` 1x1 convs whose values drifted from the
    # constant DIV2K mean during training; when True the model has them and uses them instead.
    mean_convs: bool = False

    @property
    def triple(self) -> Triple:
        return Triple(self.num_feat, 1, self.num_block)

    def with_triple(self, n_c: int, n_l: int, n_b: int) -> EDSRConfig:
        if n_l != 1:
            raise UserError(f"EDSR blocks have exactly one layer before their last conv (N_l = 1), got {n_l}")
        # A rebuilt student is a fresh network: it uses the constant mean, not a checkpoint's convs.
        return self._rebuilt(num_feat=n_c, num_block=n_b, mean_convs=False)


class SwinIRConfig(BaseConfig):
    """SwinIR (JingyunLiang/SwinIR network_swinir.py), classical or lightweight SR (method.md §2.2)."""

    family: Literal["swinir"] = "swinir"
    # Its activations overflow fp16 into NaN / black output (JingyunLiang/SwinIR#103, #180); its forward
    # builds the shifted-window mask from Python ints of the input size, which ONNX tracing freezes.
    fp16_safe: ClassVar[bool] = False
    windowed_attention: ClassVar[bool] = True
    onnx_dynamic_shapes: ClassVar[bool] = False
    export_formats: ClassVar[frozenset[str]] = frozenset(("onnx", "onnx_fp16", "openvino"))
    formats_note: ClassVar[str] = (
        "SwinIR is offered as fp32 ONNX, mixed fp16 ONNX (attention, LayerNorm and softmax in fp32: "
        "its activations overflow fp16) and fp32 OpenVINO; its graphs hold one input size, which "
        "pnnx cannot make dynamic, and int8 attention is not verified here"
    )
    scale: Scale
    embed_dim: PositiveInt = 60
    depths: tuple[PositiveInt, ...] = (6, 6, 6, 6)
    # One head count per RSTB; a plain int in the input is repeated for every RSTB.
    num_heads: tuple[PositiveInt, ...] = (6, 6, 6, 6)
    window_size: PositiveInt = 8
    mlp_ratio: float = Field(default=2.0, gt=0)
    upsampler: Literal["pixelshuffle", "pixelshuffledirect"] = "pixelshuffledirect"
    # The size the `attn_mask` buffers are built for (48 in the official "s48" checkpoints).
    img_size: PositiveInt = 64
    drop_path_rate: float = Field(default=0.1, ge=0, lt=1)
    resi_connection: Literal["1conv"] = "1conv"
    img_range: float = Field(default=1.0, gt=0)

    @model_validator(mode="before")
    @classmethod
    def _heads_per_layer(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("num_heads"), int):
            depths = data.get("depths", cls.model_fields["depths"].default)
            data = {**data, "num_heads": (data["num_heads"],) * len(depths)}
        return data

    @model_validator(mode="after")
    def _check_shapes(self) -> SwinIRConfig:
        if not self.depths:
            raise ValueError("depths must name at least one RSTB")
        if len(self.num_heads) != len(self.depths):
            raise ValueError(f"num_heads {self.num_heads} needs one entry per RSTB in depths {self.depths}")
        for heads in self.num_heads:
            if self.embed_dim % heads:
                raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {heads}")
        # Official SwinIR shrinks the window and drops the shift when img_size <= window (pitfall 19);
        # srcompress refuses such configs instead of silently changing the architecture.
        if self.img_size <= self.window_size or self.img_size % self.window_size:
            raise ValueError(
                f"img_size {self.img_size} must be a multiple of window_size {self.window_size} and larger"
            )
        if int(self.embed_dim * self.mlp_ratio) < 1:
            raise ValueError(f"mlp_ratio {self.mlp_ratio} gives an empty MLP for embed_dim {self.embed_dim}")
        return self

    @property
    def triple(self) -> Triple:
        if len(set(self.depths)) != 1:
            raise UserError(f"SwinIR with unequal depths {self.depths} has no single N_l")
        return Triple(self.embed_dim, self.depths[0], len(self.depths))

    @property
    def pad_multiple(self) -> int:
        return self.window_size

    @property
    def attention_values_per_token(self) -> int:
        return max(self.num_heads) * self.window_size**2

    @property
    def heads(self) -> int:
        """The head count shared by all RSTBs (compression keeps it fixed, method.md §4.4)."""
        if len(set(self.num_heads)) != 1:
            raise UserError(f"SwinIR with unequal num_heads {self.num_heads} has no single head count")
        return self.num_heads[0]

    def with_triple(self, n_c: int, n_l: int, n_b: int) -> SwinIRConfig:
        heads = self.heads
        if n_c % heads:
            raise UserError(f"SwinIR width {n_c} must be a multiple of the {heads} attention heads")
        return self._rebuilt(embed_dim=n_c, depths=(n_l,) * n_b, num_heads=(heads,) * n_b)


class RLFNConfig(BaseConfig):
    """RLFN / RLFN-S (bytedance/RLFN, method.md §2.5); a compressed RLFN may have fewer convs/blocks."""

    family: Literal["rlfn"] = "rlfn"
    scale: Scale
    channels: PositiveInt = 52
    num_blocks: PositiveInt = 6
    convs_per_block: PositiveInt = 3
    # ESA's inner width f; defaults to min(16, channels) and is always explicit after validation.
    esa_channels: PositiveInt = 16

    @model_validator(mode="before")
    @classmethod
    def _default_esa_channels(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("esa_channels") is None:
            channels = data.get("channels", cls.model_fields["channels"].default)
            if isinstance(channels, int):
                data = {**data, "esa_channels": min(16, channels)}
        return data

    @property
    def triple(self) -> Triple:
        return Triple(self.channels, self.convs_per_block, self.num_blocks)

    def with_triple(self, n_c: int, n_l: int, n_b: int) -> RLFNConfig:
        return self._rebuilt(channels=n_c, convs_per_block=n_l, num_blocks=n_b, esa_channels=min(16, n_c))


ModelConfig = Annotated[EDSRConfig | SwinIRConfig | RLFNConfig, Field(discriminator="family")]
_MODEL_CONFIG_ADAPTER: TypeAdapter[EDSRConfig | SwinIRConfig | RLFNConfig] = TypeAdapter(ModelConfig)


def parse_config(data: dict[str, Any] | str | bytes) -> EDSRConfig | SwinIRConfig | RLFNConfig:
    """A ModelConfig from a dict or JSON text; raises pydantic.ValidationError on bad input."""
    if isinstance(data, str | bytes):
        return _MODEL_CONFIG_ADAPTER.validate_json(data)
    return _MODEL_CONFIG_ADAPTER.validate_python(data)
