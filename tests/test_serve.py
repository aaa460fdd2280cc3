"""sdgen serve over real HTTP on 127.0.0.1: the request shapes Open WebUI, SillyTavern and OpenAI clients send, the
CLI's pixels for the same seed, progress/interrupt/skip, the bounded queue, dropped jobs, auth and bad input.

One server (the demo model, fp32) serves most tests; a second one (sharing its loaded model) has --api-auth and
small limits. Long jobs are made long with many steps and ended early with /interrupt, so nothing here waits on a
timer it has to guess.
"""

import base64
import io
import json
import shutil
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from PIL import Image, ImageOps

from sdgen.cli import main as cli
from sdgen.families import demo_path
from sdgen.serve import Background, Limits, Settings, create_app

PROMPT = "a red circle on the left on a blue background"


def pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def png_b64(image: Image.Image, data_url=False) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    text = base64.b64encode(buf.getvalue()).decode()
    return "data:image/png;base64," + text if data_url else text


def wait_for(condition, timeout=60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError("timed out waiting")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    models = root / "models"
    (models / "sub").mkdir(parents=True)
    shutil.copy(demo_path(), models / "sub" / "other.safetensors")     # the same weights under another name
    (models / "broken.safetensors").write_bytes(b"not a checkpoint at all")
    outside = root / "outside"
    outside.mkdir()
    shutil.copy(demo_path(), outside / "secret.safetensors")
    (models / "escape.safetensors").symlink_to(outside / "secret.safetensors")   # points out of the folder
    (root / "loras").mkdir()
    (root / "loras" / "add_detail.safetensors").write_bytes(b"x")
    (root / "embeddings").mkdir()
    (root / "embeddings" / "my-style.pt").write_bytes(b"x")
    return root


@pytest.fixture(scope="module")
def server(folders):
    settings = Settings(model="demo", models_dir=str(folders / "models"), lora_dir=str(folders / "loras"),
                        embeddings_dir=str(folders / "embeddings"), queue_size=1, outputs=str(folders / "out"),
                        device="cpu", precision="fp32", limits=Limits(max_steps=1000))
    app = create_app(settings)
    with Background(app) as url:
        with httpx.Client(base_url=url, timeout=120) as client:
            yield app, client


@pytest.fixture()
def client(server):
    return server[1]


@pytest.fixture(scope="module")
def guarded(server):
    """A second server: --api-auth, a 1 MiB body limit, and a model that crashes when loaded."""
    app0 = server[0]

    def load(model):
        if model.title == "demo":
            return app0.state.worker.pipe
        raise RuntimeError("this model crashes on purpose")

    settings = Settings(model="demo", models_dir=app0.state.settings.models_dir, api_auth="alice:s3cret,bob:pw",
                        limits=Limits(max_body=2**20))
    app = create_app(settings, load=load)
    with Background(app) as url:
        yield url


# ---------------------------------------------------------------------------------------------- pixels


def test_open_webui_txt2img_gives_the_cli_pixels(client, tmp_path):
    # what Open WebUI's automatic1111 engine sends (n -> batch_size), with its optional steps/cfg/sampler/scheduler
    body = {"prompt": PROMPT, "negative_prompt": "green", "batch_size": 2, "width": 128, "height": 96, "steps": 6,
            "cfg_scale": 6.5, "sampler_name": "DPM++ 2M", "scheduler": "Karras", "seed": 1234}
    r = client.post("/sdapi/v1/txt2img", json=body)
    assert r.status_code == 200, r.text
    answer = r.json()
    info = json.loads(answer["info"])
    assert info["all_seeds"] == [1234, 1235] and info["seed"] == 1234
    assert info["sd_model_name"] == "demo" and info["clip_skip"] == 1
    assert answer["parameters"]["prompt"] == PROMPT
    out = tmp_path / "cli.png"
    assert cli(["generate", PROMPT, "-n", "green", "--batch-size", "2", "-W", "128", "-H", "96", "--steps", "6",
                "--cfg", "6.5", "--sampler", "dpmpp_2m", "--schedule", "karras", "--seed", "1234", "--model", "demo",
                "--precision", "fp32", "--device", "cpu", "-o", str(out)]) == 0
    for k, path in enumerate([out, tmp_path / "cli-1.png"]):
        cli_image = Image.open(path)
        api_image = Image.open(io.BytesIO(base64.b64decode(answer["images"][k])))
        assert api_image.size == (128, 96)
        np.testing.assert_array_equal(pixels(answer["images"][k]), np.asarray(cli_image.convert("RGB")))
        assert api_image.text["parameters"] == cli_image.text["parameters"] == info["infotexts"][k]


def test_sillytavern_txt2img_with_n_iter_clip_skip_and_saving(server, folders):
    app, client = server
    # SillyTavern's auto1111 request: many fields sdgen has no use for are accepted and ignored
    body = {"prompt": PROMPT, "negative_prompt": "", "sampler_name": "Euler a", "scheduler": "Automatic",
            "steps": 4, "cfg_scale": 7, "width": 64, "height": 64, "restore_faces": False, "enable_hr": False,
            "hr_upscaler": "Latent", "hr_scale": 2, "hr_additional_modules": [], "denoising_strength": 0.7,
            "hr_second_pass_steps": 0, "seed": 77, "override_settings": {"CLIP_stop_at_last_layers": 2},
            "override_settings_restore_afterwards": True, "clip_skip": 2, "save_images": True, "n_iter": 2,
            "do_not_save_grid": False, "alwayson_scripts": {}}
    r = client.post("/sdapi/v1/txt2img", json=body)
    assert r.status_code == 200, r.text
    info = json.loads(r.json()["info"])
    assert info["all_seeds"] == [77, 78] and info["clip_skip"] == 2 and info["sampler_name"] == "Euler a"
    pipe = app.state.worker.pipe
    for k in range(2):   # n_iter batches continue the seeds, each exactly what generate() makes alone
        want = pipe.generate(PROMPT, steps=4, guidance_scale=7, sampler="euler_a", width=64, height=64,
                             seed=77 + k, clip_skip=2).images[0]
        np.testing.assert_array_equal(pixels(r.json()["images"][k]), np.asarray(want))
    saved = sorted(p.name for p in (folders / "out").glob("*.png"))
    assert saved == ["77.png", "78.png"]
    assert "Clip skip: 2" in Image.open(folders / "out" / "77.png").text["parameters"]


def test_img2img_inpainting_with_data_urls_and_inverted_mask(server):
    app, client = server
    init = Image.new("RGB", (64, 64), (200, 30, 30))
    keep = Image.new("L", (64, 64), 255)
    keep.paste(0, (16, 16, 48, 48))    # black = repaint once inverted
    body = {"prompt": PROMPT, "init_images": [png_b64(init, data_url=True)], "mask": png_b64(keep),
            "inpainting_mask_invert": 1, "denoising_strength": 0.6, "steps": 5, "seed": 9, "mask_blur": 4,
            "inpainting_fill": 1, "inpaint_full_res": False, "resize_mode": 0}
    r = client.post("/sdapi/v1/img2img", json=body)
    assert r.status_code == 200, r.text
    info = json.loads(r.json()["info"])
    assert info["denoising_strength"] == 0.6 and info["is_using_inpainting_conditioning"]
    assert r.json()["parameters"]["init_images"] is None      # not echoed back
    want = app.state.worker.pipe.generate(PROMPT, init_image=init, mask_image=ImageOps.invert(keep), strength=0.6,
                                          steps=5, seed=9).images[0]
    np.testing.assert_array_equal(pixels(r.json()["images"][0]), np.asarray(want))


def test_openai_images_generations(server):
    app, client = server
    r = client.post("/v1/images/generations", json={"prompt": PROMPT, "n": 2, "size": "64x64",
                                                     "response_format": "b64_json", "model": "dall-e-3"})
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    assert len(data) == 2 and all(pixels(d["b64_json"]).shape == (64, 64, 3) for d in data)
    seed = int(Image.open(io.BytesIO(base64.b64decode(data[0]["b64_json"]))).text["parameters"].split("Seed: ")[1]
               .split(",")[0])
    want = app.state.worker.pipe.generate(PROMPT, width=64, height=64, batch_size=2, seed=seed).images
    for d, w in zip(data, want):
        np.testing.assert_array_equal(pixels(d["b64_json"]), np.asarray(w))
    r = client.post("/v1/images/generations", json={"prompt": PROMPT, "size": "64x64", "response_format": "url"})
    assert r.json()["data"][0]["url"].startswith("data:image/png;base64,")
    assert client.post("/v1/images/generations", json={"prompt": "x", "size": "big"}).json()["error"]["param"] == "size"


# --------------------------------------------------------------------------------- the running job


def test_progress_preview_skip_and_interrupt(client):
    with ThreadPoolExecutor(1) as pool:
        body = {"prompt": PROMPT, "steps": 1000, "n_iter": 2, "seed": 3, "width": 128, "height": 128}
        future = pool.submit(client.post, "/sdapi/v1/txt2img", json=body)
        p = wait_for(lambda: (q := client.get("/sdapi/v1/progress").json())["state"]["sampling_step"] >= 2 and q)
        assert p["state"]["job"] == "txt2img" and p["state"]["job_count"] == 2 and p["state"]["sampling_steps"] == 1000
        assert 0 < p["progress"] < 0.5 and p["eta_relative"] > 0 and p["textinfo"].startswith("Sampling step")
        preview = Image.open(io.BytesIO(base64.b64decode(p["current_image"])))
        assert preview.size == (128, 128)
        assert client.get("/sdapi/v1/progress", params={"skip_current_image": True}).json()["current_image"] is None
        assert client.post("/sdapi/v1/skip").status_code == 200        # ends batch 1 of 2 at its next step
        wait_for(lambda: client.get("/sdapi/v1/progress").json()["state"]["job_no"] == 1)
        assert client.post("/sdapi/v1/interrupt").status_code == 200   # ends the job, keeping what it has
        r = future.result(timeout=60)
    assert r.status_code == 200, r.text
    info = json.loads(r.json()["info"])
    assert info["interrupted"] and info["all_seeds"] == [3, 4] and len(r.json()["images"]) == 2
    assert client.get("/sdapi/v1/progress").json()["state"]["job_count"] == 0


def _raw_post(url, path, body) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    data = json.dumps(body).encode()
    sock = socket.create_connection((host, int(port)))
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return sock


def test_queue_full_answers_503_and_a_gone_client_is_dropped(server):
    app, client = server
    worker = app.state.worker
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(client.post, "/sdapi/v1/txt2img",
                              json={"prompt": PROMPT, "steps": 1000, "width": 128, "height": 128})
        wait_for(lambda: client.get("/sdapi/v1/progress").json()["state"]["sampling_step"] >= 1)
        gone = _raw_post(str(client.base_url), "/sdapi/v1/txt2img", {"prompt": "never rendered", "steps": 3})
        wait_for(lambda: worker.queued == 1)
        t0 = time.monotonic()
        r = client.post("/sdapi/v1/txt2img", json={"prompt": PROMPT, "steps": 3})   # queue_size=1: full
        assert r.status_code == 503 and "queue is full" in r.json()["detail"] and time.monotonic() - t0 < 10
        dropped_before = sum(1 for _, state in worker.finished if state == "dropped")
        gone.close()                                                                  # the client goes away
        wait_for(lambda: worker.queued == 0)
        assert sum(1 for _, state in worker.finished if state == "dropped") == dropped_before + 1
        client.post("/sdapi/v1/interrupt")
        assert running.result(timeout=60).status_code == 200
    r = client.post("/sdapi/v1/txt2img", json={"prompt": PROMPT, "steps": 2, "width": 64, "height": 64})
    assert r.status_code == 200                                                      # and the server goes on


# ------------------------------------------------------------------------------- models and listings


def test_models_options_and_paths_that_escape(server, folders):
    app, client = server
    titles = [m["title"] for m in client.get("/sdapi/v1/sd-models").json()]
    assert titles == ["demo", "broken.safetensors", "sub/other.safetensors"]      # the link out is not listed
    for bad in ("escape.safetensors", "../outside/secret.safetensors", str(folders / "outside" / "secret.safetensors"),
                "/etc/passwd", "broken.safetensors"):
        r = client.post("/sdapi/v1/options", json={"sd_model_checkpoint": bad})
        assert r.status_code == 422 and r.json()["detail"].startswith("sd_model_checkpoint:"), (bad, r.text)
    assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == "demo"
    body = {"prompt": PROMPT, "steps": 3, "width": 64, "height": 64, "seed": 5}
    r0 = client.post("/sdapi/v1/txt2img", json=body).json()
    assert client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "sub/other.safetensors [0123abcd]"}).status_code == 200
    assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == "sub/other.safetensors"
    r1 = client.post("/sdapi/v1/txt2img", json=body).json()
    assert json.loads(r1["info"])["sd_model_name"] == "other"
    np.testing.assert_array_equal(pixels(r0["images"][0]), pixels(r1["images"][0]))   # same weights, same image
    # OpenAI's `model`: a title from /v1/models picks that checkpoint (OpenAI's own names keep the options' one)
    assert "demo" in [m["id"] for m in client.get("/v1/models").json()["data"]]
    r = client.post("/v1/images/generations", json={"prompt": PROMPT, "size": "64x64", "model": "demo"})
    png = Image.open(io.BytesIO(base64.b64decode(r.json()["data"][0]["b64_json"])))
    assert png.text["parameters"].endswith("Model: demo")
    # a per-request override, and back to the options' model for the next request
    r = client.post("/sdapi/v1/txt2img", json={**body, "override_settings": {"sd_model_checkpoint": "demo"}})
    assert json.loads(r.json()["info"])["sd_model_name"] == "demo"
    r = client.post("/sdapi/v1/txt2img", json={**body, "override_settings": {"sd_model_checkpoint": "../x"}})
    assert r.status_code == 422 and r.json()["error"]["param"] == "override_settings.sd_model_checkpoint"
    assert client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "demo",
                                                  "CLIP_stop_at_last_layers": 2}).status_code == 200
    assert client.get("/sdapi/v1/options").json()["CLIP_stop_at_last_layers"] == 2
    assert client.post("/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 1}).status_code == 200
    assert client.post("/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 99}).status_code == 422


def test_listings(client):
    samplers = client.get("/sdapi/v1/samplers").json()
    assert {"Euler a", "DPM++ 2M", "Euler", "DDIM"} <= {s["name"] for s in samplers}
    assert [s["label"] for s in client.get("/sdapi/v1/schedulers").json()] == ["Automatic", "Karras"]
    assert [x["name"] for x in client.get("/sdapi/v1/loras").json()] == ["add_detail"]
    assert list(client.get("/sdapi/v1/embeddings").json()["loaded"]) == ["my-style"]
    # a listed LoRA reaches the pipeline's LoRA reader (this one is not a real LoRA file: refused in one line)
    r = client.post("/sdapi/v1/txt2img", json={"prompt": "x <lora:add_detail:0.7>", "steps": 2})
    assert r.status_code == 422 and "add_detail" in r.json()["detail"], r.text
    for path in ("upscalers", "latent-upscale-modes", "sd-vae"):
        assert client.get(f"/sdapi/v1/{path}").json() == []
    assert client.post("/sdapi/v1/refresh-checkpoints").status_code == 200
    assert "/sdapi/v1/txt2img" in client.get("/openapi.json").json()["paths"]
    assert client.get("/docs").status_code == 200
    page = client.get("/")
    assert page.status_code == 200 and "<script src=\"page.js\">" in page.text
    assert "txt2img" in client.get("/page.js").text


def test_png_info_reads_back_the_parameters(client):
    r = client.post("/sdapi/v1/txt2img", json={"prompt": PROMPT, "negative_prompt": "blurry", "steps": 2,
                                               "width": 64, "height": 64, "seed": 11, "sampler_name": "Euler a"})
    info = client.post("/sdapi/v1/png-info", json={"image": r.json()["images"][0]}).json()
    assert info["info"] == json.loads(r.json()["info"])["infotexts"][0]
    assert info["parameters"]["Seed"] == 11 and info["parameters"]["Sampler"] == "Euler a"
    assert info["parameters"]["Negative prompt"] == "blurry" and info["parameters"]["Size-1"] == 64
    plain = client.post("/sdapi/v1/png-info", json={"image": png_b64(Image.new("RGB", (16, 16)))}).json()
    assert plain["info"] == "" and plain["parameters"] == {}


# ------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("body, field", [
    ({"prompt": "x", "steps": 5000}, "steps"),
    ({"prompt": "x", "steps": 0}, "steps"),
    ({"prompt": "x", "width": 100000}, "width"),
    ({"prompt": "x", "height": 100}, "height"),
    ({"prompt": "x", "width": "wide"}, "width"),
    ({"prompt": "x", "batch_size": 100}, "batch_size"),
    ({"prompt": "x", "batch_size": 4, "n_iter": 5}, "batch_size"),
    ({"prompt": "x", "cfg_scale": 1e9}, "cfg_scale"),
    ({"prompt": "x", "sampler_name": "DPM++ 3M SDE"}, "sampler_name"),
    ({"prompt": "x", "scheduler": "Exponential"}, "scheduler"),
    ({"prompt": "x", "seed": 2**70}, "seed"),
    ({"prompt": "x" * 30000}, "prompt"),
    ({"prompt": ["not", "a", "string"]}, "prompt"),
    ({"prompt": "x", "override_settings": {"CLIP_stop_at_last_layers": 40}}, "clip_skip"),
    ({"prompt": "x <lora:/etc/passwd:1>"}, "prompt"),                 # a LoRA is a name from --lora-dir, never a path
    ({"prompt": "x <lora:../loras/add_detail:1>"}, "prompt"),
    ({"prompt": "x", "negative_prompt": "<lora:nope:1>"}, "prompt"),
])
def test_limits_and_bad_fields_are_422_naming_the_field(client, body, field):
    r = client.post("/sdapi/v1/txt2img", json=body)
    assert r.status_code == 422, r.text
    assert r.json()["detail"].startswith(field), r.json()["detail"]
    assert "Traceback" not in r.text


