"""LoRA: kohya and peft files applied by us and by diffusers' load_lora_weights give the same U-Net
and text-encoder outputs; our kohya export loads in diffusers and matches; fuse/unfuse/unload
restore the weights bit for bit; bad files change nothing and say why."""

from __future__ import annotations

import fractions
import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_diffusers_interop import make_pipe
from test_tools import run_tool

from helpers import random_lora
from ldm.convert.lora import read_lora, save_lora
from ldm.errors import CheckpointError
from ldm.models.lora import LoRANetwork

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")  # diffusers applies LoRAs through peft
pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["a red circle", "two blue squares, left of a tree"]
TOLERANCE = 1e-4  # max relative error (max |ours - theirs| / max |theirs|), fp32


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def pair(request, tmp_path_factory):
    """Our pipeline and a diffusers StableDiffusionPipeline with the same random weights."""
    from diffusers import StableDiffusionPipeline

    ours = make_pipe(request.param)
    folder = ours.save_diffusers(tmp_path_factory.mktemp(request.param) / "model")
    theirs = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    theirs.set_progress_bar_config(disable=True)
    return request.param, ours, theirs


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def outputs(ours, theirs=None, ctx: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Text-encoder and U-Net outputs of both pipelines on the same inputs (the U-Nets' context:
    diffusers' text encoder output, or `ctx`)."""
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([3.0, 700.0])
    ids = ours.text_encoder.tokenize(PROMPTS)
    with torch.no_grad():
        out = {"text_ours": ours.text_encoder(ids)}
        if theirs is not None:
            ctx = out["text_theirs"] = theirs.text_encoder(input_ids=ids).last_hidden_state
            out["unet_theirs"] = theirs.unet(x, t, ctx).sample
        out["unet_ours"] = ours.unet(x, t, ctx)
        return out


def assert_match(out: dict[str, torch.Tensor], base: dict[str, torch.Tensor] | None = None) -> None:
    for part in ("text", "unet"):
        assert rel(out[f"{part}_ours"], out[f"{part}_theirs"]) <= TOLERANCE, part
        if base is not None:  # and the LoRA did change the outputs
            assert rel(out[f"{part}_ours"], base[f"{part}_ours"]) > 1e-2, part


def kohya_lora(theirs, path, seed: int = 0) -> dict[str, torch.Tensor]:
    """A kohya-layout LoRA/LoCon file named from diffusers' own module tree: attention, resnets
    (3x3 convs, shortcuts, time projections), down/upsamplers; CLIP attention and MLP layers."""
    g = torch.Generator().manual_seed(seed)
    sd = {}

    def add(name: str, m: torch.nn.Module, rank: int, alpha: float) -> None:
        if isinstance(m, torch.nn.Linear):
            down, up = torch.randn(rank, m.in_features, generator=g), torch.randn(m.out_features, rank, generator=g)
        else:
            down = torch.randn(rank, m.in_channels, *m.kernel_size, generator=g)
            up = torch.randn(m.out_channels, rank, 1, 1, generator=g)
        sd[f"{name}.lora_down.weight"] = down * 0.2
        sd[f"{name}.lora_up.weight"] = up * 0.2
        sd[f"{name}.alpha"] = torch.tensor(alpha)

    for name, m in theirs.unet.named_modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and name.startswith(("down_blocks", "mid_block", "up_blocks")):
            conv3 = isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)
            add("lora_unet_" + name.replace(".", "_"), m, 2 if conv3 else 4, 1.0 if conv3 else 2.0)
    for name, m in theirs.text_encoder.named_modules():
        if isinstance(m, torch.nn.Linear) and (".self_attn." in name or ".mlp." in name):
            name = name if name.startswith("text_model.") else "text_model." + name  # transformers 5
            add("lora_te_" + name.replace(".", "_"), m, 4, 3.0)
    save_file(sd, str(path))
    return sd


def test_kohya_lora_matches_diffusers(pair, tmp_path):
    variant, ours, theirs = pair
    path = tmp_path / "style.safetensors"
    kohya_lora(theirs, path)
    base = outputs(ours, theirs)
    name = ours.load_lora(path, scale=0.7)
    theirs.load_lora_weights(str(path), adapter_name="style")
    theirs.set_adapters(["style"], [0.7])
    try:
        assert name == "style" and ours.lora_scales == {"style": 0.7}
        assert_match(outputs(ours, theirs), base)
        ours.fuse_lora()  # merged into the weights: the same outputs
        assert_match(outputs(ours, theirs), base)
    finally:
        ours.unload_lora()
        theirs.unload_lora_weights()
    after = outputs(ours, theirs)
    for key in ("text_ours", "unet_ours"):
        assert torch.equal(after[key], base[key])


def test_peft_lora_matches_diffusers_and_older_layouts_match_it(pair, tmp_path):
    import copy

    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    variant, ours, theirs = pair
    base = outputs(ours, theirs)
    unet_cfg = LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian",
                          target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in", "ff.net.2"],
                          rank_pattern={"to_v": 2}, alpha_pattern={"to_v": 1})
    text_cfg = LoraConfig(r=4, lora_alpha=2, init_lora_weights="gaussian",
                          target_modules=["q_proj", "k_proj", "v_proj", "out_proj", "fc1"])
    # a LoRA trained with peft: adapters injected into copies of diffusers' networks
    unet, text = copy.deepcopy(theirs.unet), copy.deepcopy(theirs.text_encoder)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)  # peft draws lora_A from the global generator
        inject_adapter_in_model(unet_cfg, unet, adapter_name="made")
        inject_adapter_in_model(text_cfg, text, adapter_name="made")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # peft starts lora_B at zero; give it values
        for module in (unet, text):
            for n, p in module.named_parameters():
                if "lora_B" in n:
                    # not larger: a random tiny U-Net perturbed this much turns ill-conditioned (a 1e-7
                    # change of its input moves the output by 1e-5), and float32 rounding alone then
                    # separates any two implementations, diffusers' fused and unfused ones included
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    unet_sd = get_peft_model_state_dict(unet, adapter_name="made")
    text_sd = get_peft_model_state_dict(text, adapter_name="made")
    if not any(k.startswith("text_model.") for k in text_sd):  # transformers 5: as published files name them
        text_sd = {"text_model." + k: v for k, v in text_sd.items()}
    metadata = {"unet_lora_adapter_metadata": unet_cfg.to_dict(), "text_encoder_lora_adapter_metadata": text_cfg.to_dict()}

    def save(name: str, unet_layers: dict, text_layers: dict):
        StableDiffusionPipeline.save_lora_weights(tmp_path, unet_lora_layers=unet_layers, text_encoder_lora_layers=text_layers,
                                                  weight_name=name, **metadata)
        return tmp_path / name

    path = save("peft.safetensors", unet_sd, text_sd)
    ours.load_lora(path)
    theirs.load_lora_weights(str(path), adapter_name="made")
    try:
        reference = outputs(ours, theirs)
        assert_match(reference, base)
    finally:
        ours.unload_lora()
        theirs.unload_lora_weights()

    # the same LoRA in diffusers' own key layouts (lora.down / lora_linear_layer, and the older
    # attention-processor names) gives the same outputs to the bit
    unet_d, text_d = convert_state_dict_to_diffusers(unet_sd), convert_state_dict_to_diffusers(text_sd)
    processor = [(".to_out.0.lora.", ".processor.to_out_lora."), (".to_q.lora.", ".processor.to_q_lora."),
                 (".to_k.lora.", ".processor.to_k_lora."), (".to_v.lora.", ".processor.to_v_lora."),
                 (".q_proj.lora_linear_layer.", ".to_q_lora."), (".k_proj.lora_linear_layer.", ".to_k_lora."),
                 (".v_proj.lora_linear_layer.", ".to_v_lora."), (".out_proj.lora_linear_layer.", ".to_out_lora.")]

    def old(sd: dict) -> dict:
        out = {}
        for key, value in sd.items():
            for a, b in processor:
                key = key.replace(a, b)
            out[key] = value
        return out

    for name, layers_ in (("diffusers.safetensors", (unet_d, text_d)), ("processor.safetensors", (old(unet_d), old(text_d)))):
        assert set(layers_[0]) != set(unet_sd)
        ours.load_lora(save(name, *layers_))
        try:
            again = outputs(ours, ctx=reference["text_theirs"])
            assert torch.equal(again["text_ours"], reference["text_ours"]), name
            assert torch.equal(again["unet_ours"], reference["unet_ours"]), name
        finally:
            ours.unload_lora()


