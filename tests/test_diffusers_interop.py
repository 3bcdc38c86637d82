"""diffusers folders: bit-exact round trips both ways, folders that diffusers' and transformers' own
classes open and run to our numbers, strict loading, and the convert tool end to end."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from helpers import CONFIGS, ROOT, TINY
from ldm.bench import randomize_weights_
from ldm.config import Config, load_config, to_dict
from ldm.convert.diffusers import (
    EXTRA_FILE,
    LDM_CONFIG_KEY,
    WEIGHT_STEMS,
    read_diffusers_config,
    scheduler_config_to_diffusers,
    text_config_to_diffusers,
    unet_config_from_diffusers,
    unet_config_to_diffusers,
    vae_config_to_diffusers,
    write_tokenizer,
)
from ldm.cli.convert import main
from ldm.errors import CheckpointError, ConfigError
from ldm.pipeline import LDMPipeline

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

SMALL = ["sample.height=32", "sample.width=32"]

# SD 1.x-like: HF CLIP, heads by count, 1x1-conv transformer projections.
SD1 = [*SMALL, "model.unet.num_heads=2", "model.unet.num_head_channels=null",
       "model.unet.use_linear_in_transformer=false", "model.text_encoder.trainable=false"]
# SD 2.x-like: OpenCLIP tower read at the penultimate layer, 32-channel heads, linear projections.
SD2 = [*SMALL, "model.text_encoder.kind=open_clip", "model.text_encoder.layers=3", "model.text_encoder.heads=4",
       "model.text_encoder.activation=gelu", "model.text_encoder.layer=penultimate",
       "model.text_encoder.projection_dim=96", "model.diffusion.prediction_type=v"]
# SD 1.x with "clip skip 2".
SD1_SKIP = [*SD1, "model.text_encoder.layers=3", "model.text_encoder.layer=penultimate"]
VARIANTS = {"sd1": SD1, "sd2": SD2, "sd1_skip": SD1_SKIP}


def make_pipe(variant: str, seed: int = 0) -> LDMPipeline:
    pipe = LDMPipeline.from_config(load_config(TINY, VARIANTS[variant]), seed=seed)
    for i, module in enumerate(pipe.modules.values()):
        randomize_weights_(module, seed + i)
    return pipe


def assert_same_weights(a: LDMPipeline, b: LDMPipeline) -> None:
    for name in a.modules:
        sa, sb = a.modules[name].state_dict(), b.modules[name].state_dict()
        assert sa.keys() == sb.keys(), name
        for key in sa:
            assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), f"{name}.{key}"


def folder_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a diffusers folder's components; text names without transformers' optional
    `text_model.` level, so both transformers layouts compare equal."""
    out = {}
    for sub in ("unet", "vae", "text_encoder"):
        for key, value in load_file(folder / sub / f"{WEIGHT_STEMS[sub]}.safetensors").items():
            out[f"{sub}/{key.removeprefix('text_model.')}"] = value
    return out


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_ours_to_diffusers_to_ours_is_bit_exact(tmp_path, variant):
    pipe = make_pipe(variant)
    folder = pipe.save_diffusers(tmp_path / "model")
    back = LDMPipeline.from_diffusers(folder)
    assert_same_weights(pipe, back)
    assert back.model_config == pipe.model_config
    assert back.defaults == pipe.defaults
    # the same folder again, written over the first
    back.save_diffusers(folder)
    assert_same_weights(pipe, LDMPipeline.from_diffusers(folder))


def test_penultimate_text_encoder_is_exported_one_layer_shorter(tmp_path):
    pipe = make_pipe("sd2")
    folder = pipe.save_diffusers(tmp_path / "model")
    text_cfg = json.loads((folder / "text_encoder" / "config.json").read_text())
    assert text_cfg["num_hidden_layers"] == 2 and text_cfg["hidden_act"] == "gelu"
    extra = load_file(folder / "text_encoder" / EXTRA_FILE)
    assert sorted(extra) == sorted(
        ["model.logit_scale", "model.text_projection"]
        + [k for k in pipe.text_encoder.state_dict() if k.startswith("model.transformer.resblocks.2.")]
    )


