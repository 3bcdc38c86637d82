"""Speed switches (ldm.speed): each switch, alone and combined, matches the plain float32 path for
the U-Net, the VAE and whole pipelines; fused layers save the same checkpoint; compiled U-Nets do
not recompile across steps and prompts; CUDA graphs fail clearly off CUDA; VAE tiling is close to
untiled decoding and exact when one tile covers the image; a fixed U-Net batch shape makes each
picture independent of the batch it runs in, bit for bit; bad switch values name the fix; the
training switches leave the loss, the gradients and the state-dict keys unchanged."""

import copy
import functools
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from helpers import FAST, TINY, randomize
from ldm import LDMPipeline
from ldm.config import COMPILE_MODES, UNetConfig, VAEConfig, load_config
from ldm.errors import ConfigError
from ldm.models.unet import UNet
from ldm.models.vae import AutoencoderKL
from ldm.speed import CUDAGraphRunner, SpeedConfig, optimize_unet, optimize_vae, speed_config, tiled_apply


# Every switch that runs on a CPU, alone, then all of them together.
SWITCHES = {
    "channels_last": dict(channels_last=True),
    "fuse_qkv": dict(fuse_qkv=True),
    "fused_norm_act": dict(fused_norm_act=True),
    "no_vae_slicing": dict(vae_slicing=False),
    "all": dict(channels_last=True, fuse_qkv=True, fused_norm_act=True, vae_slicing=False),
}


def tiny_unet() -> UNet:
    torch.manual_seed(0)
    cfg = UNetConfig(model_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(1, 2),
                     num_heads=None, num_head_channels=8, context_dim=12, norm_groups=8,
                     use_linear_in_transformer=True)
    return randomize(UNet(cfg), seed=0, scale=0.05).eval()


def tiny_vae() -> AutoencoderKL:
    torch.manual_seed(0)
    return randomize(AutoencoderKL(VAEConfig(ch=16, ch_mult=(1, 2, 2), num_res_blocks=1, norm_groups=8)), seed=0,
                     scale=0.05).eval()


def unet_inputs(b: int = 2, size: int = 8) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x, context = torch.randn(b, 4, size, size, generator=g), torch.randn(b, 5, 12, generator=g)
    return x, torch.tensor([10.0, 700.0])[:b], context


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.float() - ref.float()).norm() / ref.float().norm()).item()


def gen(p: LDMPipeline, **kw) -> torch.Tensor:
    return p.generate("a red circle", steps=2, seed=0, progress=False, output_type="tensor", **kw)


def fresh_pipe() -> LDMPipeline:
    p = LDMPipeline.from_config(TINY, FAST, seed=0)
    for m in p.modules.values():
        randomize(m, seed=0, scale=0.02)
    return p


@pytest.fixture(scope="module")
def pipe() -> LDMPipeline:
    return fresh_pipe()