@pytest.mark.parametrize("body, field", [
    ({"prompt": "x"}, "init_images"),
    ({"prompt": "x", "init_images": ["%%% not base64 %%%"]}, "init_images[0]"),
    ({"prompt": "x", "init_images": [base64.b64encode(b"GIF89a but not really").decode()]}, "init_images[0]"),
    ({"prompt": "x", "init_images": [png_b64(Image.new("RGB", (64, 64)))],
      "mask": png_b64(Image.new("L", (32, 32)))}, "mask"),
    ({"prompt": "x", "init_images": [png_b64(Image.new("RGB", (64, 64)))], "denoising_strength": 3}, "denoising_strength"),
])
def test_img2img_bad_images_are_422(client, body, field):
    r = client.post("/sdapi/v1/img2img", json=body)
    assert r.status_code == 422, r.text
    assert r.json()["detail"].startswith(field + ":"), r.json()["detail"]


def test_malformed_json_is_422(client):
    for content in (b"{bad json", b"[1, 2]", b"\xff\xfe"):
        r = client.post("/sdapi/v1/txt2img", content=content, headers={"Content-Type": "application/json"})
        assert r.status_code == 422 and r.json()["detail"].startswith("body"), r.text


def test_auth_body_limit_and_a_crashing_job(guarded):
    with httpx.Client(base_url=guarded, timeout=60) as anon:
        for path in ("/", "/docs", "/openapi.json", "/sdapi/v1/options", "/sdapi/v1/progress"):
            r = anon.get(path)
            assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Basic"), path
        assert anon.post("/sdapi/v1/txt2img", json={"prompt": "x"}).status_code == 401
        assert anon.get("/sdapi/v1/options", auth=("alice", "wrong")).status_code == 401
        assert anon.get("/sdapi/v1/options", headers={"Authorization": "Basic %%%"}).status_code == 401
    with httpx.Client(base_url=guarded, timeout=60, auth=("bob", "pw")) as c:
        assert c.get("/sdapi/v1/options").status_code == 200 and c.get("/").status_code == 200
        r = c.post("/sdapi/v1/img2img", json={"prompt": "x", "init_images": ["A" * (2**20 + 10)]})
        assert r.status_code == 422 and r.json()["detail"].startswith("body:")
        r = c.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 2, "width": 64, "height": 64,
                                              "override_settings": {"sd_model_checkpoint": "sub/other.safetensors"}})
        assert r.status_code == 500 and "crashes on purpose" in r.json()["detail"] and "Traceback" not in r.text
        r = c.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 2, "width": 64, "height": 64})
        assert r.status_code == 200 and len(r.json()["images"]) == 1       # the server is still up