def _diffusers_models(text_act: str, layers: int):
    """A random diffusers-made model: U-Net, VAE and CLIP text model built from local configs."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64, attention_head_dim=[2, 4], use_linear_projection=True,
    )
    vae = AutoencoderKL(
        block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, sample_size=32,
    )
    text = CLIPTextModel(CLIPTextConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
        hidden_act=text_act, max_position_embeddings=77, projection_dim=64,
    ))
    return unet, vae, text


@pytest.mark.parametrize("kind", ["hf_clip", "open_clip"])
def test_diffusers_to_ours_to_diffusers_is_bit_exact(tmp_path, kind):
    from diffusers import DDIMScheduler

    act = "gelu" if kind == "open_clip" else "quick_gelu"
    unet, vae, text = _diffusers_models(act, layers=2)
    src = tmp_path / "src"
    unet.save_pretrained(src / "unet")
    vae.save_pretrained(src / "vae")
    text.save_pretrained(src / "text_encoder")
    DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                  prediction_type="v_prediction").save_pretrained(src / "scheduler")
    write_tokenizer(src / "tokenizer", kind)  # SD 2.x folders pad with "!": that marks OpenCLIP
    (src / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))

    pipe = LDMPipeline.from_diffusers(src)
    cfg = pipe.model_config
    assert cfg.text_encoder.kind == kind and cfg.text_encoder.layers == 2 and cfg.text_encoder.layer == "last"
    assert cfg.unet.num_head_channels == 16 and cfg.unet.attention_resolutions == (1,)
    assert cfg.diffusion.prediction_type == "v"
    out = pipe.save_diffusers(tmp_path / "out")
    a, b = folder_tensors(src), folder_tensors(out)
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
    # and the diffusers models compute what ours do
    x, ctx = torch.randn(1, 4, 8, 8), torch.randn(1, 77, 64)
    with torch.no_grad():
        torch.testing.assert_close(pipe.unet(x, 10, ctx), unet(x, 10, ctx).sample, atol=1e-5, rtol=1e-5)
        ids = pipe.text_encoder.tokenize(["a red circle"])
        torch.testing.assert_close(pipe.text_encoder(ids), text(input_ids=ids).last_hidden_state, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", ["sd1", "sd2"])
def test_saved_folder_opens_and_runs_in_diffusers(tmp_path, variant):
    from diffusers import AutoencoderKL, DDIMScheduler, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    pipe = make_pipe(variant)
    folder = pipe.save_diffusers(tmp_path / "model")
    unet = UNet2DConditionModel.from_pretrained(folder / "unet").eval()
    vae = AutoencoderKL.from_pretrained(folder / "vae").eval()
    text = CLIPTextModel.from_pretrained(folder / "text_encoder").eval()
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")

    # (no "!" here: transformers matches the SD 2.x pad token "!" inside prompts too, as id 0)
    prompts = ["a red circle", "Two blue squares, left of a tree.", ""]
    ids = pipe.text_encoder.tokenize(prompts)
    theirs = tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    assert torch.equal(theirs.input_ids, ids)

    x, t = torch.randn(2, 4, 8, 8), torch.tensor([3.0, 999.0])
    with torch.no_grad():
        ctx = pipe.text_encoder(ids[:2])
        # the diffusers text model's last hidden state is our conditioning (penultimate for SD 2.x)
        torch.testing.assert_close(text(input_ids=ids[:2]).last_hidden_state, ctx, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(unet(x, t, ctx).sample, pipe.unet(x, t, ctx), atol=1e-4, rtol=1e-4)
        z = torch.randn(1, 4, 8, 8)
        torch.testing.assert_close(vae.decode(z).sample, pipe.vae.decode(z), atol=1e-4, rtol=1e-4)
    assert vae.config.scaling_factor == pipe.vae.scaling_factor

    for cls in (DDIMScheduler, EulerDiscreteScheduler):
        sched = cls.from_pretrained(folder / "scheduler")
        expected = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}[pipe.diffusion.prediction_type]
        assert sched.config.prediction_type == expected
        torch.testing.assert_close(sched.alphas_cumprod.double(), pipe.schedule.alphas_cumprod, atol=1e-6, rtol=1e-5)


def test_stray_or_missing_tensor_is_an_error_naming_it(tmp_path):
    folder = make_pipe("sd1").save_diffusers(tmp_path / "model")
    path = folder / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(path)
    save_file({**state, "down_blocks.0.extra.weight": torch.zeros(2)}, path)
    with pytest.raises(CheckpointError, match=r"unexpected \(1\): down_blocks\.0\.extra\.weight"):
        LDMPipeline.from_diffusers(folder)
    state.pop("conv_in.bias")
    save_file(state, path)
    with pytest.raises(CheckpointError, match=r"missing \(1\): conv_in\.bias"):
        LDMPipeline.from_diffusers(folder)


def test_bin_weights_and_fp16_variants_load(tmp_path):
    pipe = make_pipe("sd1")
    folder = pipe.save_diffusers(tmp_path / "model")
    unet_file = folder / "unet" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(unet_file), unet_file.with_suffix(".bin"))  # a pickle, read with weights_only
    unet_file.unlink()
    vae_file = folder / "vae" / "diffusion_pytorch_model.safetensors"
    half = {k: v.half() for k, v in load_file(vae_file).items()}
    save_file(half, folder / "vae" / "diffusion_pytorch_model.fp16.safetensors")
    vae_file.unlink()
    back = LDMPipeline.from_diffusers(folder)
    for key, value in pipe.unet.state_dict().items():
        assert torch.equal(back.unet.state_dict()[key], value), key
    for key, value in pipe.vae.state_dict().items():
        assert torch.equal(back.vae.state_dict()[key], value.half().float()), key


def test_stale_ldm_config_gives_way_to_the_config_files(tmp_path):
    folder = make_pipe("sd1").save_diffusers(tmp_path / "model")
    path = folder / "scheduler" / "scheduler_config.json"
    sched = json.loads(path.read_text())
    path.write_text(json.dumps({**sched, "prediction_type": "v_prediction"}))
    with pytest.warns(UserWarning, match="no longer matches"):
        cfg = read_diffusers_config(folder)
    assert cfg.model.diffusion.prediction_type == "v"


def test_public_configs_map_to_diffusers_conventions():
    sd15 = load_config(CONFIGS / "sd15.yaml").model
    sd21 = load_config(CONFIGS / "sd21.yaml").model
    u15, u21 = unet_config_to_diffusers(sd15.unet), unet_config_to_diffusers(sd21.unet)
    assert u15["attention_head_dim"] == 8 and not u15["use_linear_projection"]
    assert u21["attention_head_dim"] == [5, 10, 20, 20] and u21["use_linear_projection"]
    assert u15["down_block_types"] == ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
    assert u15["up_block_types"] == ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3
    for m, u in ((sd15, u15), (sd21, u21)):
        assert unet_config_from_diffusers(u) == m.unet  # (attention levels listed as in the YAML: 4, 2, 1)
    assert vae_config_to_diffusers(sd15.vae)["block_out_channels"] == [128, 256, 512, 512]
    t21 = text_config_to_diffusers(sd21.text_encoder)
    assert (t21["num_hidden_layers"], t21["hidden_act"], t21["hidden_size"]) == (23, "gelu", 1024)
    assert text_config_to_diffusers(sd15.text_encoder)["num_hidden_layers"] == 12
    s = scheduler_config_to_diffusers(sd15.diffusion)
    assert (s["beta_schedule"], s["prediction_type"], s["timestep_spacing"], s["steps_offset"]) == (
        "scaled_linear", "epsilon", "leading", 1)
    v = load_config(CONFIGS / "sd21-v.yaml").model.diffusion
    assert scheduler_config_to_diffusers(v)["prediction_type"] == "v_prediction"


def test_layouts_diffusers_cannot_hold_are_refused(tmp_path):
    pipe = LDMPipeline.from_config(load_config(TINY, [*SD1, "model.vae.attn_resolutions=[4]"]))
    with pytest.raises(CheckpointError, match="attn_resolutions"):
        pipe.save_diffusers(tmp_path / "model")
    assert not (tmp_path / "model").exists()
    with pytest.raises(ConfigError, match="resnet_time_scale_shift"):
        unet_config_from_diffusers({**unet_config_to_diffusers(pipe.unet.cfg), "resnet_time_scale_shift": "x"})
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("keep me")
    with pytest.raises(CheckpointError, match="refusing"):
        make_pipe("sd1").save_diffusers(tmp_path / "notes")


def run_tool(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "tools/convert.py", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def test_convert_tool_ours_diffusers_ours(tmp_path):
    pipe = make_pipe("sd2")
    src = pipe.save(tmp_path / "model.safetensors")
    r = run_tool(src, tmp_path / "model_diffusers")
    assert r.returncode == 0, r.stderr
    assert "wrote diffusers folder" in r.stdout
    r = run_tool(tmp_path / "model_diffusers", tmp_path / "back.safetensors")
    assert r.returncode == 0, r.stderr
    assert "wrote ours file" in r.stdout
    assert_same_weights(pipe, LDMPipeline.from_checkpoint(tmp_path / "back.safetensors"))


def convert_main(*args) -> int:
    """The convert tool's main(), in this process (the subprocess test above covers the script)."""
    return main([str(a) for a in args])