# ---------------------------------------------------------------------------------------------
# Every switch matches the plain float32 path
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", SWITCHES)
def test_unet_switch_matches_reference(name):
    ref = tiny_unet()
    fast = optimize_unet(copy.deepcopy(ref), SpeedConfig(**SWITCHES[name]))
    x, t, context = unet_inputs()
    with torch.no_grad():
        expected = ref(x, t, context)
        torch.testing.assert_close(fast(x, t, context), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(fast(x, 10.0, context[:1].expand(2, -1, -1)),
                                   ref(x, 10.0, context[:1].expand(2, -1, -1)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", SWITCHES)
def test_vae_switch_matches_reference(name):
    ref = tiny_vae()
    fast = optimize_vae(copy.deepcopy(ref), SpeedConfig(**SWITCHES[name]))
    g = torch.Generator().manual_seed(2)
    images, z = torch.rand(2, 3, 16, 16, generator=g) * 2 - 1, torch.randn(2, 4, 4, 4, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(fast.encode(images).mean, ref.encode(images).mean, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(fast.decode(z), ref.decode(z), rtol=1e-5, atol=1e-5)


def test_generate_img2img_inpaint_with_all_switches_match_the_plain_path(pipe):
    image = gen(pipe, num_images=2)
    mask = torch.zeros(32, 32)
    mask[8:24, 8:24] = 1
    plain = [image, pipe.img2img(image, "a cat", steps=2, seed=0, progress=False, output_type="tensor"),
             pipe.inpaint(image[:1], mask, "a cat", steps=2, seed=0, progress=False, output_type="tensor")]
    try:
        pipe.optimize(**SWITCHES["all"])
        fast = [gen(pipe, num_images=2),
                pipe.img2img(image, "a cat", steps=2, seed=0, progress=False, output_type="tensor"),
                pipe.inpaint(image[:1], mask, "a cat", steps=2, seed=0, progress=False, output_type="tensor")]
    finally:
        pipe.optimize()
    for a, b in zip(fast, plain):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    assert torch.equal(gen(pipe, num_images=2), image)  # optimize() restores the plain path exactly


def test_bf16_fast_path_is_close_to_the_fp32_reference(pipe):
    ref = tiny_unet()
    x, t, context = unet_inputs()
    with torch.no_grad():
        expected = ref(x, t, context)
        plain = copy.deepcopy(ref).to(torch.bfloat16)(x.bfloat16(), t, context.bfloat16())
        fast = optimize_unet(copy.deepcopy(ref).to(torch.bfloat16), SpeedConfig(**SWITCHES["all"]))
        out = fast(x.bfloat16(), t, context.bfloat16())
    assert out.dtype == torch.bfloat16
    # bf16 keeps 8 bits of mantissa; in this random-weight U-Net the plain bf16 path is itself
    # 1.3e-2 off (measured; 0.6e-2 of that from rounding the weights), and the fast path no worse
    assert rel_err(out, expected) < 2e-2
    assert rel_err(out, expected) < 1.1 * rel_err(plain, expected)
    # whole pipeline (text encoder, U-Net, VAE in bf16): measured 0.7e-2
    half = copy.deepcopy(pipe).to(dtype="bf16").optimize(**SWITCHES["all"])
    assert rel_err(gen(half), gen(pipe)) < 1e-2


# ---------------------------------------------------------------------------------------------
# Checkpoints are unaffected
# ---------------------------------------------------------------------------------------------


def test_fused_qkv_saves_and_loads_the_same_keys_and_tensors(pipe, tmp_path):
    plain_file = pipe.save(tmp_path / "plain.safetensors")
    plain = pipe.unet.state_dict()
    try:
        pipe.optimize(fuse_qkv=True, fused_norm_act=True, channels_last=True)
        attn = pipe.unet.middle_block[1].transformer_blocks[0]
        assert attn.attn1.fused == "qkv" and attn.attn2.fused == "kv" and not hasattr(attn.attn1, "to_q")
        fused = pipe.unet.state_dict()
        assert list(fused) == list(plain)  # same keys, same order
        assert all(torch.equal(fused[k], plain[k]) for k in plain)
        fused_file = pipe.save(tmp_path / "fused.safetensors")
        a, b = load_file(str(plain_file)), load_file(str(fused_file))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        # a fused model loads an ordinary state dict strictly, into its fused weights
        other = optimize_unet(copy.deepcopy(pipe.unet), SpeedConfig(fuse_qkv=True)).unet
        with torch.no_grad():
            for p in other.parameters():
                p.zero_()
        other.load_state_dict(plain, strict=True)
        prefix = "middle_block.1.transformer_blocks.0.attn1"
        assert torch.equal(other.get_submodule(prefix).to_qkv.weight,
                           torch.cat([plain[f"{prefix}.to_{n}.weight"] for n in "qkv"]))
    finally:
        pipe.optimize()
    assert list(pipe.unet.state_dict()) == list(plain) and hasattr(attn.attn1, "to_q")  # unfused again
    assert LDMPipeline.from_checkpoint(fused_file).model_config == pipe.model_config


# ---------------------------------------------------------------------------------------------
# torch.compile and CUDA graphs
# ---------------------------------------------------------------------------------------------


def test_compiled_unet_matches_eager_and_never_recompiles_across_steps_and_prompts(monkeypatch):
    """Dynamo, the front end, decides what recompiles (a backend only turns graphs into code): run
    it with the "eager" backend, which needs no C compiler and compiles in seconds."""
    from torch._dynamo.utils import counters

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    torch._dynamo.reset()
    counters.clear()
    ref = tiny_unet()
    fast = optimize_unet(copy.deepcopy(ref), SpeedConfig(compile="default", channels_last=True, fuse_qkv=True))
    x, _, context = unet_inputs()
    with torch.no_grad():
        for i, t in enumerate([999.0, torch.tensor(500.0), torch.tensor([250.0, 250.0]), 1.5, 0]):
            prompt = context + i  # a new prompt every call
            torch.testing.assert_close(fast(x, t, prompt), ref(x, t, prompt), rtol=1e-5, atol=1e-5)
    assert counters["stats"]["unique_graphs"] == 1
    torch._dynamo.reset()


@pytest.mark.slow  # Inductor takes ~1 minute to compile even a tiny U-Net on 2 CPU cores
def test_inductor_compiled_unet_matches_eager():
    if shutil.which(os.environ.get("CXX", "g++")) is None:
        pytest.skip("Inductor's CPU backend needs a C++ compiler (g++ or $CXX)")
    torch._dynamo.reset()
    ref = tiny_unet()
    fast = optimize_unet(copy.deepcopy(ref), SpeedConfig(compile="default"))
    x, t, context = unet_inputs()
    with torch.no_grad():
        torch.testing.assert_close(fast(x, t, context), ref(x, t, context), rtol=1e-4, atol=1e-4)
    torch._dynamo.reset()


def test_cuda_graphs_off_cuda_name_the_fix():
    fix = r"cuda_graphs needs .* CUDA device \(got cpu\).*pipe.to\('cuda'\).*cuda_graphs=False"
    with pytest.raises(RuntimeError, match=fix):
        optimize_unet(tiny_unet(), SpeedConfig(cuda_graphs=True))
    runner = CUDAGraphRunner(lambda x: x + 1, torch.nn.Linear(1, 1))
    with pytest.raises(RuntimeError, match="cuda_graphs=False"):
        runner(torch.zeros(2))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
def test_cuda_graph_replays_match_eager_and_recapture_on_a_new_shape():
    ref = tiny_unet().cuda()
    fast = optimize_unet(copy.deepcopy(ref), SpeedConfig(cuda_graphs=True, channels_last=True))
    with torch.inference_mode():
        for b, size in [(2, 8), (2, 8), (1, 16), (2, 8)]:
            x, t, context = (a.cuda() for a in unet_inputs(b, size))
            first = fast(x, t, context)
            torch.testing.assert_close(first, ref(x, t, context), rtol=1e-4, atol=1e-4)
            second = fast(x + 1, t, context)  # replay with new values; the first result stays valid
            torch.testing.assert_close(second, ref(x + 1, t, context), rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(first, ref(x, t, context), rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# VAE tiling
# ---------------------------------------------------------------------------------------------


def test_tiles_of_a_pointwise_function_blend_back_exactly():
    x = torch.randn(2, 3, 20, 28)
    for tile, overlap in [(8, 4), (8, 0), (12, 3), (5, 4)]:
        torch.testing.assert_close(tiled_apply(torch.tanh, x, tile, overlap), torch.tanh(x), rtol=1e-6, atol=1e-6)

    def up(t: torch.Tensor) -> torch.Tensor:  # a decoder-like 4x upscale
        return torch.tanh(t).repeat_interleave(4, -1).repeat_interleave(4, -2)

    torch.testing.assert_close(tiled_apply(up, x, 8, 4), up(x), rtol=1e-6, atol=1e-6)


def test_tiled_vae_is_close_to_untiled_and_exact_when_one_tile_covers_the_image():
    vae = tiny_vae()  # downsampling factor 4
    tiled = optimize_vae(copy.deepcopy(vae), SpeedConfig(vae_tiling=True, vae_tile_size=16, vae_tile_overlap=8))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        small = torch.randn(2, 4, 16, 12, generator=g)  # fits one tile: the plain path, bit for bit
        assert torch.equal(tiled.decode(small), optimize_vae(copy.deepcopy(vae), SpeedConfig()).decode(small))
        z = torch.randn(1, 4, 24, 24, generator=g)  # 2 x 2 tiles
        ref, out = vae.decode(z), tiled.decode(z)
        assert out.shape == ref.shape == (1, 3, 96, 96)
        # Blending itself is exact (test above); what differs is that GroupNorm statistics and the
        # mid-block attention see one tile, not the whole image. Measured on this random-weight VAE:
        # decode 0.15 relative error (0.08 with 20-latent tiles, 0.49 with 8), encode 0.07.
        assert rel_err(out, ref) < 0.2
        images = torch.rand(1, 3, 96, 96, generator=g) * 2 - 1
        assert rel_err(tiled.encode(images).mean, vae.encode(images).mean) < 0.1


# ---------------------------------------------------------------------------------------------
# Bad values name the fix
# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# A fixed U-Net batch shape: rows independent of the batch they run in
# ---------------------------------------------------------------------------------------------


def test_fixed_batch_makes_rows_independent_of_the_batch():
    """With fixed_batch, each row of a batch equals its solo run bit for bit, in any order; the
    U-Net only ever sees the fixed number of rows."""
    pipe = fresh_pipe()
    pipe.optimize(fixed_batch=8)
    seen = []
    pipe.unet.register_forward_hook(lambda m, i, o: seen.append(o.shape[0]))
    prompts = ["a red circle", "a blue square", "a green triangle", "a yellow star"]

    def run(idx, sampler):
        gens = [torch.Generator().manual_seed(10 + i) for i in idx]
        return pipe.generate([prompts[i] for i in idx], generator=gens, steps=3, sampler=sampler,
                             output_type="tensor", progress=False)

    for sampler in ("euler_a", "dpmpp_2m_karras"):
        solo = [run([i], sampler) for i in range(4)]
        for order in ([0, 1, 2, 3], [3, 1, 0], [2, 0]):
            out = run(order, sampler)
            for row, i in enumerate(order):
                assert torch.equal(out[row : row + 1], solo[i]), (sampler, order, i)
    assert set(seen) == {8}
    assert (solo[0] - solo[1]).abs().max() > 1e-3  # different prompts and seeds: different pictures


def test_fixed_batch_splits_more_rows_than_it_holds():
    pipe = fresh_pipe()
    gens = lambda: [torch.Generator().manual_seed(k) for k in range(5)]  # noqa: E731
    pipe.optimize(fixed_batch=4)  # 5 pictures with CFG: 10 rows in calls of 4, 4, 2 + 2 padding
    split = pipe.generate(["x"] * 5, generator=gens(), steps=2, output_type="tensor", progress=False)
    pipe.optimize(fixed_batch=16)
    whole = pipe.generate(["x"] * 5, generator=gens(), steps=2, output_type="tensor", progress=False)
    torch.testing.assert_close(split, whole, atol=1e-5, rtol=0)


def test_fixed_batch_is_checked():
    with pytest.raises(ValueError, match="fixed_batch must be >= 0"):
        speed_config(fixed_batch=-2)
    with pytest.raises(TypeError, match="fixed_batch must be an integer"):
        speed_config(fixed_batch=2.5)


def test_bad_switch_values_are_reported(pipe):
    with pytest.raises(ValueError, match="unknown compile mode 'fast'; valid modes: " + ", ".join(COMPILE_MODES)):
        pipe.optimize(compile="fast")
    with pytest.raises(TypeError, match="channels_last must be True or False"):
        SpeedConfig(channels_last="yes").validate()
    with pytest.raises(TypeError, match="unknown speed switch 'fuse_qvk'; did you mean 'fuse_qkv'"):
        pipe.optimize(fuse_qvk=True)
    with pytest.raises(ValueError, match="already captures CUDA graphs; set cuda_graphs=False"):
        speed_config(cuda_graphs=True, compile="reduce-overhead")
    with pytest.raises(ValueError, match="vae_tile_overlap < vae_tile_size"):
        speed_config(vae_tile_size=8, vae_tile_overlap=8)
    with pytest.raises(ValueError, match="not both"):
        speed_config(SpeedConfig(), fuse_qkv=True)
    with pytest.raises(ConfigError, match="train.compile must be one of default, "):
        load_config(TINY, ["train.compile=fastest"])
    assert pipe.speed == SpeedConfig()  # a rejected call changes nothing


# ---------------------------------------------------------------------------------------------
# Training switches
# ---------------------------------------------------------------------------------------------


def test_training_switches_keep_the_loss_gradients_and_state_dict_keys(tmp_path, monkeypatch):
    """One step with train.channels_last and train.compile (Dynamo with its "eager" backend, see
    above) against one without."""
    from ldm.checkpoint import save_model_file
    from ldm.train.ldm_trainer import LDMTrainer

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    torch._dynamo.reset()
    overrides = FAST + ["data.resolution=16", "train.batch_size=2", "train.log_with=none", "train.ema_decay=0",
                        f"train.output_dir={tmp_path}"]
    cfg = load_config(TINY, overrides)
    torch.manual_seed(0)
    vae_file = save_model_file(tmp_path / "vae.safetensors", {"vae": AutoencoderKL(cfg.model.vae)}, cfg)
    results = []
    for switches in ([], ["train.channels_last=true", "train.compile=default"]):
        trainer = LDMTrainer(load_config(TINY, [*overrides, f"train.vae_checkpoint={vae_file}", *switches]))
        randomize(trainer.unet, seed=0, scale=0.05)
        assert trainer.unet.input_blocks[0][0].weight.is_contiguous(memory_format=torch.channels_last) == bool(switches)
        loss = trainer.loss(next(trainer.batches()), 0, 0)
        loss.backward()
        results.append((loss.detach(), {k: p.grad.clone() for k, p in trainer.unet.named_parameters()},
                        list(trainer.unet.state_dict())))
    torch._dynamo.reset()
    (loss_a, grads_a, keys_a), (loss_b, grads_b, keys_b) = results
    assert keys_a == keys_b
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=1e-6)
    assert grads_a.keys() == grads_b.keys()
    for k in grads_a:  # fp32 sums in another order: a few elements differ by ~1e-6
        assert (grads_b[k] - grads_a[k]).norm() <= 1e-4 * grads_a[k].norm() + 1e-6, k
