"""The HTTP API through Starlette's test client, on a tiny saved model."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("starlette", reason="the serve extra is not installed: pip install -e '.[serve]'")
pytest.importorskip("httpx2", reason="Starlette's test client needs httpx2: pip install -e '.[test]'")
from starlette.testclient import TestClient  # noqa: E402

from latentdiff import LatentDiffusion  # noqa: E402
from latentdiff.serve.app import Limits, create_app  # noqa: E402
from latentdiff.serve.images import decode_image  # noqa: E402

from conftest import tiny_pipeline  # noqa: E402

LIMITS = Limits(max_images=12, max_steps=50, max_image_side=64, max_body_bytes=64 * 1024)


def folder_digest(folder) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*"))
            if p.is_file()}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("serve") / "ldm"
    tiny_pipeline().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def client(model_dir):
    before = folder_digest(model_dir)
    app = create_app(LatentDiffusion.from_pretrained(model_dir), model_dir, LIMITS)
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c
    assert folder_digest(model_dir) == before, "the server wrote into the model folder"


def png_b64(array: np.ndarray, mode: str | None = "L", fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    Image.fromarray(array, mode).save(buf, format=fmt)
    return base64.b64encode(buf.getvalue()).decode()


def digit(side: int = 56) -> np.ndarray:
    a = np.zeros((side, side), np.uint8)
    a[side // 5: -side // 5, side // 2 - side // 14: side // 2 + side // 14] = 255  # a white "1"
    return a


def decode_png(data_url: str) -> np.ndarray:
    assert data_url.startswith("data:image/png;base64,")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1]))))


# ------------------------------------------------------------------------------------- info and the page
def test_health_and_info(client, model_dir):
    assert client.get("/api/health").json() == {"status": "ok"}
    info = client.get("/api/info").json()
    assert info["model"] == str(model_dir) and info["device"] == "cpu" and info["classes"] == list(range(10))
    assert info["defaults"]["steps"] == 4 and info["defaults"]["sampler"] == "dpm++"
    assert info["samplers"] == ["ddim", "ddpm", "dpm++", "lcm"] and info["edits"] == ["img2img", "inpaint", "every_class"]
    assert info["limits"]["max_images"] == 12 and info["limits"]["max_steps"] == 50


def test_page_and_static_files_are_served(client):
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    for src in ("/static/app.js", "/static/style.css"):
        assert src in page.text and client.get(src).status_code == 200
    assert "http" not in page.text.replace("http-equiv", ""), "the page must not load anything from the network"


# ------------------------------------------------------------------------------------- generate
def test_generate_grid_settings_and_seed_reproduce(client):
    body = {"labels": [3, 7], "per_label": 3, "steps": 3, "guidance_scale": 2.0, "seed": 11}
    r = client.post("/api/generate", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["settings"] == {"labels": [3, 7], "per_label": 3, "guidance_scale": 2.0, "steps": 3,
                               "sampler": "dpm++", "eta": 0.0, "seed": 11, "autoguidance_scale": 1.0,
                               "spacing": "uniform"}
    assert out["count"] == 6 and out["columns"] == 3 and out["seconds"] > 0
    grid = decode_png(out["image"])
    assert grid.shape == (2 + 2 * 30, 2 + 3 * 30)  # 2 rows x 3 columns of 28 px + 2 px padding
    # The same settings give the same pixels; they match the Python API's output.
    assert client.post("/api/generate", json=out["settings"]).json()["image"] == out["image"]
    pipe = tiny_pipeline()
    images = pipe.generate([3, 3, 3, 7, 7, 7], guidance_scale=2.0, steps=3, seed=11)
    first = (images[0, 0] * 255).round().byte().numpy()
    assert np.array_equal(grid[2:30, 2:30], first)


def test_autoguidance_needs_a_guide_and_matches_the_python_api(client, tmp_path):
    r = client.post("/api/generate", json={"labels": [1], "autoguidance_scale": 2.0})
    assert r.status_code == 422 and "needs a guide model" in r.json()["error"], r.text
    base = tiny_pipeline()
    guided = LatentDiffusion(base.unet, base.vae, base.config, guide=tiny_pipeline(seed=3).unet)
    guided.save_pretrained(tmp_path / "guided")
    with TestClient(create_app(LatentDiffusion.from_pretrained(tmp_path / "guided"), tmp_path / "guided", LIMITS)) as c:
        assert c.get("/api/info").json()["defaults"]["has_guide"] is True
        body = {"labels": [3], "steps": 3, "guidance_scale": 1.0, "autoguidance_scale": 2.0, "seed": 5}
        out = c.post("/api/generate", json=body).json()
        plain = c.post("/api/generate", json={**body, "autoguidance_scale": 1.0}).json()
        assert out["settings"]["autoguidance_scale"] == 2.0 and out["image"] != plain["image"]
        want = guided.generate([3], steps=3, guidance_scale=1.0, autoguidance_scale=2.0, seed=5)
        assert np.array_equal(decode_png(out["image"])[2:30, 2:30], (want[0, 0] * 255).round().byte().numpy())
        assert c.post("/api/img2img", json={"image": png_b64(digit()), "label": 8, "steps": 3,
                                            "autoguidance_scale": 2.0}).status_code == 200


def test_generate_draws_and_returns_a_seed_and_the_model_defaults(client):
    a = client.post("/api/generate", json={"labels": [1]}).json()
    b = client.post("/api/generate", json={"labels": [1]}).json()
    assert a["settings"]["steps"] == 4 and a["settings"]["guidance_scale"] == 3.0 and a["settings"]["per_label"] == 1
    assert isinstance(a["settings"]["seed"], int) and a["settings"]["seed"] != b["settings"]["seed"]
    again = client.post("/api/generate", json=a["settings"]).json()
    assert again["image"] == a["image"]


def test_generate_png_format_carries_settings_in_a_header(client):
    r = client.post("/api/generate", json={"labels": [0, 1], "seed": 5, "format": "png"})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(r.content)).size == (32, 62)
    assert json.loads(r.headers["x-settings"])["seed"] == 5 and float(r.headers["x-seconds"]) > 0


BAD_GENERATE = [
    ({"labels": [10]}, "labels", "0..9"),
    ({"labels": []}, "labels", "1..12"),
    ({"labels": "3"}, "labels", "list"),
    ({"labels": [1.5]}, "labels", "integers"),
    ({"labels": [True]}, "labels", "integers"),
    ({}, "labels", "required"),
    ({"labels": [1], "per_label": 0}, "per_label", "1..12"),
    ({"labels": [1, 2], "per_label": 7}, "per_label", "limit is 12"),
    ({"labels": [1], "steps": 0}, "steps", "1..50"),
    ({"labels": [1], "steps": 51}, "steps", "1..50"),
    ({"labels": [1], "steps": "20"}, "steps", "integer"),
    ({"labels": [1], "steps": 2.5}, "steps", "integer"),
    ({"labels": [1], "guidance_scale": -1}, "guidance_scale", "0..100"),
    ({"labels": [1], "guidance_scale": "high"}, "guidance_scale", "number"),
    ({"labels": [1], "sampler": "euler"}, "sampler", "dpm++"),
    ({"labels": [1], "eta": 2}, "eta", "0..1"),
    ({"labels": [1], "seed": -1}, "seed", "0..9007199254740991"),
    ({"labels": [1], "seed": 2**70}, "seed", "0..9007199254740991"),
    ({"labels": [1], "spacing": "cubic"}, "spacing", "karras"),
    ({"labels": [1], "format": "gif"}, "format", "json"),
    ({"labels": [1], "colour": "red"}, "colour", "valid fields"),
]


@pytest.mark.parametrize("body,field,hint", BAD_GENERATE)
def test_generate_bad_fields_are_422_naming_the_field(client, body, field, hint):
    r = client.post("/api/generate", json=body)
    assert r.status_code == 422, r.text
    err = r.json()
    assert err["field"] == field and field in err["error"] and hint in err["error"], err
    assert "Traceback" not in r.text


def test_pipeline_value_errors_become_422(client, monkeypatch):
    """A check only the pipeline makes still reaches the client as a 422 with the pipeline's message."""
    def refuse(*a, **k):
        raise ValueError("steps must be an integer in 1..100, got 99999")
    monkeypatch.setattr(LatentDiffusion, "sample", refuse)  # what the batcher's model call runs
    r = client.post("/api/generate", json={"labels": [1]})
    assert r.status_code == 422 and r.json() == {"error": "steps must be an integer in 1..100, got 99999"}