def test_convert_tool_single_file_both_ways(tmp_path, capsys):
    pipe = make_pipe("sd1")
    src = pipe.save(tmp_path / "model.safetensors")
    assert convert_main(src, tmp_path / "sd.ckpt") == 0
    assert "wrote single file" in capsys.readouterr().out
    state = torch.load(tmp_path / "sd.ckpt", weights_only=True)["state_dict"]
    assert state["alphas_cumprod"].dtype == torch.float32
    torch.testing.assert_close(state["alphas_cumprod"].double(), pipe.schedule.alphas_cumprod, atol=1e-7, rtol=0)
    arch = tmp_path / "arch.yaml"  # an original file carries no config: the tool is given one
    arch.write_text(yaml.safe_dump(to_dict(Config(model=pipe.model_config, sample=pipe.defaults))))
    assert convert_main(tmp_path / "sd.ckpt", tmp_path / "back.safetensors", "--config", arch,
                        "--prediction-type", "epsilon") == 0
    assert_same_weights(pipe, LDMPipeline.from_checkpoint(tmp_path / "back.safetensors"))
    assert convert_main(src, tmp_path / "half.safetensors", "--to", "single", "--dtype", "fp16") == 0
    half = load_file(tmp_path / "half.safetensors")
    assert half["model.diffusion_model.out.2.weight"].dtype == torch.float16
    assert half["betas"].dtype == torch.float32