def test_our_kohya_export_loads_in_diffusers_and_matches(pair, tmp_path):
    variant, ours, theirs = pair
    src = tmp_path / "src.safetensors"
    kohya_lora(theirs, src, seed=3)
    ours.load_lora(src, name="src")
    out = ours.save_lora(tmp_path / "export.safetensors", metadata={"ss_learning_rate": "0.0001"})
    ours.unload_lora()

    base = outputs(ours, theirs)
    ours.load_lora(out, scale=0.5)
    theirs.load_lora_weights(str(out), adapter_name="export")
    theirs.set_adapters(["export"], [0.5])
    try:
        assert_match(outputs(ours, theirs), base)
    finally:
        ours.unload_lora()
        theirs.unload_lora_weights()

    # the export holds the source's tensors under the same kohya names, with ss_* metadata
    a, b = load_file(str(src)), load_file(str(out))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key].float(), b[key].float()), key
    from safetensors import safe_open

    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_learning_rate"] == "0.0001"
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] in ("2", "3")
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "2", "conv_alpha": "1"}
    assert meta["ss_v2"] == str(variant == "sd2")


# ---------------------------------------------------------------------------------------------
# Applying, fusing, unloading (no diffusers needed)
# ---------------------------------------------------------------------------------------------


@pytest.fixture()
def tiny():
    return make_pipe("sd2")  # OpenCLIP tower: q/k/v LoRAs land in row blocks of in_proj_weight


