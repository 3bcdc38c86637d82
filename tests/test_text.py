"""Text encoders: shapes, layers, causality, parity of the OpenCLIP tower with transformers' CLIP,
checkpoint key layouts, parameter counts of the public models, freezing, truncation warnings."""

import math
import warnings

import pytest
import torch
from torch import nn

from ldm.config import TextEncoderConfig
from ldm.errors import ConfigError
from ldm.models.text import OpenCLIPTextTower, TextEncoder
from ldm.models.tokenizer import BOS_ID, EOS_ID

KINDS = ("hf_clip", "open_clip")
WIDTH, LAYERS, HEADS = 64, 3, 4


def tiny(kind: str, **overrides) -> TextEncoderConfig:
    act = "gelu" if kind == "open_clip" else "quick_gelu"
    return TextEncoderConfig(
        kind=kind, width=WIDTH, layers=LAYERS, heads=HEADS, projection_dim=32, activation=act, **overrides
    )


def random_tokens(batch: int, length: int = 77, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, BOS_ID, (batch, length), generator=g)
    ids[:, 0] = BOS_ID
    return ids


@pytest.fixture(scope="module")
def encoders():
    torch.manual_seed(0)
    return {(k, layer): TextEncoder(tiny(k, layer=layer)) for k in KINDS for layer in ("last", "penultimate")}


# ---------------------------------------------------------------------------------------------
# Shapes, layers, inputs
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("layer", ["last", "penultimate"])
def test_shapes(encoders, kind, layer):
    enc = encoders[kind, layer]
    out = enc(["a photo of a cat", ""])
    assert out.shape == (2, 77, WIDTH) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert enc.context_dim == WIDTH
    assert enc("a photo of a cat").shape == (1, 77, WIDTH)  # a single string is one prompt


@pytest.mark.parametrize("kind", KINDS)
def test_penultimate_differs_from_last(encoders, kind):
    last, penultimate = encoders[kind, "last"], encoders[kind, "penultimate"]
    penultimate.load_state_dict(last.state_dict())
    tokens = random_tokens(2)
    a, b = last(tokens), penultimate(tokens)
    assert not torch.allclose(a, b, atol=1e-3)
    # Both end in the final LayerNorm (default affine: weight 1, bias 0): zero mean, unit variance.
    for out in (a, b):
        assert out.mean(-1).abs().max() < 1e-5
        assert (out.var(-1, unbiased=False) - 1).abs().max() < 1e-3


@pytest.mark.parametrize("kind", KINDS)
def test_causal(encoders, kind):
    enc = encoders[kind, "last"]
    tokens = random_tokens(2)
    changed = tokens.clone()
    k = 10
    changed[:, k] = (changed[:, k] + 1) % BOS_ID
    a, b = enc(tokens), enc(changed)
    torch.testing.assert_close(a[:, :k], b[:, :k], rtol=0, atol=1e-6)
    assert (a[:, k:] - b[:, k:]).abs().amax(dim=(0, 2)).min() > 1e-4  # every later position changes


@pytest.mark.parametrize("kind", KINDS)
def test_token_tensor_input(encoders, kind):
    enc = encoders[kind, "penultimate"]
    prompts = ["a red circle", "a blue square on the left"]
    tokens = enc.tokenize(prompts)
    torch.testing.assert_close(enc(tokens), enc(prompts), rtol=0, atol=0)
    # A shorter id tensor is used as given: its states are the first positions of the full ones.
    torch.testing.assert_close(enc(tokens[:, :12]), enc(tokens)[:, :12], rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="int64"):
        enc(tokens.float())
    with pytest.raises(ValueError, match="at most 77"):
        enc(torch.cat([tokens, tokens], dim=1))


@pytest.mark.parametrize("kind, pad", [("hf_clip", EOS_ID), ("open_clip", 0)])
def test_padding_ids(encoders, kind, pad):
    enc = encoders[kind, "last"]
    assert enc.pad_id == pad
    tokens = enc.tokenize(["a photo of a cat", ""])
    assert tokens[0].tolist() == [BOS_ID, 320, 1125, 539, 320, 2368, EOS_ID] + [pad] * 70
    assert tokens[1].tolist() == [BOS_ID, EOS_ID] + [pad] * 75


@pytest.mark.parametrize("kind", KINDS)
def test_truncation_warns(encoders, kind):
    enc = encoders[kind, "last"]
    long = " ".join(["cat"] * 100)
    with pytest.warns(UserWarning, match="77-token limit") as record:
        tokens = enc.tokenize(["a cat", long])
    message = str(record[0].message)
    assert "prompt 1: 25 tokens dropped" in message and "prompt 0" not in message
    assert tokens.shape == (2, 77) and tokens[1, -1] == EOS_ID
    with pytest.warns(UserWarning, match="77"):
        out = enc([long])
    assert out.shape == (1, 77, WIDTH)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        enc.tokenize(["a cat", " ".join(["cat"] * 75)])  # exactly full: no warning


def test_rejects_small_vocab():
    with pytest.raises(ConfigError, match="vocab_size"):
        TextEncoder(tiny("open_clip", vocab_size=1000))


