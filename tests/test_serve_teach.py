"""Teaching a new class through the HTTP API (POST /api/teach, GET /api/teach/<id>) on a tiny saved model."""

from __future__ import annotations

import base64
import dataclasses
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

import latentdiff.teach  # noqa: E402
from latentdiff import LatentDiffusion  # noqa: E402
from latentdiff.errors import TrainingDiverged  # noqa: E402
from latentdiff.serve.app import Limits, create_app  # noqa: E402
from latentdiff.serve.images import decode_image  # noqa: E402
from latentdiff.teach import TeachConfig, taught_pipeline  # noqa: E402

from conftest import tiny_pipeline  # noqa: E402

LIMITS = Limits(max_images=12, max_steps=50, max_image_side=64, max_body_bytes=64 * 1024, max_teach_images=6,
                max_teach_steps=20)
TINY = TeachConfig(steps=5, batch_size=8, variants=2, prior_per_class=2)  # the server's default: 5 steps
STEPS = 4  # what the requests ask for


def png_b64(array: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def drawings(k: int = 3, side: int = 56) -> list[str]:
    """k drawings of a plus sign, each a little different, as the page sends them (a data: URL, then raw base64)."""
    out = []
    for i in range(k):
        a = np.zeros((side, side), np.uint8)
        c, w = side // 2 + i % 2, side // 14
        a[c - w:c + w, side // 5:-side // 5] = 255
        a[side // 5:-side // 5, c - w - i % 3:c + w] = 255
        out.append(("data:image/png;base64," if i == 0 else "") + png_b64(a))
    return out


def folder_state(folder) -> dict[str, tuple[bytes, int]]:
    """Every file's bytes and modification time."""
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))
            if p.is_file()}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny LDM with an autoguidance guide, which a taught pipeline drops: that tells the two pipelines apart."""
    folder = tmp_path_factory.mktemp("serve_teach") / "ldm"
    base = tiny_pipeline()
    LatentDiffusion(base.unet, base.vae, base.config, guide=tiny_pipeline(seed=3).unet).save_pretrained(folder)
    return folder


@pytest.fixture
def serve(model_dir):
    """start(**create_app keywords) -> a test client of a fresh server over the model; all stopped at the end."""
    made = []

    def start(**kwargs):
        kwargs = {"teach_config": TINY, **kwargs}
        client = TestClient(create_app(LatentDiffusion.from_pretrained(model_dir), model_dir, LIMITS, **kwargs),
                            raise_server_exceptions=False).__enter__()
        made.append(client)
        return client

    yield start
    for c in made:
        c.__exit__(None, None, None)


def wait_done(client, job: dict, timeout: float = 60) -> tuple[dict, list[int]]:
    """Poll the job until it is no longer running: (its last report, the steps seen on the way)."""
    deadline, seen = time.monotonic() + timeout, []
    while job["status"] == "running":
        assert time.monotonic() < deadline, f"the teach job did not finish within {timeout} s: {job}"
        time.sleep(0.02)
        r = client.get(job["url"])
        assert r.status_code == 200, r.text
        job = r.json()
        seen.append(job["step"])
    return job, seen


def start_teach(client, name: str = "plus", **body) -> dict:
    r = client.post("/api/teach", json={"name": name, "images": drawings(), "steps": STEPS, **body})
    assert r.status_code == 202, r.text
    assert r.headers["location"] == r.json()["url"] == f"/api/teach/{r.json()['id']}"
    return r.json()


def generate(client, labels, seed: int = 3, **body) -> dict:
    r = client.post("/api/generate", json={"labels": labels, "seed": seed, **body})
    assert r.status_code == 200, r.text
    return r.json()


def test_teach_job_lifecycle(serve, model_dir):
    """202 with a job, progress up to its steps, done with the new label; /api/info lists it; /api/generate and the edits
    accept it by index and by name, and make what teach() makes; the old classes keep their bits; the folder is untouched."""
    before = folder_state(model_dir)
    client = serve()
    old = generate(client, list(range(10)))["image"]
    job = start_teach(client)
    assert job["status"] == "running" and job["name"] == "plus" and job["steps"] == STEPS and job["examples"] == 3
    done, seen = wait_done(client, job)
    assert done["status"] == "done" and done["label"] == 10 and done["step"] == STEPS and "adapter" not in done, done
    assert seen == sorted(seen) and done["seconds"] > 0
    info = client.get("/api/info").json()
    assert info["classes"] == list(range(11)) and info["class_names"] == [*map(str, range(10)), "plus"]
    assert info["teach"]["enabled"] and info["teach"]["running"] is None and info["teach"]["default_steps"] == 5

    out = generate(client, [10, "plus", "3"], seed=1)
    assert out["count"] == 3 and out["settings"]["labels"] == [10, 10, 3]
    # What teach() and taught_pipeline() make from the same drawings, outside the server, bit for bit.
    pipe = LatentDiffusion.from_pretrained(model_dir)
    images = torch.cat([decode_image("image", d, 64) for d in drawings()])
    cfg = dataclasses.replace(TINY, steps=STEPS)
    taught = taught_pipeline(pipe, latentdiff.teach.teach(pipe, images, cfg), "plus", cfg)
    want = taught.generate([10], seed=1)
    got = generate(client, [10], seed=1)["image"]
    grid = np.asarray(Image.open(io.BytesIO(base64.b64decode(got.split(",", 1)[1]))))
    assert np.array_equal(grid[2:30, 2:30], (want[0, 0] * 255).round().byte().numpy())

    assert generate(client, list(range(10)))["image"] == old  # the old classes, bit for bit
    r = client.post("/api/img2img", json={"image": drawings()[1], "label": "plus", "steps": 3, "seed": 0})
    assert r.status_code == 200 and r.json()["settings"]["label"] == 10, r.text
    r = client.post("/api/generate", json={"labels": [11]})
    assert r.status_code == 422 and "0..10" in r.json()["error"]
    assert folder_state(model_dir) == before, "teaching wrote into the model folder"


def test_queued_requests_finish_on_the_pipeline_they_came_with(serve):
    """A request queued before the swap runs on the old pipeline (which has a guide); one after it sees the new class
    and the new pipeline (which has none)."""
    client = serve()
    service = client.app.state.service
    body = {"labels": [4], "seed": 2, "steps": 3, "autoguidance_scale": 2.0, "format": "png"}
    out: dict = {}
    with service.lock:  # the model is busy: the request waits in the batcher
        t = threading.Thread(target=lambda: out.update(r=client.post("/api/generate", json=body)))
        t.start()
        deadline = time.monotonic() + 30
        while service.batcher.taken < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        done, _ = wait_done(client, start_teach(client))  # teaching needs no model call of the batcher
        assert done["status"] == "done", done
        r = client.post("/api/generate", json=body)
        assert r.status_code == 422 and "needs a guide model" in r.json()["error"], r.text
        assert "r" not in out
    t.join(60)
    assert out["r"].status_code == 200, out["r"].text
    guided = LatentDiffusion.from_pretrained(service.model_dir).generate([4], seed=2, steps=3, autoguidance_scale=2.0)
    png = np.asarray(Image.open(io.BytesIO(out["r"].content)))
    assert np.array_equal(png[2:30, 2:30], (guided[0, 0] * 255).round().byte().numpy())


def test_one_teach_at_a_time_and_a_shutdown_stops_it(serve, monkeypatch):
    """A second teach while one runs is a 409 naming the running job; closing the server cancels the running job."""
    go = threading.Event()
    real = latentdiff.teach.teach

    def held(*args, **kwargs):  # the real teaching, started when the test says
        go.wait(30)
        return real(*args, **kwargs)

    monkeypatch.setattr(latentdiff.teach, "teach", held)
    client = serve()
    service = client.app.state.service
    job = start_teach(client)
    r = client.post("/api/teach", json={"name": "minus", "images": drawings(), "steps": STEPS})
    assert r.status_code == 409 and "already running ('plus', step 0 of 4)" in r.json()["error"], r.text
    assert job["url"] in r.json()["error"]
    assert client.get("/api/info").json()["teach"]["running"] == job["id"]
    client.__exit__(None, None, None)  # shut down while the job waits: it stops at its first step
    go.set()
    deadline = time.monotonic() + 30
    while (view := service.teacher.view(job["id"]))["status"] == "running":
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert view["status"] == "failed" and "shut down" in view["error"] and service.pipe.num_classes == 10


def test_a_failed_job_reports_its_error_and_keeps_the_model(serve, monkeypatch):
    def diverge(*args, **kwargs):
        raise TrainingDiverged("the teaching loss became nan; try a lower lr (now 0.0002)")

    monkeypatch.setattr(latentdiff.teach, "teach", diverge)
    client = serve()
    done, _ = wait_done(client, start_teach(client))
    assert done["status"] == "failed" and done["error"].startswith("the teaching loss became nan") and "label" not in done
    assert client.get("/api/info").json()["class_names"][-1] == "9"


def test_teach_dir_saves_adapters_that_load_as_served_and_stack(serve, model_dir, tmp_path):
    before = folder_state(model_dir)
    client = serve(teach_dir=tmp_path / "taught")
    assert client.get("/api/info").json()["teach"]["saves_to"] == str(tmp_path / "taught")
    first, _ = wait_done(client, start_teach(client, "a/b"))  # a name that is no folder name
    second, _ = wait_done(client, start_teach(client, "minus"))
    assert first["status"] == second["status"] == "done" and (first["label"], second["label"]) == (10, 11)
    assert sorted(p.name for p in (tmp_path / "taught").iterdir()) == sorted(
        [f"a_b-{first['id']}", f"minus-{second['id']}"])
    for job, names in ((first, ["a/b"]), (second, ["a/b", "minus"])):
        meta = json.loads((tmp_path / "taught" / job["adapter"].rsplit("/", 1)[-1] / "adapter.json").read_text())
        assert meta["class_names"] == names and meta["base"] == str(model_dir.resolve())
    loaded = LatentDiffusion.from_pretrained(second["adapter"])
    assert loaded.class_names[-2:] == ["a/b", "minus"]
    want = loaded.generate([10, 11, 5], seed=4)
    grid = np.asarray(Image.open(io.BytesIO(client.post("/api/generate", json={
        "labels": ["a/b", "minus", 5], "seed": 4, "format": "png"}).content)))
    for i in range(3):
        assert np.array_equal(grid[2 + 30 * i:30 + 30 * i, 2:30], (want[i, 0] * 255).round().byte().numpy())
    assert folder_state(model_dir) == before
    with pytest.raises(ValueError, match="inside the model folder"):
        create_app(LatentDiffusion.from_pretrained(model_dir), model_dir, LIMITS, teach_dir=model_dir / "taught")


BAD_TEACH = [
    ({"images": drawings(1)}, 422, "images", "2..6 images"),
    ({"images": drawings(7)}, 422, "images", "2..6 images, got 7"),
    ({"images": "abc"}, 422, "images", "list"),
    ({"images": [drawings()[0], "not base64!"]}, 422, "images[1]", "base64"),
    ({"images": [drawings()[0], base64.b64encode(b"plain text").decode()]}, 422, "images[1]", "not an image"),
    ({"images": [*drawings(2), png_b64(np.zeros((20, 20), np.uint8))]}, 422, "images[2]", "28x28 to 64x64"),
    ({"images": [*drawings(2), png_b64(np.zeros((28, 40), np.uint8))]}, 422, "images[2]", "square"),
    ({"images": [drawings()[1], 5]}, 422, "images[1]", "string"),
    ({"name": "7"}, 422, "name", "already has a class named '7'"),
    ({"name": "  "}, 422, "name", "1-40 printable characters"),
    ({"name": "x" * 41}, 422, "name", "1-40 printable characters"),
    ({"name": 5}, 422, "name", "printable"),
    ({"name": None}, 422, "name", "required"),
    ({"steps": 21}, 422, "steps", "1..20"),
    ({"steps": 0}, 422, "steps", "1..20"),
    ({"steps": "many"}, 422, "steps", "integer"),
    ({"method": "lora"}, 422, "method", "valid fields"),
]


@pytest.mark.parametrize("change,status,field,hint", BAD_TEACH)
def test_bad_teach_requests_are_4xx_naming_the_fix(serve, change, status, field, hint):
    client = serve()
    body = {k: v for k, v in {"name": "plus", "images": drawings(), "steps": STEPS, **change}.items() if v is not None}
    r = client.post("/api/teach", json=body)
    assert r.status_code == status and r.json()["field"] == field and hint in r.json()["error"], r.text
    assert "\n" not in r.json()["error"] and client.app.state.service.teacher.jobs == {}


@pytest.mark.parametrize("kwargs,status,hint", [
    ({"content": b'{"name": "plus", "images": [', "headers": {"content-type": "application/json"}}, 400, "not valid JSON"),
    ({"json": ["plus"]}, 400, "JSON object"),
    ({"content": b"name=plus", "headers": {"content-type": "application/x-www-form-urlencoded"}}, 415, "application/json"),
    ({"json": {"name": "plus", "images": ["x" * (70 * 1024)] * 2}}, 413, "65536-byte limit"),
])
def test_malformed_teach_bodies_are_4xx(serve, kwargs, status, hint):
    client = serve()
    r = client.post("/api/teach", **kwargs)
    assert r.status_code == status and hint in r.json()["error"], r.text


def test_teaching_off_and_unknown_jobs(serve):
    client = serve(teach_config=None)
    info = client.get("/api/info").json()
    assert info["teach"] == {"enabled": False, "reason": "the server was started with --no-teach"}
    r = client.post("/api/teach", json={"name": "plus", "images": drawings()})
    assert r.status_code == 403 and "--no-teach" in r.json()["error"], r.text
    for c in (client, serve()):
        r = c.get("/api/teach/0123abcd")
        assert r.status_code == 404 and "POST /api/teach" in r.json()["error"], r.text


def test_a_distilled_student_is_not_taught(tmp_path):
    from latentdiff.distill import make_student

    base = tiny_pipeline()
    student = LatentDiffusion(make_student(base.unet, guidance_embed_scale=10.0), base.vae, base.config)
    with TestClient(create_app(student, tmp_path, LIMITS, teach_config=TINY)) as client:
        assert "distilled student" in client.get("/api/info").json()["teach"]["reason"]
        r = client.post("/api/teach", json={"name": "plus", "images": drawings()})
        assert r.status_code == 403 and "serve the LDM folder" in r.json()["error"], r.text


def test_cli_refuses_no_teach_with_a_teach_dir(monkeypatch, capsys, model_dir, tmp_path):
    import sys

    from latentdiff.cli import run_main
    from latentdiff.serve.__main__ import main
    monkeypatch.setattr(sys, "argv", ["serve", "--model", str(model_dir), "--no-teach", "--teach-dir", str(tmp_path)])
    with pytest.raises(SystemExit) as e:
        run_main(main)
    assert e.value.code == 2 and "--no-teach" in capsys.readouterr().err
