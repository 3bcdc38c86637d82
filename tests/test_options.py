"""SamplingOptions: one dataclass for every option of generate, img2img and inpaint, through JSON and
the command line and into each image's record; the pipeline's keyword API is made of its fields."""

import json

import pytest
import torch

from ldm import SamplingOptions
from ldm.config import SampleConfig

DEFAULTS = SampleConfig(steps=12, cfg=5.0, sampler="euler_a", height=64, width=48, negative_prompt="blurry")


def test_json_round_trip_keeps_every_field():
    opts = SamplingOptions(prompt=["a", "b"], negative_prompt="c", steps=7, cfg=3.5, sampler="ddim", spacing="leading",
                           eta=0.3, guidance_rescale=0.7, seed=11, num_images=2, height=40, width=48, strength=0.5)
    data = json.loads(json.dumps(opts.to_dict()))
    assert set(data) == set(SamplingOptions.names())
    assert SamplingOptions.from_dict(data) == opts


def test_unknown_keys_are_an_error_that_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown sampling options: stpes; valid: prompt, negative_prompt, steps"):
        SamplingOptions.from_dict({"prompt": "x", "stpes": 3})


def test_resolved_fills_the_models_defaults_and_the_samplers_spacing():
    r = SamplingOptions(prompt="x").resolved(DEFAULTS)
    assert (r.steps, r.cfg, r.sampler, r.negative_prompt, r.spacing) == (12, 5.0, "euler_a", "blurry", "trailing")
    assert SamplingOptions(prompt="x", sampler="dpmpp_2m_karras").resolved(DEFAULTS).spacing == "karras"
    given = SamplingOptions(prompt="x", steps=3, cfg=1.0, sampler="heun", negative_prompt="", spacing="leading")
    assert given.resolved(DEFAULTS) == given  # what is given is kept
    assert r.seed is None and r.height is None  # a random seed and the size are the pipeline's to choose


@pytest.mark.parametrize("field, value, message", [
    ("steps", 0, r"steps must be an integer >= 1 \(got 0\); 20-50 is typical"),
    ("cfg", float("nan"), r"cfg must be a finite number >= 0"),
    ("guidance_rescale", 1.5, r"guidance_rescale must be in \[0, 1\] \(got 1.5\)"),
    ("num_images", 0, r"num_images must be an integer >= 1 \(got 0\)"),
    ("strength", 2, r"strength must be a number in \[0, 1\] \(got 2\)"),
    ("sampler", "eulr", r"eulr"),
])
def test_resolved_names_each_bad_value(field, value, message):
    with pytest.raises(ValueError, match=message):
        SamplingOptions(prompt="x", **{field: value}).resolved(DEFAULTS)


def test_eta_only_with_a_stochastic_sampler():
    assert SamplingOptions(prompt="x", sampler="euler_a", eta=0.5).resolved(DEFAULTS).eta == 0.5
    with pytest.raises(ValueError, match=r"eta applies only to stochastic samplers .*'heun' is deterministic"):
        SamplingOptions(prompt="x", sampler="heun", eta=0.5).resolved(DEFAULTS)


def test_image_info_records_one_image_without_unset_fields():
    one = SamplingOptions(prompt="x", negative_prompt="", seed=4, steps=3, cfg=2.0, sampler="ddim", spacing="trailing",
                          height=32, width=32)
    assert one.image_info() == {"prompt": "x", "negative_prompt": "", "steps": 3, "cfg": 2.0, "sampler": "ddim",
                                "spacing": "trailing", "guidance_rescale": 0.0, "prompt_weighting": True, "seed": 4,
                                "height": 32, "width": 32}
    assert SamplingOptions(prompt="x").image_info()["seed"] is None  # generators instead of a seed


def test_the_pipeline_takes_the_options_as_keywords_or_as_a_dict(tiny_pipe):
    opts = SamplingOptions(prompt="a red circle", negative_prompt="blue", steps=2, cfg=4.0, sampler="euler_a", eta=0.5,
                           seed=3, num_images=2)
    by_dict = tiny_pipe.generate(**opts.to_dict(), output_type="tensor", progress=False)
    by_keywords = tiny_pipe.generate("a red circle", "blue", steps=2, cfg=4.0, sampler="euler_a", eta=0.5, seed=3,
                                     num_images=2, output_type="tensor", progress=False)
    assert torch.equal(by_dict, by_keywords)
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    i2i = SamplingOptions(prompt="a red circle", steps=4, seed=1, strength=0.5)
    assert torch.equal(tiny_pipe.img2img(image, **i2i.to_dict(), output_type="tensor", progress=False),
                       tiny_pipe.img2img(image, "a red circle", 0.5, steps=4, seed=1, output_type="tensor", progress=False))


def test_an_images_record_reproduces_it(tiny_pipe):
    (image,) = tiny_pipe.generate("a blue square", steps=2, seed=7, guidance_rescale=0.5, sampler="euler_a", progress=False)
    assert image.info["seed"] == 7 and image.info["guidance_rescale"] == 0.5 and image.info["spacing"] == "trailing"
    again = tiny_pipe.generate(**SamplingOptions.from_dict(image.info).to_dict(), progress=False)[0]
    assert again.tobytes() == image.tobytes()


def test_wrong_keywords_name_the_options_each_method_takes(tiny_pipe):
    with pytest.raises(TypeError, match=r"generate\(\) got an unexpected keyword argument 'stpes'; its sampling "
                                        r"options are steps, cfg, .*height, width, strength, hires_scale, hires_steps, "
                                        r"hires_upscaler$"):
        tiny_pipe.generate("x", stpes=3)
    with pytest.raises(ValueError, match=r"strength applies to img2img, inpaint and hires fix \(with hires_scale\), "
                                         r"not plain generate \(got 0.5\)"):
        tiny_pipe.generate("x", strength=0.5)
    with pytest.raises(ValueError, match=r"img2img draws at the size of its image \(got height=64"):
        tiny_pipe.img2img(torch.rand(1, 3, 32, 32), "x", height=64)