# ---------------------------------------------------------------------------------------------
# Parity of the OpenCLIP tower with an independent implementation
# ---------------------------------------------------------------------------------------------


def hf_reference(tower: OpenCLIPTextTower, layers: int) -> nn.Module:
    """transformers' CLIP text transformer (eager attention) holding the tower's first `layers`
    blocks: the same function written by other people, with separate q/k/v projections."""
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = tower.cfg
    hf = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=cfg.vocab_size, hidden_size=cfg.width, intermediate_size=cfg.mlp_size,
            num_hidden_layers=layers, num_attention_heads=cfg.heads,
            max_position_embeddings=cfg.context_length, hidden_act=cfg.activation,
            bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=0, attn_implementation="eager",
        )
    )
    text_model = getattr(hf, "text_model", hf)  # transformers 4 nests it, 5 does not
    sd = {
        "embeddings.token_embedding.weight": tower.token_embedding.weight,
        "embeddings.position_embedding.weight": tower.positional_embedding,
        "final_layer_norm.weight": tower.ln_final.weight,
        "final_layer_norm.bias": tower.ln_final.bias,
    }
    for i, block in enumerate(tower.transformer.resblocks[:layers]):
        p = f"encoder.layers.{i}."
        q, k, v = block.attn.in_proj_weight.chunk(3)
        qb, kb, vb = block.attn.in_proj_bias.chunk(3)
        sd |= {
            p + "self_attn.q_proj.weight": q, p + "self_attn.q_proj.bias": qb,
            p + "self_attn.k_proj.weight": k, p + "self_attn.k_proj.bias": kb,
            p + "self_attn.v_proj.weight": v, p + "self_attn.v_proj.bias": vb,
            p + "self_attn.out_proj.weight": block.attn.out_proj.weight,
            p + "self_attn.out_proj.bias": block.attn.out_proj.bias,
            p + "layer_norm1.weight": block.ln_1.weight, p + "layer_norm1.bias": block.ln_1.bias,
            p + "layer_norm2.weight": block.ln_2.weight, p + "layer_norm2.bias": block.ln_2.bias,
            p + "mlp.fc1.weight": block.mlp.c_fc.weight, p + "mlp.fc1.bias": block.mlp.c_fc.bias,
            p + "mlp.fc2.weight": block.mlp.c_proj.weight, p + "mlp.fc2.bias": block.mlp.c_proj.bias,
        }
    text_model.load_state_dict(sd, strict=True)
    return text_model.eval()


@pytest.fixture(scope="module")
def parity_case():
    torch.manual_seed(1)
    enc = TextEncoder(tiny("open_clip", layer="last"))
    # Layer norms and biases away from their initial values, so every parameter matters.
    with torch.no_grad():
        for name, p in enc.named_parameters():
            if name.endswith("bias") or "ln" in name:
                p.add_(0.1 * torch.randn_like(p))
    # Random ids, and real prompts padded with 0 the way OpenCLIP pads (same tensor for both).
    tokens = torch.cat([random_tokens(2, seed=3), enc.tokenize(["a photo of a cat", ""])])
    return enc, tokens


def test_openclip_tower_matches_reference_last(parity_case):
    enc, tokens = parity_case
    ref = hf_reference(enc.model, LAYERS)
    with torch.no_grad():
        expected = ref(input_ids=tokens).last_hidden_state
    torch.testing.assert_close(enc(tokens), expected, rtol=0, atol=1e-5)


def test_openclip_tower_matches_reference_penultimate(parity_case):
    enc, tokens = parity_case
    penultimate = TextEncoder(tiny("open_clip", layer="penultimate"))
    penultimate.load_state_dict(enc.state_dict())
    ref = hf_reference(enc.model, LAYERS)
    with torch.no_grad():
        hidden = ref(input_ids=tokens, output_hidden_states=True).hidden_states[-2]
        expected = ref.final_layer_norm(hidden)
    torch.testing.assert_close(penultimate(tokens), expected, rtol=0, atol=1e-5)
    # The same function as a model that has only the first layers - 1 blocks.
    with torch.no_grad():
        shorter = hf_reference(enc.model, LAYERS - 1)(input_ids=tokens).last_hidden_state
    torch.testing.assert_close(penultimate(tokens), shorter, rtol=0, atol=1e-5)


