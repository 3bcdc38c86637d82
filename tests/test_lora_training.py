"""LoRA training (train.lora): only the adapters train, the export is a kohya LoRA file that loads
back with the trained outputs bit for bit, runs resume exactly, and targets are chosen as documented."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from helpers import ROOT, SD_TINY, randomize
from ldm import LDMPipeline
from ldm.config import load_config
from ldm.errors import ConfigError
from ldm.train.checkpoint import find_latest_state, load_training_state
from ldm.train.lora_trainer import LoRATrainer, lora_targets

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = [
    "model.unet.model_channels=32", "model.unet.num_head_channels=16", "model.text_encoder.width=32",
    "model.unet.context_dim=32", "model.text_encoder.heads=2", "model.text_encoder.projection_dim=32",
    "model.vae.ch=16", "sample.height=16", "sample.width=16", "sample.steps=2",
]
RUN = [
    "data.resolution=16", "data.heldout_size=4", "train.batch_size=2", "train.steps=4", "train.warmup_steps=1",
    "train.lr=1e-2", "train.save_every=2", "train.sample_every=0", "train.log_with=none", "train.lora.rank=4",
    'train.mixed_precision="no"', "train.channels_last=false",  # the same arithmetic as a plain pipeline's
]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> str:
    """A small base model file with every weight non-zero."""
    pipe = randomize(LDMPipeline.from_config(load_config(SD_TINY, TINY), seed=3))
    return str(pipe.save(tmp_path_factory.mktemp("base") / "base.safetensors"))


def overrides(out, base, *extra) -> list[str]:
    return [*TINY, *RUN, f"train.output_dir={out}", f"train.init_from={base}", *extra]


def config(out, base, *extra):
    return load_config(SD_TINY, overrides(out, base, *extra))


def unet_output(pipe: LDMPipeline) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([100.0, 700.0])
    with torch.no_grad():
        return pipe.unet(x, t, pipe.text_encoder(["a red circle", "a small blue square"]))


def test_only_the_adapters_train_and_the_exported_file_gives_the_trained_outputs(tmp_path, base):
    trainer = LoRATrainer(config(tmp_path, base, "train.lora.text_encoder=true"))
    assert trainer.out == tmp_path / "lora"  # beside, not among, the base run's own states
    start = {k: v.clone() for k, v in trainer.lora.state_dict().items()}
    path = trainer.train()
    assert path == tmp_path / "lora" / "lora.safetensors"

    original = LDMPipeline.from_checkpoint(base)
    for name, module in original.modules.items():  # every base weight as it was
        live = {"unet": trainer.base_unet, "vae": trainer.vae, "text_encoder": trainer.text_encoder}[name]
        assert all(torch.equal(v, live.state_dict()[k]) for k, v in module.state_dict().items()), name
    trained = trainer.lora.state_dict()
    assert all(not torch.equal(start[k], trained[k]) for k in start)  # every adapter moved (up started at 0)

    # The file, loaded onto the base model, gives what the trainer's model gives, bit for bit.
    before = unet_output(original)
    name = original.load_lora(path)
    assert torch.equal(unet_output(original), unet_output(trainer.inference_pipeline()))
    assert not torch.allclose(unet_output(original), before, atol=1e-4)
    with_lora = original.generate("a red circle", steps=2, seed=1, output_type="tensor", progress=False)
    assert torch.equal(with_lora, trainer.inference_pipeline().generate(
        "a red circle", steps=2, seed=1, output_type="tensor", progress=False))
    original.unload_lora(name)
    assert torch.equal(unet_output(original), before)

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        keys = list(f.keys())
    assert any(k.startswith("lora_te_") for k in keys) and any(k.startswith("lora_unet_") for k in keys)
    assert (meta["ss_network_dim"], meta["ss_network_alpha"], meta["ss_max_train_steps"]) == ("4", "4", "4")
    assert (meta["ss_sd_model_name"], meta["ss_learning_rate"], meta["ss_network_train_unet_only"]) == (
        "base.safetensors", "0.01", "False")
    assert json.loads(meta["ldm_train_config"])["train"]["lora"]["rank"] == 4
    metrics = json.loads((tmp_path / "lora" / "metrics.json").read_text())
    assert metrics["steps"] == 4 and metrics["heldout_loss"] != metrics["heldout_loss_start"]


def test_a_resumed_run_equals_an_uninterrupted_one_and_the_tool_says_how_to_use_it(tmp_path, base, capsys):
    from ldm.cli.train import main

    assert main([str(SD_TINY), *overrides(tmp_path / "a", base)]) == 0
    said = capsys.readouterr().out
    lora_a = tmp_path / "a" / "lora" / "lora.safetensors"
    assert f"LoRA: {lora_a}" in said and f"--ckpt {base} --lora {lora_a}" in said

    LoRATrainer(config(tmp_path / "b", base)).train(until=2)
    assert find_latest_state(tmp_path / "b" / "lora").name == "state-00000002"
    resumed = LoRATrainer(config(tmp_path / "b", base), resume=True)
    assert resumed.step == 2
    resumed.train()
    (wa, ta, _), (wb, tb, _) = (load_training_state(find_latest_state(tmp_path / r / "lora")) for r in "ab")
    assert wa.keys() == wb.keys() == {"lora"}  # a state holds the adapters, not the base model
    assert all(torch.equal(wa["lora"][k], wb["lora"][k]) for k in wa["lora"])
    with safe_open(str(lora_a), "pt") as a, safe_open(str(tmp_path / "b" / "lora" / "lora.safetensors"), "pt") as b:
        assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())


def test_targets_are_the_named_groups_or_patterns(base):
    model = LDMPipeline.from_checkpoint(base).model_config
    keys = lambda targets, te=False: [t.key for t in lora_targets(model, targets, te)]  # noqa: E731
    attention = keys(("attention",))
    assert attention and all(k.split(".")[-2] in ("to_q", "to_k", "to_v", "0") and "attn" in k for k in attention)
    assert len(attention) == 4 * 2 * 7  # q, k, v, out in attn1 and attn2 of 7 transformer blocks
    transformer = keys(("transformer",))
    assert set(attention) < set(transformer) and any("proj_in" in k for k in transformer)
    assert any(".ff." in k for k in transformer) and not any("in_layers" in k for k in transformer)
    resnet = keys(("resnet",))
    assert resnet and all(k.endswith(("in_layers.2.weight", "out_layers.3.weight", "skip_connection.weight",
                                      "emb_layers.1.weight", "op.weight", "conv.weight")) for k in resnet)
    assert keys((r"attn2\.to_[kv]",)) == [k for k in attention if ".attn2.to_k." in k or ".attn2.to_v." in k]
    with_text = lora_targets(model, ("attention",), True)
    text = [t for t in with_text if t.network == "text_encoder"]
    assert len(text) == model.text_encoder.layers * 6  # q, k, v, out, fc1, fc2
    model_p = dataclasses.replace(model, text_encoder=dataclasses.replace(model.text_encoder, layer="penultimate"))
    assert len([t for t in lora_targets(model_p, ("attention",), True) if t.network == "text_encoder"]) == (
        (model.text_encoder.layers - 1) * 6)  # the last layer's output never reaches the U-Net
    with pytest.raises(ValueError, match=r"'attn3' matches no layer of this U-Net; use a group \(attention, "):
        lora_targets(model, ("attn3",), False)
    with pytest.raises(ValueError, match=r"'\(' is neither a group .* nor a regular expression"):
        lora_targets(model, ("(",), False)


def test_bad_settings_are_refused_before_training(tmp_path, base):
    with pytest.raises(ValueError, match="train.lora needs a base model to adapt: set train.init_from"):
        LoRATrainer(config(tmp_path, ""))
    with pytest.raises(ConfigError, match=r"train.lora.rank must be an integer >= 1, or 0 for no LoRA \(got -2\)"):
        config(tmp_path, base, "train.lora.rank=-2")
    with pytest.raises(ConfigError, match=r"train.lora.alpha must be > 0"):
        config(tmp_path, base, "train.lora.alpha=0")
    inpainting = LDMPipeline.from_config(load_config(SD_TINY, [*TINY, "model.unet.in_channels=9"]))
    path = inpainting.save(tmp_path / "inpainting.safetensors")
    with pytest.raises(ValueError, match=r"inpainting.safetensors is an inpainting model \(9 input channels\)"):
        LoRATrainer(config(tmp_path, path))
    assert not (tmp_path / "lora").exists()


@pytest.mark.slow
def test_two_process_lora_training_keeps_the_adapters_identical(tmp_path, base):
    """DDP averages the adapters' gradients: both ranks end with the same LoRA (each trained on its own items)."""
    out = tmp_path / "dist"
    out.mkdir()
    r = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
         str(ROOT / "tests/dist_train_script.py"), str(out),
         *overrides(tmp_path / "run", base, "train.lora.text_encoder=true")],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = [json.loads((out / f"rank{i}.json").read_text()) for i in range(2)]
    assert ranks[0]["digest"] == ranks[1]["digest"] and ranks[0]["captions"] != ranks[1]["captions"]
    assert (tmp_path / "run" / "lora" / "lora.safetensors").is_file()