def run(pipe) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(1, 4, 8, 8, generator=g), torch.tensor([500.0])
    with torch.no_grad():
        return pipe.unet(x, t, pipe.text_encoder(pipe.text_encoder.tokenize(["a red circle"])))


def state(pipe) -> dict[str, torch.Tensor]:
    return {f"{n}.{k}": v.clone() for n, m in pipe.modules.items() for k, v in m.state_dict().items()}


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    bad = [k for k in a if not torch.equal(a[k], b[k])]
    assert not bad, bad[:3]


def test_fuse_unfuse_and_unload_restore_the_weights_bit_for_bit(tiny, tmp_path):
    original, base = state(tiny), run(tiny)
    a, b = random_lora(tiny, 1), random_lora(tiny, 2)
    save_lora(tmp_path / "a.safetensors", a.weights(), tiny.model_config)
    save_lora(tmp_path / "b.safetensors", b.weights(), tiny.model_config)
    tiny.load_lora(tmp_path / "a.safetensors", 0.8)
    assert_same_state(state(tiny), original)  # hooks: weights untouched
    one = run(tiny)
    tiny.load_lora(tmp_path / "b.safetensors", -0.5)
    hooked = run(tiny)
    tiny.fuse_lora()
    assert not any(lora.attached for lora in tiny.loras.loras.values())
    torch.testing.assert_close(run(tiny), hooked, rtol=1e-5, atol=1e-5)
    tiny.set_lora_scale("b", 0.0)  # re-merged from the originals: only a remains
    torch.testing.assert_close(run(tiny), one, rtol=1e-5, atol=1e-5)
    tiny.unfuse_lora()
    assert_same_state(state(tiny), original)
    torch.testing.assert_close(run(tiny), one, rtol=1e-5, atol=1e-5)
    tiny.fuse_lora()
    tiny.unload_lora("a")
    tiny.unload_lora("b")
    assert_same_state(state(tiny), original)
    assert torch.equal(run(tiny), base) and tiny.lora_scales == {}


