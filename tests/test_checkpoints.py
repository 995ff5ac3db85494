"""Checkpoints: official key schemes and wrappers load strictly, round-trip, and fail with clear errors."""

import json
import os
import random
import re

import numpy as np
import pytest
import torch
from PIL import Image

from core.errors import CheckpointError, UserError
from core.models.build import build_model
from core.models.checkpoint import detect_config, load_checkpoint, load_model, read_state_dict, save_model
from core.models.presets import PRESETS, preset_config

INPUT = torch.rand(1, 3, 16, 20, generator=torch.Generator().manual_seed(1))
# Smallest inputs that exercise each family (SwinIR still pads 12 -> 16; RLFN's ESA needs >= 15 px).
TINY_INPUT = {"edsr": INPUT[..., :8, :12], "swinir": INPUT[..., :8, :12], "rlfn": INPUT[..., :16, :16]}


def seeded(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Perturb every trainable tensor so that a mis-mapped key changes the output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=generator) * (0.02 if "weight" in name else 0.05))
    return model.eval()


def to_edsr_pytorch(sd: dict[str, torch.Tensor], num_block: int) -> dict[str, torch.Tensor]:
    """BasicSR EDSR names -> EDSR-PyTorch names (src/model/edsr.py), with its MeanShift convs."""
    rules = [
        (r"^conv_first\.", "head.0."),
        (r"^body\.(\d+)\.conv1\.", r"body.\1.body.0."),
        (r"^body\.(\d+)\.conv2\.", r"body.\1.body.2."),
        (r"^conv_after_body\.", f"body.{num_block}."),
        (r"^upsample\.(\d+)\.", r"tail.0.\1."),
        (r"^conv_last\.", "tail.1."),
    ]
    out = {}
    for key, value in sd.items():
        for pattern, replacement in rules:
            key = re.sub(pattern, replacement, key)
        out[key] = value
    mean = torch.tensor([0.4488, 0.4371, 0.4040]) * 255
    out["sub_mean.weight"] = out["add_mean.weight"] = torch.eye(3).view(3, 3, 1, 1)
    out["sub_mean.bias"], out["add_mean.bias"] = -mean, mean.clone()
    return out


def official_file(name: str, model: torch.nn.Module):
    """The object an official release of this preset would hold (method.md §2.4, §2.5)."""
    sd = model.state_dict()
    if name in ("edsr", "edsr_baseline"):
        return to_edsr_pytorch(sd, model.config.num_block), "raw", "edsr-pytorch"
    if name == "swinir_mini":  # EMA weights win over the raw ones
        decoy = {k: torch.zeros_like(v) for k, v in sd.items()}
        return {"params": decoy, "params_ema": sd, "iter": 5}, "params_ema", "official"
    if name.startswith("edsr") or name.startswith("swinir"):
        return {"params": sd}, "params", "official"
    return sd, "raw", "official"


def official_config(name: str):
    if name == "swinir":  # the released SwinIR-M x2 is "s48": its attn_mask has 36 windows
        return preset_config(name, 2, img_size=48)
    return preset_config(name, 2)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(PRESETS))
def test_official_layouts_round_trip(name, tmp_path):
    config = official_config(name)
    model = seeded(build_model(config))
    payload, wrapper, scheme = official_file(name, model)
    path = tmp_path / "official.pth"
    torch.save(payload, path)

    loaded, info = load_checkpoint(path)
    expected = config.model_copy(update={"mean_convs": True}) if scheme == "edsr-pytorch" else config
    assert info.config == expected
    assert (info.wrapper, info.key_scheme) == (wrapper, scheme)
    assert detect_config(read_state_dict(path).tensors) == expected
    json.loads(info.model_dump_json())  # job records store it

    x = TINY_INPUT[config.family]
    with torch.no_grad():
        reference = model(x)
        out = loaded(x)
        if scheme == "edsr-pytorch":  # MeanShift convs vs the constant mean: equal up to rounding
            torch.testing.assert_close(out, reference, rtol=1e-5, atol=2e-6)
        else:
            assert torch.equal(out, reference)

        save_model(loaded, tmp_path / "saved")
        assert sorted(p.name for p in (tmp_path / "saved").iterdir()) == ["config.json", "model.safetensors"]
        again = load_model(tmp_path / "saved")
        assert again.config == expected and not again.training
        assert torch.equal(again(x), out)
        via_file, file_info = load_checkpoint(tmp_path / "saved" / "model.safetensors")
        assert file_info.wrapper == "safetensors" and torch.equal(via_file(x), out)