def test_sdgen_serve_command(tmp_path):
    """The CLI entry point: bad options in one line; a real `sdgen serve` process answering on 127.0.0.1."""
    assert cli(["serve", "--model", "demo", "--queue-size", "-1"]) == 1
    assert cli(["serve", "--model", "demo", "--api-auth", "nopassword"]) == 1
    proc = subprocess.Popen([sys.executable, "-m", "sdgen.cli", "serve", "--model", "demo", "--port", "0",
                             "--precision", "fp32"], stderr=subprocess.PIPE, text=True)
    try:
        line = ""
        while "sdgen serve: http://" not in line:
            line = proc.stderr.readline()
            assert line or proc.poll() is None, "the server exited"
        url = line.split()[2].rstrip("/")
        assert url.startswith("http://127.0.0.1:")
        assert httpx.get(url + "/sdapi/v1/options", timeout=30).json()["sd_model_checkpoint"] == "demo"
    finally:
        proc.terminate()
        proc.wait(30)


# ----------------------------------------------------------------------------------------------- previews


def test_fitted_projection_previews_closer_than_sd1_factors(server):
    """The cheap preview, fitted to the loaded VAE at load time, is nearer the real decode than A1111's SD1 factors
    on the demo model (whose VAE is not SD1's)."""
    from sdgen.serve.preview import LatentPreview

    pipe = server[0].state.worker.pipe
    result = pipe.generate(PROMPT, steps=8, seed=2, output_type="latent")
    full = np.asarray(pipe.to_images(result.latents)[0], dtype=float)
    fitted, sd1 = server[0].state.worker.preview, LatentPreview()
    assert fitted.name == "latent projection" and not torch_equal(fitted.factors, sd1.factors)
    err = {name: np.abs(np.asarray(p(result.latents), dtype=float) - full).mean() for name, p in
           (("fitted", fitted), ("sd1", sd1))}
    assert err["fitted"] < 0.85 * err["sd1"], err