def test_saved_model_has_fused_loras_baked_in_and_no_keys_changed(tiny, tmp_path):
    from ldm.pipeline import LDMPipeline

    net = random_lora(tiny, 4)
    save_lora(tmp_path / "l.safetensors", net.weights(), tiny.model_config)
    tiny.load_lora(tmp_path / "l.safetensors")
    with_lora = run(tiny)
    tiny.save(tmp_path / "plain.safetensors")  # hooks: the file holds the base weights
    tiny.fuse_lora()
    tiny.save(tmp_path / "baked.safetensors")
    tiny.unload_lora()
    plain = LDMPipeline.from_checkpoint(tmp_path / "plain.safetensors")
    baked = LDMPipeline.from_checkpoint(tmp_path / "baked.safetensors")
    assert torch.equal(run(plain), run(tiny))
    torch.testing.assert_close(run(baked), with_lora, rtol=1e-5, atol=1e-5)


def test_loras_follow_fused_attention_projections(tiny, tmp_path):
    save_lora(tmp_path / "l.safetensors", random_lora(tiny, 5).weights(), tiny.model_config)
    original = state(tiny)
    tiny.load_lora(tmp_path / "l.safetensors")
    hooked = run(tiny)
    tiny.optimize(fuse_qkv=True)  # to_q/k/v become one Linear: the hooks move to its row blocks
    torch.testing.assert_close(run(tiny), hooked, rtol=1e-5, atol=1e-5)
    tiny.fuse_lora()
    torch.testing.assert_close(run(tiny), hooked, rtol=1e-5, atol=1e-5)
    tiny.unfuse_lora()
    tiny.optimize()
    assert_same_state(state(tiny), original)
    torch.testing.assert_close(run(tiny), hooked, rtol=1e-5, atol=1e-5)
    tiny.unload_lora()


def test_a_new_lora_trains_only_its_adapters_and_saves_kohya_with_settings(tiny, tmp_path):
    from ldm.convert.lora import layers

    index = layers(tiny.model_config.unet, tiny.model_config.text_encoder)
    targets = sorted({lay.target for lay in index.values() if ".attn" in lay.target.key}, key=str)
    base = run(tiny)
    for module in tiny.modules.values():
        module.requires_grad_(False)
    net = LoRANetwork.create(tiny.modules, targets, rank=2, alpha=1.0)
    net.attach(tiny.modules)
    assert torch.equal(run(tiny), base)  # up starts at zero
    x = torch.randn(1, 4, 8, 8)
    ctx = tiny.text_encoder(tiny.text_encoder.tokenize(["a red circle"]))
    tiny.unet(x, torch.tensor([10.0]), ctx).square().mean().backward()
    unet_adapters = [a for t, a in zip(net.targets, net.adapters) if t.network == "unet"]
    assert unet_adapters and all(a.up.grad is not None and a.up.grad.abs().sum() > 0 for a in unet_adapters)
    assert all(p.grad is None for m in tiny.modules.values() for p in m.parameters())
    net.detach()
    path = save_lora(tmp_path / "trained.safetensors", net.weights(), tiny.model_config,
                     metadata={"ss_learning_rate": "0.0001", "ss_max_train_steps": "100"})
    weights, meta = read_lora(path, tiny.model_config)
    assert meta["ss_max_train_steps"] == "100" and meta["ss_network_dim"] == "2" and meta["ss_network_alpha"] == "1"
    assert set(weights) == set(targets)
    for target, w in net.weights().items():
        assert torch.equal(weights[target].down, w.down) and weights[target].alpha == 1.0


# ---------------------------------------------------------------------------------------------
# Bad input: a clear error, nothing applied
# ---------------------------------------------------------------------------------------------


def kohya_file(tiny, tmp_path, **changes) -> tuple:
    path = tmp_path / "bad.safetensors"
    net = random_lora(tiny, 7)
    save_lora(path, net.weights(), tiny.model_config)
    sd = load_file(str(path))
    for key, value in changes.items():
        if value is None:
            sd.pop(key)
        else:
            sd[key] = value
    save_file(sd, str(path))
    return path, sd