def test_edsr_pytorch_mean_convs_are_loaded_and_used(tmp_path):
    model = seeded(build_model(preset_config("edsr_mini", 2)))
    sd = to_edsr_pytorch(model.state_dict(), 8)
    sd["add_mean.bias"] = sd["add_mean.bias"] + 2.55  # a drifted mean: +0.01 on the [0, 1] output
    torch.save(sd, tmp_path / "drifted.pt")
    loaded, info = load_checkpoint(tmp_path / "drifted.pt", family="edsr", scale=2, preset="edsr_mini")
    assert info.config.mean_convs and info.config.res_scale == 2.0
    with torch.no_grad():
        torch.testing.assert_close(loaded(INPUT), model(INPUT) + 0.01, rtol=1e-5, atol=2e-6)


@pytest.mark.slow
def test_detection_of_scales_and_non_preset_shapes(tmp_path):
    cases = [
        preset_config("edsr_baseline", 3),
        preset_config("edsr_mini", 4),
        preset_config("swinir", 4),
        preset_config("swinir_lightweight", 3),
        preset_config("swinir_mini", 4, depths=(3, 2), num_heads=(6, 3), mlp_ratio=1.5),
        preset_config("rlfn_s", 4),
        preset_config("rlfn", 3, channels=12, num_blocks=2, convs_per_block=1),
    ]
    for config in cases:
        with torch.device("meta"):
            sd = build_model(config).state_dict()
        assert detect_config(sd) == config


def test_detected_edsr_res_scale_follows_the_known_shapes():
    for name, res_scale in [("edsr", 0.1), ("edsr_baseline", 1.0), ("edsr_mini", 2.0)]:
        with torch.device("meta"):
            sd = build_model(preset_config(name, 2)).state_dict()
        assert detect_config(sd).res_scale == res_scale


def test_params_ema_wins_and_module_prefix_is_stripped(tmp_path):
    model = seeded(build_model(preset_config("rlfn_s", 2)))
    sd = {f"module.{k}": v for k, v in model.state_dict().items()}
    torch.save({"params_ema": sd, "params": {k: v * 0 for k, v in sd.items()}}, tmp_path / "ema.pth")
    loaded, info = load_checkpoint(tmp_path / "ema.pth")
    assert info.wrapper == "params_ema" and any("module." in note for note in info.notes)
    with torch.no_grad():
        assert torch.equal(loaded(INPUT), model(INPUT))


@pytest.mark.slow
def test_swinir_without_deterministic_buffers_still_loads(tmp_path):
    model = seeded(build_model(preset_config("swinir_mini", 2)))
    sd = {
        k: v
        for k, v in model.state_dict().items()
        if not k.endswith(("attn_mask", "relative_position_index"))
    }
    torch.save({"params": sd}, tmp_path / "stripped.pth")
    loaded, info = load_checkpoint(tmp_path / "stripped.pth")
    assert any("deterministic" in note for note in info.notes)
    with torch.no_grad():
        assert torch.equal(loaded(INPUT), model(INPUT))


@pytest.fixture
def rlfn_file(tmp_path):
    sd = seeded(build_model(preset_config("rlfn_s", 2))).state_dict()
    return tmp_path, sd


def save(tmp_path, obj, name="ckpt.pth"):
    path = tmp_path / name
    torch.save(obj, path)
    return path


def test_caller_expectations_that_contradict_the_file(rlfn_file):
    tmp_path, sd = rlfn_file
    path = save(tmp_path, sd)
    with pytest.raises(CheckpointError, match="holds a rlfn model, not swinir"):
        load_checkpoint(path, family="swinir")
    with pytest.raises(CheckpointError, match="x2 model, but x4 was requested"):
        load_checkpoint(path, scale=4)
    with pytest.raises(CheckpointError, match="not preset 'edsr_mini'"):
        load_checkpoint(path, preset="edsr_mini")
    with pytest.raises(
        CheckpointError,
        match=r"does not fit rlfn .*shape conflicts \(conv_1.weight \(48, 3, 3, 3\) in file vs",
    ):
        load_checkpoint(path, preset="rlfn")
    with pytest.raises(UserError, match="unknown family 'vdsr'"):
        load_checkpoint(path, family="vdsr")
    with pytest.raises(UserError, match="unknown preset"):
        load_checkpoint(path, preset="rlfn_xl")
    with pytest.raises(UserError, match="preset 'edsr_mini' is a edsr model, not rlfn"):
        load_checkpoint(path, family="rlfn", preset="edsr_mini")
    with pytest.raises(UserError, match="needs a srcompress model"):
        save_model(torch.nn.Conv2d(3, 3, 1), tmp_path / "plain")
    model, _ = load_checkpoint(path, family="rlfn", scale=2, preset="rlfn_s")
    assert model.config == preset_config("rlfn_s", 2)