def torch_equal(a, b):
    return a.shape == b.shape and bool((a == b).all())


def test_taesd_preview_decoder(server, tmp_path):
    """--preview-decoder: previews are the TAESD decode (sdgen.nets.taesd), the same as diffusers' AutoencoderTiny."""
    import torch
    from diffusers import AutoencoderTiny

    from sdgen import images
    from sdgen.serve.preview import TaesdPreview

    torch.manual_seed(0)
    ref = AutoencoderTiny(encoder_block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8)).eval()
    ref.save_pretrained(tmp_path / "taesd")
    latents = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        want = images.to_pil(ref.decode(latents).sample)[0]
    got = TaesdPreview(tmp_path / "taesd")(latents)
    assert got.size == (64, 64)
    assert np.abs(np.asarray(got, dtype=int) - np.asarray(want, dtype=int)).max() <= 1
    pipe = server[0].state.worker.pipe
    app = create_app(Settings(model="demo", preview_decoder=str(tmp_path / "taesd"), limits=Limits(max_steps=1000)),
                     load=lambda m: pipe)
    with Background(app) as url, httpx.Client(base_url=url, timeout=60) as c, ThreadPoolExecutor(1) as pool:
        future = pool.submit(c.post, "/sdapi/v1/txt2img", json={"prompt": PROMPT, "steps": 1000, "width": 96,
                                                                  "height": 64})
        p = wait_for(lambda: (q := c.get("/sdapi/v1/progress").json())["current_image"] and q)
        assert Image.open(io.BytesIO(base64.b64decode(p["current_image"]))).size == (96, 64)
        assert app.state.worker.preview.name == "TAESD"
        c.post("/sdapi/v1/interrupt")
        assert future.result(timeout=60).status_code == 200