Q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
K2 = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"lora_unet_down_blocks_9_resnets_0_conv1.lora_down.weight": torch.zeros(4, 3)},
         r"1 keys name no layer of this model: lora_unet_down_blocks_9_resnets_0_conv1"),
        ({f"{Q}.hada_w1_a": torch.zeros(4, 4)}, r"it is LoHa \(LyCORIS\) .*only LoRA and LoCon layers load"),
        ({f"{Q}.lora_up.weight": torch.zeros(64, 3)}, r"1 layers do not fit this model's weights, e.g. " + Q),
        ({f"{Q}.lora_up.weight": None}, r"1 layers are incomplete or broken: " + Q),
        ({f"{K2}.lora_down.weight": torch.zeros(4, 1024)},
         r"made for SD 2.x \(1024-wide text conditioning\); this model is a 128-wide model \(128\)"),
        ({"lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 1280)},
         r"it is an SDXL LoRA"),
        ({f"{Q}.alpha": torch.ones(2)}, r"alpha \(not a single number\)"),
    ],
)
def test_bad_lora_files_are_refused_and_nothing_is_applied(tiny, tmp_path, changes, message):
    path, _ = kohya_file(tiny, tmp_path, **changes)
    original, base = state(tiny), run(tiny)
    with pytest.raises(CheckpointError, match=message) as err:
        tiny.load_lora(path)
    assert str(path) in str(err.value) and "nothing was applied" in str(err.value)
    assert tiny.lora_scales == {} and torch.equal(run(tiny), base)
    assert_same_state(state(tiny), original)


def test_other_bad_inputs(tiny, tmp_path):
    with pytest.raises(CheckpointError, match="LoRA not found"):
        tiny.load_lora(tmp_path / "missing.safetensors")
    pickled = tmp_path / "odd.pt"
    torch.save({"lora_unet_x.alpha": torch.ones(()), "note": fractions.Fraction(1, 2)}, pickled)
    with pytest.raises(CheckpointError, match=r"odd.pt is a pickle that holds more than tensors.*trust_pickle=True"):
        tiny.load_lora(pickled)
    tiny.save(tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="it is a model checkpoint, not a LoRA"):
        tiny.load_lora(tmp_path / "model.safetensors")
    path = save_lora(tmp_path / "ok.safetensors", random_lora(tiny, 8).weights(), tiny.model_config)
    with pytest.raises(ValueError, match="a LoRA scale must be a finite number"):
        tiny.load_lora(path, scale=float("nan"))
    tiny.load_lora(path)
    with pytest.raises(ValueError, match="a LoRA named 'ok' is already loaded"):
        tiny.load_lora(path)
    with pytest.raises(ValueError, match=r"no LoRA named 'nope' is loaded \(loaded: ok\)"):
        tiny.set_lora_scale("nope", 1.0)
    tiny.unload_lora()


def test_txt2img_with_lora_embedding_and_weighted_prompt(tmp_path):
    pipe = make_pipe("sd1")
    ckpt = pipe.save(tmp_path / "model.safetensors")
    lora = save_lora(tmp_path / "style.safetensors", random_lora(pipe, 9).weights(), pipe.model_config)
    emb = tmp_path / "shiny.safetensors"
    save_file({"emb_params": torch.randn(2, pipe.text_encoder.cfg.width)}, str(emb))
    out = tmp_path / "out"
    r = run_tool("tools/txt2img.py", "--ckpt", ckpt, "--lora", f"{lora}:0.7", "--embedding", emb,
                 "--prompt", "(red:1.3) circle, shiny BREAK white background", "--steps", "2", "--seed", "1",
                 "--out", out)
    assert r.returncode == 0, r.stderr
    assert "embedding 'shiny'" in r.stderr and (out / "00000-1.png").exists()
    r = run_tool("tools/txt2img.py", "--ckpt", ckpt, "--lora", f"{emb}:0.7", "--prompt", "x", "--steps", "1",
                 "--out", out)
    assert r.returncode == 2 and "error:" in r.stderr and "Traceback" not in r.stderr
    r = run_tool("tools/txt2img.py", "--ckpt", ckpt, "--prompt", "(red:x) circle", "--steps", "1", "--out", out)
    assert r.returncode == 2 and "malformed weight" in r.stderr