def test_missing_unexpected_and_conflicting_keys(rlfn_file):
    tmp_path, sd = rlfn_file
    missing = {k: v for k, v in sd.items() if k != "block_3.c2_r.weight"}
    with pytest.raises(CheckpointError, match=r"1 missing \(block_3.c2_r.weight\)"):
        load_checkpoint(save(tmp_path, missing))
    extra = {**sd, "block_3.extra.weight": torch.zeros(3)}
    with pytest.raises(CheckpointError, match=r"1 unexpected \(block_3.extra.weight\)"):
        load_checkpoint(save(tmp_path, extra))
    conflict = {**sd, "block_2.c1_r.weight": torch.zeros(48, 48, 1, 1)}
    with pytest.raises(
        CheckpointError, match=r"block_2.c1_r.weight \(48, 48, 1, 1\) in file vs \(48, 48, 3, 3\)"
    ):
        load_checkpoint(save(tmp_path, conflict))
    with pytest.raises(CheckpointError, match="lacks block_1.esa.conv1.weight"):
        load_checkpoint(
            save(tmp_path, {k: v for k, v in sd.items() if not k.startswith("block_1.esa.conv1")})
        )


def test_files_that_are_not_checkpoints(tmp_path):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(random.Random(0).randbytes(4096))
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    bad_safetensors = tmp_path / "bad.safetensors"
    bad_safetensors.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    text = tmp_path / "notes.pth"
    text.write_text("hello, these are notes\n")
    for path, reason in (
        (garbage, "the safe unpickler refused it"),  # its first byte reads as a pickle opcode
        (text, "not a file written by torch.save"),
        (empty, "the file is empty"),
        (bad_safetensors, "as safetensors"),
    ):
        with pytest.raises(CheckpointError, match=f"cannot read {path.name} .*{reason}"):
            read_state_dict(path)
    with pytest.raises(CheckpointError, match="no checkpoint file"):
        load_checkpoint(tmp_path / "absent.pth")
    with pytest.raises(CheckpointError, match="holds a list, not a state_dict"):
        load_checkpoint(save(tmp_path, [torch.zeros(2)]))
    with pytest.raises(CheckpointError, match="'lr' holds a float"):
        load_checkpoint(save(tmp_path, {"conv_1.weight": torch.zeros(1), "lr": 0.1}))
    rlfn_keys = {"conv_1.weight": torch.zeros(4, 3, 3, 3), "block_1.c5.weight": torch.zeros(4)}
    with pytest.raises(CheckpointError, match="lacks upsampler.0.weight"):
        load_checkpoint(save(tmp_path, rlfn_keys))
    swin_keys = {"conv_first.weight": torch.zeros(6, 3, 3, 3)}
    swin_keys["layers.0.residual_group.blocks.0.attn.qkv.weight"] = torch.zeros(18, 6)
    swin_keys["layers.0.residual_group.blocks.0.norm1.weight"] = torch.zeros(6)
    swin_keys["layers.0.residual_group.blocks.0.attn.relative_position_bias_table"] = torch.zeros(225)
    swin_keys["layers.0.conv.weight"] = torch.zeros(6, 6, 3, 3)
    with pytest.raises(CheckpointError, match="shapes no supported architecture uses"):
        load_checkpoint(save(tmp_path, swin_keys))
    with pytest.raises(CheckpointError, match="unrecognised architecture.*found encoder.weight"):
        load_checkpoint(save(tmp_path, {"encoder.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match="needs arbitrary code"):
        load_checkpoint(save(tmp_path, build_model(preset_config("rlfn_s", 2))))  # a pickled module


class _Exploit:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_malicious_pickle_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    path = save(tmp_path, {"params": {"conv_1.weight": _Exploit(str(marker))}})
    with pytest.raises(CheckpointError, match="needs arbitrary code to unpickle"):
        load_checkpoint(path)
    assert not marker.exists()


def test_unsupported_swinir_variants_are_named(tmp_path):
    with torch.device("meta"):
        sd = build_model(preset_config("swinir", 4)).state_dict()
    real_world = {k: torch.zeros(1) for k in sd if not k.startswith("upsample.")} | {
        "conv_up1.weight": torch.zeros(1)
    }
    with pytest.raises(CheckpointError, match="nearest\\+conv"):
        detect_config(real_world)


def test_srcompress_directory_errors(tmp_path):
    with pytest.raises(CheckpointError, match="without config.json"):
        load_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="no config.json"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text('{"family": "rlfn", "scale": 5}')
    with pytest.raises(CheckpointError, match="not a valid model config: .*scale"):
        load_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text('{"family": "rlfn", "scale": 2}')
    with pytest.raises(CheckpointError, match="missing weights file"):
        load_checkpoint(tmp_path)
    save_model(build_model(preset_config("rlfn_s", 2)), tmp_path)  # config says C 48, file C 48: fine
    (tmp_path / "config.json").write_text('{"family": "rlfn", "scale": 2, "channels": 52}')
    with pytest.raises(CheckpointError, match="shape conflicts"):
        load_model(tmp_path)


@pytest.mark.slow
def test_bare_safetensors_is_detected(tmp_path):
    from safetensors.torch import save_file

    model = seeded(build_model(preset_config("swinir_mini", 3)))
    save_file(model.state_dict(), tmp_path / "weights.safetensors")
    loaded, info = load_checkpoint(tmp_path / "weights.safetensors", family="swinir", scale=3)
    assert info.config == model.config and info.wrapper == "safetensors"
    with torch.no_grad():
        assert torch.equal(loaded(INPUT), model(INPUT))


# --------------------------------------------------------------------------- the real RLFN weights

REAL_RLFN = {
    "RLFN_x2.pth": ("rlfn", 2, 526_856),
    "RLFN_x4.pth": ("rlfn", 4, 543_740),
    "RLFN_s_x2.pth": ("rlfn_s", 2, 454_620),
    "RLFN_s_x4.pth": ("rlfn_s", 4, 470_208),
}


@pytest.mark.shared
@pytest.mark.parametrize("filename", list(REAL_RLFN))
def test_real_rlfn_weights_load_strictly(shared_weights, filename):
    preset, scale, n_params = REAL_RLFN[filename]
    path = shared_weights / filename
    raw = torch.load(path, map_location="cpu", weights_only=True)
    model, info = load_checkpoint(path)
    assert info.config == preset_config(preset, scale)
    assert (info.wrapper, info.key_scheme) == ("raw", "official")
    state = model.state_dict()
    assert state.keys() == raw.keys()  # unchanged, strict
    assert all(torch.equal(state[k], raw[k]) for k in raw)
    assert sum(p.numel() for p in model.parameters()) == n_params


def y_psnr(sr: np.ndarray, hr: np.ndarray, border: int) -> float:
    """BT.601 Y PSNR on uint8 RGB images, `border` pixels cropped (method.md §6)."""
    weights = np.array([65.481, 128.553, 24.966]) / 255

    def y(img):
        return 16 + img.astype(np.float64) @ weights

    diff = (y(sr) - y(hr))[border:-border, border:-border]
    return 10 * np.log10(255**2 / np.mean(diff**2))


@pytest.mark.slow
@pytest.mark.shared
def test_real_rlfn_s_x2_reproduces_published_set5(shared_weights, shared_data):
    """RLFN-S x2 on Set5: the official code gives 38.047 dB here (data README); bicubic ~33.7."""
    model, _ = load_checkpoint(shared_weights / "RLFN_s_x2.pth")
    set5 = shared_data / "benchmark" / "Set5"
    model_psnr, bicubic_psnr = [], []
    for hr_path in sorted((set5 / "HR").glob("*.png")):
        hr = np.asarray(Image.open(hr_path).convert("RGB"))
        lr = np.asarray(Image.open(set5 / "LR_bicubic" / "X2" / f"{hr_path.stem}x2.png").convert("RGB"))
        x = torch.from_numpy(lr.copy()).permute(2, 0, 1)[None].float() / 255
        with torch.no_grad():
            sr = model(x)
        bicubic = torch.nn.functional.interpolate(x, scale_factor=2, mode="bicubic", align_corners=False)
        to_uint8 = lambda t: (t.clamp(0, 1) * 255).round().byte()[0].permute(1, 2, 0).numpy()
        hr = hr[: sr.shape[2], : sr.shape[3]]
        model_psnr.append(y_psnr(to_uint8(sr), hr, 2))
        bicubic_psnr.append(y_psnr(to_uint8(bicubic), hr, 2))
    print(f"RLFN-S x2 Set5 Y-PSNR {np.mean(model_psnr):.3f} dB (bicubic {np.mean(bicubic_psnr):.3f})")
    assert min(m - b for m, b in zip(model_psnr, bicubic_psnr, strict=True)) > 0.5
    assert np.mean(model_psnr) == pytest.approx(38.047, abs=0.005)
