import re
import subprocess
import sys

from PIL import Image

from helpers import ROOT
from ldm.png_settings import read_png_settings


def run_tool(*args):
    return subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_txt2img_writes_pngs_with_settings_and_a_grid(tmp_path):
    out = tmp_path / "out"
    r = run_tool(
        "tools/txt2img.py", "--config", "tests/configs/tiny64.yaml", "--set", "sample.height=32", "--set", "sample.width=32",
        "--prompt", "a red circle", "--negative-prompt", "blurry", "--n", "2", "--seed", "5",
        "--steps", "2", "--sampler", "Euler a", "--spacing", "Karras", "--cfg", "4.5", "--out", out,
    )
    assert r.returncode == 0, r.stderr
    written = sorted(p.name for p in out.iterdir())
    assert written == ["00000-5.png", "00000-grid.png", "00001-6.png"]
    assert f"wrote {out / '00000-5.png'}" in r.stdout and "wrote grid" in r.stdout
    image = Image.open(out / "00001-6.png")
    assert image.size == (32, 32)
    assert sorted(image.text) == ["ldm", "parameters"]  # no `prompt` chunk, which ComfyUI would parse as JSON
    o = read_png_settings(out / "00001-6.png").options
    assert (o.prompt, o.negative_prompt, o.seed) == ("a red circle", "blurry", 6)
    assert (o.sampler, o.spacing, o.steps, o.cfg) == ("euler_a", "karras", 2, 4.5)
    assert image.text["parameters"] == ("a red circle\nNegative prompt: blurry\nSteps: 2, Sampler: Euler a, Schedule "
                                        "type: Karras, CFG scale: 4.5, Seed: 6, Size: 32x32, Model: tiny64")
    assert Image.open(out / "00000-grid.png").size == (64, 32)


def test_txt2img_reports_bad_input_without_a_traceback_dump(tmp_path):
    r = run_tool("tools/txt2img.py", "--config", "tests/configs/tiny64.yaml", "--prompt", "x", "--height", "30", "--out", tmp_path)
    assert r.returncode != 0 and "height must be a multiple of 4 (got 30); try 28 or 32" in r.stderr
    r = run_tool("tools/txt2img.py", "--config", "tests/configs/tiny64.yaml", "--prompt", "x", "--sampler", "DPM++ 3M SDE",
                 "--out", tmp_path)
    assert r.returncode != 0 and "--sampler: sampler 'DPM++ 3M SDE' is not implemented here" in r.stderr
    assert "note:" not in r.stderr  # refused while parsing the arguments, before the model is built
    assert not any(tmp_path.iterdir())


def test_count_params_prints_the_published_sizes():
    r = run_tool("tools/count_params.py", "configs/sd15.yaml", "configs/sd21.yaml")
    assert r.returncode == 0, r.stderr
    sd15, sd21 = r.stdout.split("configs/sd21.yaml")
    assert re.search(r"unet\s+859,520,964", sd15)
    assert re.search(r"unet\s+865,910,724", sd21)
    assert re.search(r"vae\s+83,653,863", sd15) and re.search(r"vae\s+83,653,863", sd21)
    assert re.search(r"text_encoder\s+123,060,480", sd15)


def test_ci_runs_the_readme_test_command_verbatim():
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"```bash\n(.*?)\n```", readme, re.S)
    test_command = next(c for c in commands if "pytest" in c)
    assert test_command in (ROOT / ".ci/run").read_text().splitlines()