def test_convert_tool_reports_bad_input(tmp_path):
    r = run_tool(tmp_path / "missing.safetensors", tmp_path / "out")
    assert r.returncode == 2 and "error:" in r.stderr and "not found" in r.stderr


# ---------------------------------------------------------------------------------------------
# The latent upscaler: StableDiffusionUpscalePipeline folders
# ---------------------------------------------------------------------------------------------

SR = ROOT / "tests" / "configs" / "sr_test.yaml"


def make_upscaler(seed: int = 0) -> LDMPipeline:
    pipe = LDMPipeline.from_config(load_config(SR, ["model.low_res.max_noise_level=300", "model.low_res.noise_level=30"]))
    for i, module in enumerate(pipe.modules.values()):
        randomize_weights_(module, seed + i)
    return pipe


def test_upscaler_round_trips_through_an_upscale_pipeline_folder(tmp_path):
    pipe = make_upscaler()
    folder = pipe.save_diffusers(tmp_path / "x4")
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionUpscalePipeline" and index["max_noise_level"] == 300
    assert index["low_res_scheduler"] == ["diffusers", "DDPMScheduler"]
    unet_cfg = json.loads((folder / "unet" / "config.json").read_text())
    assert unet_cfg["num_class_embeds"] == 400 and unet_cfg["only_cross_attention"] == [True, False]
    assert "class_embedding.weight" in load_file(folder / "unet" / "diffusion_pytorch_model.safetensors")
    back = LDMPipeline.from_diffusers(folder)
    assert_same_weights(pipe, back)
    assert back.model_config == pipe.model_config and back.model_config.low_res.noise_level == 30
    # without our stored config (a folder made elsewhere) the low-res schedule and max noise level still come through
    del index[LDM_CONFIG_KEY]
    (folder / "model_index.json").write_text(json.dumps(index))
    derived = read_diffusers_config(folder).model
    assert derived.low_res == dataclasses.replace(pipe.model_config.low_res, noise_level=20)
    assert derived.unet == pipe.model_config.unet


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # diffusers' numpy use
def test_upscale_matches_diffusers_upscale_pipeline(tmp_path):
    """The same random weights through diffusers' StableDiffusionUpscalePipeline and ours: the input
    noise-augmented by its DDPMScheduler at the same level with the same noise, concatenated after
    the latents, the noise level as class label, v prediction, guidance, Euler steps, decoding."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionUpscalePipeline
    from PIL import Image

    pipe = make_upscaler()
    folder = pipe.save_diffusers(tmp_path / "x4")
    theirs = StableDiffusionUpscalePipeline.from_pretrained(folder)
    theirs.scheduler = EulerDiscreteScheduler.from_config(theirs.scheduler.config, timestep_spacing="trailing")
    theirs.set_progress_bar_config(disable=True)
    pixels = (torch.rand(16, 20, 3, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
    image = Image.fromarray(pixels.numpy())
    with torch.no_grad():
        # prompt embeddings given directly: our tiny text encoder reads 16 tokens, their tokenizer pads to 77
        expected = theirs(prompt_embeds=pipe.encode_prompt(["a red circle"]), negative_prompt_embeds=pipe.encode_prompt([""]),
                          image=image, num_inference_steps=4, guidance_scale=3.0, noise_level=40,
                          generator=torch.Generator().manual_seed(7), output_type="pt").images
    ours = pipe.upscale(image, "a red circle", noise_level=40, steps=4, cfg=3.0, sampler="euler", spacing="trailing",
                        seed=7, output_type="tensor", progress=False)
    assert ours.shape == expected.shape == (1, 3, 64, 80)
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=0)