def test_unexpected_errors_are_a_json_500_without_a_trace(client, monkeypatch):
    def crash(*a, **k):
        raise RuntimeError("secret internals at /some/path.py line 3")
    monkeypatch.setattr(LatentDiffusion, "sample", crash)  # what the batcher's model call runs
    r = client.post("/api/generate", json={"labels": [1]})
    assert r.status_code == 500 and r.json() == {"error": "internal server error; the server log has the details"}


@pytest.mark.parametrize("kwargs,status,hint", [
    ({"content": b"{not json", "headers": {"content-type": "application/json"}}, 400, "not valid JSON"),
    ({"content": b"\xff\xfe", "headers": {"content-type": "application/json"}}, 400, "UTF-8"),
    ({"content": b"[" * 5000 + b"]" * 5000, "headers": {"content-type": "application/json"}}, 400, "nested"),
    ({"json": [1, 2]}, 400, "JSON object"),
    ({"content": b'{"labels": [1], "seed": ' + b"9" * 5000 + b"}", "headers": {"content-type": "application/json"}}, 400,
     "integer with too many digits"),  # json's int limit: was a 422 quoting sys.set_int_max_str_digits()
    ({"content": b"labels=1", "headers": {"content-type": "application/x-www-form-urlencoded"}}, 415, "application/json"),
    ({"content": b"{}"}, 415, "Content-Type"),
    ({"json": {"labels": [1], "seed": 1, "pad": "x" * (70 * 1024)}}, 413, "65536-byte limit"),
])
def test_malformed_bodies_are_4xx(client, kwargs, status, hint):
    r = client.post("/api/generate", **kwargs)
    assert r.status_code == status and hint in r.json()["error"], r.text