def test_hf_clip_penultimate_is_one_block_short(encoders):
    # "clip skip 2": the states of an HF CLIP with the last block removed, final LayerNorm applied.
    from transformers import CLIPTextConfig, CLIPTextModel

    enc = encoders["hf_clip", "penultimate"]
    hf_cfg = enc.transformer.text_model.config.to_dict()
    hf_cfg |= {"num_hidden_layers": LAYERS - 1, "attn_implementation": "eager"}
    short = CLIPTextModel(CLIPTextConfig(**hf_cfg))
    sd = {k: v for k, v in enc.transformer.text_model.state_dict().items() if f"layers.{LAYERS - 1}." not in k}
    getattr(short, "text_model", short).load_state_dict(sd, strict=True)
    tokens = random_tokens(2, seed=5)
    with torch.no_grad():
        expected = short.eval()(input_ids=tokens).last_hidden_state
    torch.testing.assert_close(enc(tokens), expected, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Checkpoint layouts and the public models' sizes
# ---------------------------------------------------------------------------------------------


def test_hf_clip_state_dict_is_sd1_layout(encoders):
    sd = encoders["hf_clip", "last"].state_dict()
    prefix = "transformer.text_model."
    expected = {prefix + "embeddings.token_embedding.weight", prefix + "embeddings.position_embedding.weight"}
    expected |= {prefix + f"final_layer_norm.{p}" for p in ("weight", "bias")}
    for i in range(LAYERS):
        for module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
                       "layer_norm1", "layer_norm2", "mlp.fc1", "mlp.fc2"):
            expected |= {prefix + f"encoder.layers.{i}.{module}.{p}" for p in ("weight", "bias")}
    # `embeddings.position_ids` is a non-persistent buffer in current transformers: not saved.
    assert set(sd) == expected
    assert sd[prefix + "embeddings.token_embedding.weight"].shape == (49408, WIDTH)
    assert sd[prefix + "embeddings.position_embedding.weight"].shape == (77, WIDTH)


def test_open_clip_state_dict_is_sd2_layout(encoders):
    sd = encoders["open_clip", "last"].state_dict()
    w = WIDTH
    shapes = {
        "model.token_embedding.weight": (49408, w),
        "model.positional_embedding": (77, w),
        "model.ln_final.weight": (w,), "model.ln_final.bias": (w,),
        "model.text_projection": (w, 32),
        "model.logit_scale": (),
    }
    for i in range(LAYERS):
        p = f"model.transformer.resblocks.{i}."
        shapes |= {
            p + "ln_1.weight": (w,), p + "ln_1.bias": (w,),
            p + "attn.in_proj_weight": (3 * w, w), p + "attn.in_proj_bias": (3 * w,),
            p + "attn.out_proj.weight": (w, w), p + "attn.out_proj.bias": (w,),
            p + "ln_2.weight": (w,), p + "ln_2.bias": (w,),
            p + "mlp.c_fc.weight": (4 * w, w), p + "mlp.c_fc.bias": (4 * w,),
            p + "mlp.c_proj.weight": (w, 4 * w), p + "mlp.c_proj.bias": (w,),
        }
    assert {k: tuple(v.shape) for k, v in sd.items()} == shapes


def test_open_clip_init():
    torch.manual_seed(0)
    tower = TextEncoder(TextEncoderConfig(kind="open_clip", width=256, layers=8, heads=4)).model
    assert tower.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    assert tower.token_embedding.weight.std().item() == pytest.approx(0.02, rel=0.02)
    assert tower.positional_embedding.std().item() == pytest.approx(0.01, rel=0.05)
    block = tower.transformer.resblocks[0]
    assert block.attn.in_proj_weight.std().item() == pytest.approx(256**-0.5, rel=0.05)
    assert block.attn.out_proj.weight.std().item() == pytest.approx(256**-0.5 / 4, rel=0.05)  # / sqrt(2 * 8)
    assert block.mlp.c_fc.weight.std().item() == pytest.approx(512**-0.5, rel=0.05)
    assert block.attn.in_proj_bias.abs().max() == 0


def n_params(cfg: TextEncoderConfig) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in TextEncoder(cfg).parameters())


def test_sd15_text_encoder_size():
    # CLIP ViT-L/14 text transformer, as in SD 1.x checkpoints.
    cfg = TextEncoderConfig(kind="hf_clip", width=768, layers=12, heads=12, intermediate_size=3072)
    assert n_params(cfg) == 123_060_480


def test_sd2_text_encoder_size():
    # OpenCLIP ViT-H/14 text tower (about 354.0M): 353,004,544 in the transformer and embeddings,
    # 1,048,576 in text_projection, 1 logit_scale.
    cfg = TextEncoderConfig(kind="open_clip", width=1024, layers=24, heads=16, intermediate_size=4096,
                            projection_dim=1024, activation="gelu", layer="penultimate")
    assert n_params(cfg) == 354_032_641


# ---------------------------------------------------------------------------------------------
# Frozen or trainable
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_frozen_stays_eval_without_grads(encoders, kind):
    enc = encoders[kind, "last"]
    parent = nn.Sequential(nn.Linear(2, 2), enc)
    parent.train()
    assert parent[0].training
    assert not any(m.training for m in enc.modules())
    assert not any(p.requires_grad for p in enc.parameters())
    assert not enc(["a cat"]).requires_grad


@pytest.mark.parametrize("kind", KINDS)
def test_trainable(kind):
    enc = TextEncoder(tiny(kind, trainable=True))
    parent = nn.Sequential(enc)
    parent.eval()
    assert not enc.training
    parent.train()
    assert all(m.training for m in enc.modules())
    enc(["a cat"]).square().mean().backward()
    assert all(p.grad is not None for n, p in enc.named_parameters() if "logit_scale" not in n
               and "text_projection" not in n)