def test_chunked_body_over_the_limit_is_413(client):
    def chunks():
        yield b'{"labels": [1], "pad": "'
        for _ in range(80):
            yield b"x" * 1024
        yield b'"}'
    r = client.post("/api/generate", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413


def test_unknown_routes_and_methods_are_json(client):
    r = client.get("/api/nothing")
    assert r.status_code == 404 and "/api/info" in r.json()["error"]
    r = client.get("/api/generate")
    assert r.status_code == 405 and "GET" in r.json()["error"]


def test_two_concurrent_clients_each_get_their_own_result(client):
    """Requests from two threads at once: the model lock serialises them, each gets the answer it asked for."""
    bodies = [{"labels": [2], "per_label": 4, "seed": 100 + i, "steps": 4} for i in range(2)]
    expected = [client.post("/api/generate", json=b).json()["image"] for b in bodies]
    results: dict[int, list] = {0: [], 1: []}
    barrier = threading.Barrier(2)

    def worker(i: int) -> None:
        barrier.wait()
        for _ in range(3):
            results[i].append(client.post("/api/generate", json=bodies[i]).json()["image"])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert all(results[i] == [expected[i]] * 3 for i in range(2))
    assert expected[0] != expected[1]


def test_server_answers_while_a_model_call_is_running(client):
    """Model calls run in a worker thread: with the model busy, health and info still answer at once."""
    lock = client.app.state.service.lock
    lock.acquire()  # stands in for a long model call
    result = {}
    worker = threading.Thread(target=lambda: result.update(r=client.post("/api/generate", json={"labels": [1], "seed": 0})))
    try:
        worker.start()
        time.sleep(0.3)
        assert client.get("/api/health").status_code == 200
        assert client.get("/api/info").status_code == 200
        assert worker.is_alive() and "r" not in result  # the generate request is still waiting for the model
    finally:
        lock.release()
    worker.join(timeout=60)
    assert result["r"].status_code == 200


# ------------------------------------------------------------------------------------- edits
def test_img2img_returns_variants_the_input_and_reproduces(client):
    body = {"image": png_b64(digit()), "label": 7, "strength": 0.5, "count": 3, "seed": 4, "steps": 4}
    r = client.post("/api/img2img", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["count"] == 3 and out["settings"]["label"] == 7 and out["settings"]["strength"] == 0.5
    assert decode_png(out["image"]).shape == (32, 92) and decode_png(out["input"]).shape == (32, 32)
    assert client.post("/api/img2img", json=body).json()["image"] == out["image"]
    from latentdiff.edit import img2img
    pipe = tiny_pipeline()
    x = decode_image("image", body["image"], 64)
    expected = img2img(pipe, x.expand(3, -1, -1, -1), [7] * 3, 0.5, seed=4, steps=4)
    assert np.array_equal(decode_png(out["image"])[2:30, 2:30], (expected[0, 0] * 255).round().byte().numpy())


def test_every_class_writes_the_drawing_in_every_class(client):
    body = {"image": png_b64(digit()), "label": 1, "steps": 4}
    r = client.post("/api/every_class", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["count"] == 10 and out["columns"] == 10 and decode_png(out["image"]).shape == (32, 302)
    assert out["settings"] == {"label": 1, "strength": 0.7, "guidance_scale": 6.0, "steps": 4, "spacing": "uniform"}
    from latentdiff.edit import every_class
    x = decode_image("image", body["image"], 64)
    expected = every_class(tiny_pipeline(), x, 1, steps=4)  # edit.swap_class's own strength and guidance
    assert np.array_equal(decode_png(out["image"])[2:30, 2 + 30 * 7:30 + 30 * 7],
                          (expected[7, 0] * 255).round().byte().numpy())
    unlabelled = client.post("/api/every_class", json={k: v for k, v in body.items() if k != "label"})
    assert unlabelled.status_code == 200 and unlabelled.json()["image"] != out["image"]
    for change, field in [({"seed": 1}, "seed"), ({"label": 10}, "label"), ({"strength": 2}, "strength"),
                          ({"sampler": "ddim"}, "sampler")]:
        bad = client.post("/api/every_class", json={**body, **change})
        assert bad.status_code == 422 and bad.json()["field"] == field, bad.text


def test_a_16_bit_or_transparent_upload_reads_as_its_8_bit_drawing(client):
    body = {"label": 1, "strength": 0.5, "seed": 0}
    want = client.post("/api/img2img", json={**body, "image": png_b64(digit())}).json()["image"]
    sixteen = png_b64(digit().astype(np.uint16) * 257, None)  # was clipped to white by convert("L")
    rgba = np.zeros((56, 56, 4), np.uint8)
    rgba[..., :3] = 255  # a white ground, all transparent: what a drawing app exports
    rgba[..., 3] = digit()
    for image in (sixteen, png_b64(rgba, "RGBA")):
        r = client.post("/api/img2img", json={**body, "image": image})
        assert r.status_code == 200 and r.json()["image"] == want, r.text


def test_inpaint_keeps_white_mask_pixels(client):
    keep_all = np.full((28, 28), 255, np.uint8)
    body = {"image": png_b64(digit(28)), "mask": png_b64(keep_all), "label": 3, "seed": 0}
    r = client.post("/api/inpaint", json=body)
    assert r.status_code == 200, r.text
    half = keep_all.copy()
    half[:, 14:] = 0  # fill the right half
    filled = client.post("/api/inpaint", json={**body, "mask": png_b64(half)}).json()
    assert filled["settings"]["label"] == 3 and filled["image"] != r.json()["image"]


@pytest.mark.parametrize("change,field,hint", [
    ({"image": "not base64!"}, "image", "base64"),
    ({"image": base64.b64encode(b"plain text").decode()}, "image", "not an image"),
    ({"image": "data:image/png,abc"}, "image", "data: URL"),
    ({"image": png_b64(digit(20))}, "image", "28x28 to 64x64"),
    ({"image": png_b64(digit(100))}, "image", "got 100x100"),
    ({"image": png_b64(np.zeros((28, 40), np.uint8))}, "image", "square"),
    ({"image": png_b64(digit(28), fmt="BMP")}, "image", "BMP"),
    ({"image": png_b64(digit(28))[:60]}, "image", "truncated"),
    ({"image": 5}, "image", "string"),
    ({"label": 10}, "label", "0..9"),
    ({"strength": 1.5}, "strength", "0..1"),
    ({"count": 13}, "count", "1..12"),
    ({"mask": png_b64(digit())}, "mask", "valid fields"),
    ({"image": png_b64(255 - digit())}, "image", "dark ink on a light ground"),
])
def test_img2img_bad_inputs_are_422(client, change, field, hint):
    body = {"image": png_b64(digit()), "label": 1, "strength": 0.5, **change}
    r = client.post("/api/img2img", json=body)
    assert r.status_code == 422, r.text
    assert r.json()["field"] == field and hint in r.json()["error"], r.json()


def test_inpaint_requires_a_mask(client):
    r = client.post("/api/inpaint", json={"image": png_b64(digit()), "label": 1})
    assert r.status_code == 422 and r.json()["field"] == "mask"


# ------------------------------------------------------------------------------------- images and the CLI
def test_decode_image_reads_a_transparent_canvas_as_black_and_box_filters():
    rgba = np.zeros((56, 56, 4), np.uint8)
    rgba[:28, :28] = (255, 255, 255, 255)  # a white top-left quarter, the rest transparent
    x = decode_image("image", png_b64(rgba, "RGBA"), 64)
    assert x.shape == (1, 1, 28, 28)
    assert torch.all(x[0, 0, :14, :14] == 1) and torch.all(x[0, 0, 14:, :] == 0) and torch.all(x[0, 0, :, 14:] == 0)


def test_cli_reports_a_missing_extra_in_one_line(monkeypatch, capsys, model_dir):
    import sys

    from latentdiff.cli import run_main
    from latentdiff.serve.__main__ import main
    monkeypatch.setitem(sys.modules, "uvicorn", None)
    monkeypatch.setattr(sys, "argv", ["serve", "--model", str(model_dir)])
    with pytest.raises(SystemExit) as e:
        run_main(main)
    assert e.value.code == 2
    assert "pip install -e '.[serve]'" in capsys.readouterr().err


@pytest.mark.parametrize("args,hint", [(["--port", "70000"], "--port"), (["--device", "tpu9"], "--device"),
                                       (["--max-images", "0"], "--max-images")])
def test_cli_bad_arguments_exit_2(monkeypatch, capsys, model_dir, args, hint):
    import sys

    from latentdiff.cli import run_main
    from latentdiff.serve.__main__ import main
    monkeypatch.setattr(sys, "argv", ["serve", "--model", str(model_dir), *args])
    with pytest.raises(SystemExit) as e:
        run_main(main)
    assert e.value.code == 2 and hint in capsys.readouterr().err


# ------------------------------------------------------------------------------------- issue 19 defects
def bomb_png(side: int = 30000) -> str:
    """A real PNG declaring side x side pixels of zeros: tens of kB that would decode to gigabytes."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = zlib.compress(b"\0" * (side + 1) * 64, 9)  # only the first 64 rows: the header is what matters
    raw = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0))
           + chunk(b"IDAT", rows) + chunk(b"IEND", b""))
    return base64.b64encode(raw).decode()


@pytest.mark.parametrize("route", ["img2img", "inpaint"])
def test_decompression_bomb_is_refused_before_decoding(client, route, monkeypatch):
    from PIL import Image as PILImage

    def no_open(*a, **k):
        raise AssertionError("Image.open ran on a bomb")

    monkeypatch.setattr(PILImage, "open", no_open)  # refused from the header alone, before PIL sees it
    body = {"image": bomb_png(), "label": 1, **({"mask": png_b64(digit())} if route == "inpaint" else {})}
    r = client.post(f"/api/{route}", json=body)
    assert r.status_code == 422, r.text
    assert r.json()["field"] == "image" and "64x64" in r.json()["error"] and "30000x30000" in r.json()["error"]


def test_a_jpeg_bomb_is_a_4xx_too(client):
    """PIL itself refuses > 179 Mpx at open; that exception is answered as a 4xx, not a 500."""
    buf = io.BytesIO()
    Image.fromarray(digit(28)).save(buf, format="JPEG")
    raw = bytearray(buf.getvalue())
    sof = raw.index(b"\xff\xc0")  # baseline frame header: ... height (2 bytes) width (2 bytes)
    raw[sof + 5: sof + 9] = (60000).to_bytes(2, "big") * 2
    r = client.post("/api/img2img", json={"image": base64.b64encode(bytes(raw)).decode(), "label": 1})
    assert r.status_code == 422 and "over 89478485 pixels" in r.json()["error"], r.text


def test_inpaint_mask_of_another_size_is_refused(client):
    r = client.post("/api/inpaint", json={"image": png_b64(digit(56)), "mask": png_b64(digit(28)), "label": 1})
    assert r.status_code == 422, r.text
    assert r.json()["field"] == "mask" and "28x28 but image is 56x56" in r.json()["error"]


def test_favicon_is_served(client):
    r = client.get("/favicon.ico")
    assert r.status_code == 200 and r.headers["content-type"] == "image/x-icon"
    assert Image.open(io.BytesIO(r.content)).format == "ICO"
    assert 'rel="icon"' in client.get("/").text


def test_the_sampling_fields_come_from_the_settings_type(client):
    """The server's sampling fields are SampleConfig's: its choices, its lower bounds, its defaults (info)."""
    from latentdiff.config import SampleConfig

    info = client.get("/api/info").json()
    assert info["samplers"] == SampleConfig.choices("sampler") and info["spacings"] == SampleConfig.choices("spacing")
    assert set(SampleConfig.CALL_KEYS) <= set(info["defaults"])
    r = client.post("/api/generate", json={"labels": [2], "steps": 2, "spacing": "trailing", "seed": 1})
    assert r.status_code == 200 and r.json()["settings"]["spacing"] == "trailing", r.text
