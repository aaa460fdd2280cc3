"""`sdgen batch` on one machine: lines -> requests, stable ids, atomic resumable outputs, failures.jsonl, progress,
and the CLI's exact pixels for the same line and seed. (The Ray path and its kill-and-resume test: test_ray.py.)"""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

import sdgen
from sdgen import SdgenError, batch
from sdgen.cli import main
from sdgen.families import open_checkpoint
from sdgen.request import GenerationRequest

FAST = ["--model", "demo", "--precision", "fp32", "--steps", "3"]


def write(path, lines):
    path.write_text("".join((json.dumps(x) if isinstance(x, dict) else x) + "\n" for x in lines))
    return path


@pytest.fixture(scope="module")
def demo():
    return sdgen.load("demo", dtype="float32")


def pixels(path):
    return np.asarray(Image.open(path))


# ---------------------------------------------------------------------------------------------- reading


def test_a1111_fields_map_to_the_request(tmp_path):
    f = write(tmp_path / "p.jsonl", [
        {"prompt": "a cat", "negative_prompt": "blurry", "steps": 7, "cfg_scale": 5.5, "sampler_name": "DPM++ 2M",
         "scheduler": "Karras", "seed": 42, "width": 64, "height": 96, "batch_size": 2, "n_iter": 3,
         "override_settings": {"CLIP_stop_at_last_layers": 2}, "enable_hr": False, "restore_faces": False},
        {"prompt": "a dog", "sampler_index": "Euler a", "seed": -1},
    ])
    first, second = batch.read_lines(f)
    assert first.request == GenerationRequest("a cat", "blurry", steps=7, guidance_scale=5.5, sampler="dpmpp_2m",
                                              schedule="karras", seed=42, width=64, height=96, batch_size=2,
                                              clip_skip=2)
    assert first.n_iter == 3 and first.ignored == ("enable_hr", "restore_faces") and not first.error
    assert second.request == GenerationRequest("a dog", sampler="euler_a", seed=batch.line_seed(second.id))
    jobs, refused = batch.plan([first, second], open_checkpoint("demo"))
    assert not refused
    # n_iter batches of batch_size, the seeds going on (as the HTTP API runs them): 6 images, seeds 42..47
    reqs = [GenerationRequest(**fields) for fields in json.loads(jobs[0].requests)]
    assert [r.seeds for r in reqs] == [[42, 43], [44, 45], [46, 47]]
    assert jobs[0].names == [f"{first.id}.{k}.png" for k in range(6)]
    # a line without a seed (or A1111's -1) gets one from its id: every run and every worker draws the same
    again = json.loads(jobs[1].requests)[0]
    assert again["seed"] == batch.line_seed(second.id) and again["width"] == 128   # the model's native size


def test_ids_are_stable_named_and_unique(tmp_path):
    lines = [{"prompt": "a"}, {"prompt": "b", "steps": 3}, {"prompt": "a"}, {"prompt": "c", "id": "cover_01"}]
    ids = [line.id for line in batch.read_lines(write(tmp_path / "1.jsonl", lines))]
    assert ids[3] == "cover_01" and ids[2] == ids[0] + "-2" and len(set(ids)) == 4
    # ids come from the content: inserting and reordering lines renames nothing; key order does not matter
    again = batch.read_lines(write(tmp_path / "2.jsonl", [{"prompt": "new"}, {"steps": 3, "prompt": "b"},
                                                          lines[3], lines[0]]))
    assert [line.id for line in again[1:]] == [ids[1], ids[3], ids[0]]
    # a plain-text file: one prompt per line, the same id as the JSON line with that prompt
    text = batch.read_lines(write(tmp_path / "p.txt", ["a", "", "  b with spaces  "]))
    assert [(line.number, line.request.prompt) for line in text] == [(1, "a"), (3, "b with spaces")]
    assert text[0].id == ids[0]


@pytest.mark.parametrize("line, message", [
    ("not json", "not JSON"),
    ('["a list"]', "must be a JSON object"),
    ('{"steps": 3}', "no prompt"),
    ('{"prompt": "a", "id": "../escape"}', "is not a name"),
    ('{"prompt": "a", "id": "a.png"}', "is not a name"),
    ('{"prompt": "a", "sampler_name": "nope"}', "sampler_name: unknown sampler"),
    ('{"prompt": "a", "scheduler": "Exponential"}', "scheduler: unknown scheduler"),
    ('{"prompt": "a", "n_iter": 0}', "n_iter: must be at least 1"),
    ('{"prompt": "a", "steps": "many"}', "steps: Input should be a valid integer"),
    ('{"prompt": "a", "steps": 0}', "steps: must be from 1 to 1000"),
    ('{"prompt": "a", "width": 100}', "width: must be a multiple of 8"),
    ('{"prompt": "a", "cfg_scale": 101}', "guidance scale must be a number from 0 to 100"),
    ('{"prompt": "a", "override_settings": {"sd_model_checkpoint": "other"}}', "renders every line with its --model"),
    ('{"prompt": "a", "id": "x"}\n{"prompt": "b", "id": "x"}', "already used by line 1"),
])
def test_bad_lines_are_refused_with_a_reason(tmp_path, line, message):
    lines = batch.read_lines(write(tmp_path / "p.jsonl", [line]))
    jobs, refused = batch.plan(lines, open_checkpoint("demo"))
    assert len(refused) == 1 and message in refused[0][1], refused


def test_whole_file_problems_are_one_line(tmp_path):
    with pytest.raises(SdgenError, match="not found"):
        batch.read_lines(tmp_path / "missing.jsonl")
    with pytest.raises(SdgenError, match="empty"):
        batch.read_lines(write(tmp_path / "blank.txt", ["", "  "]))
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00prompt")
    with pytest.raises(SdgenError, match="not UTF-8"):
        batch.read_lines(tmp_path / "bin.txt")


# ---------------------------------------------------------------------------------------------- the driver


def test_failures_are_recorded_and_cleared_and_progress_counts(tmp_path):
    lines = batch.read_lines(write(tmp_path / "p.jsonl", [{"prompt": f"p{i}", "id": f"l{i}"} for i in range(3)]))
    jobs, _ = batch.plan(lines)
    store = batch.Store(tmp_path / "out")
    png = Image.new("RGB", (8, 8))
    import io

    buf = io.BytesIO()
    png.save(buf, format="PNG")
    rows = [{"id": "l0", "pngs": [buf.getvalue()], "error": ""}, {"id": "l1", "pngs": [], "error": "boom\nline two"},
            {"id": "l2", "pngs": [buf.getvalue()], "error": ""}]
    said = []
    progress = batch.run(jobs, store, iter(rows), batch.Progress(3, 4, said.append, every=0))
    assert (progress.rendered, progress.failed, progress.images) == (2, 1, 2)
    assert said[0].startswith("batch: 1/3 lines (1 rendered, 0 failed, 4 done before), ") and "ETA" in said[0]
    assert said[-1].startswith("batch: 3/3 lines (2 rendered, 1 failed, 4 done before)") and "ETA 0:00:00" in said[-1]
    failures = [json.loads(x) for x in (tmp_path / "out" / "failures.jsonl").read_text().splitlines()]
    assert failures == [{"id": "l1", "line": 2, "error": "boom?line two"}]   # one line, whatever the error held
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["failures.jsonl", "l0.png", "l2.png"]
    # a rerun reads the failures back; a line that now renders leaves the file, which goes when it is empty
    store = batch.Store(tmp_path / "out")
    assert set(store.failures) == {"l1"} and [j.id for j in jobs if not store.done(j)] == ["l1"]
    batch.run(jobs[1:2], store, iter([{"id": "l1", "pngs": [buf.getvalue()], "error": ""}]))
    assert not (tmp_path / "out" / "failures.jsonl").exists() and store.done(jobs[1])


def test_cli_batch_matches_cli_generate_and_resumes(tmp_path, demo, capsys):
    prompts = write(tmp_path / "p.jsonl", [
        {"prompt": "a red circle on a blue background", "seed": 3, "id": "red"},
        {"prompt": "a green square on a white background", "cfg_scale": 5, "sampler_name": "Euler a"},
        {"prompt": "a blue triangle on a yellow background", "batch_size": 2, "seed": 11},
        {"prompt": "a cat", "steps": 0},                 # refused; the batch goes on
        "not json",
    ])
    out = tmp_path / "out"
    assert main(["batch", str(prompts), "--out", str(out), *FAST]) == 1
    err = capsys.readouterr().err
    assert "batch: 5 lines: 0 done before, 2 refused, 3 to render" in err
    assert "batch: 3/3 lines (3 rendered, 0 failed)" in err and "2 of 5 lines failed" in err.splitlines()[-1]
    jobs, _ = batch.plan(batch.read_lines(prompts, {"steps": 3}), open_checkpoint("demo"))
    files = sorted(p.name for p in out.iterdir())
    assert files == sorted(["failures.jsonl", *[n for j in jobs for n in j.names]]) and len(files) == 5

    # the same line and seed give exactly the CLI's image (and its parameters text)
    assert main(["generate", "a red circle on a blue background", "--seed", "3", "-o", str(tmp_path / "cli.png"),
                 *FAST]) == 0
    assert np.array_equal(pixels(out / "red.png"), pixels(tmp_path / "cli.png"))
    assert Image.open(out / "red.png").text == Image.open(tmp_path / "cli.png").text
    for job in jobs:   # ... and of the Python API, seed + k for image k
        req, = [GenerationRequest(**fields) for fields in json.loads(job.requests)]
        for name, image in zip(job.names, demo.generate(req).images):
            assert np.array_equal(pixels(out / name), np.asarray(image)), name

    # a rerun renders nothing that is done (the files are untouched) and retries the failures
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")}
    write(prompts, [*[json.loads(x) for x in prompts.read_text().splitlines()[:3]], {"prompt": "a cat", "steps": 2}])
    assert main(["batch", str(prompts), "--out", str(out), *FAST]) == 0
    err = capsys.readouterr().err
    assert "batch: 4 lines: 3 done before, 0 refused, 1 to render" in err
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.png") if p.name in before} == before
    assert not (out / "failures.jsonl").exists() and len(list(out.glob("*.png"))) == 5


def test_killed_batch_leaves_no_partial_file_and_the_rerun_completes(tmp_path):
    """A real kill (SIGKILL, no chance to clean up) midway, then a rerun: every line exactly once."""
    n = 8
    prompts = write(tmp_path / "p.txt", [f"a red circle on a blue background {i}" for i in range(n)])
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "sdgen.cli", "batch", str(prompts), "--out", str(out), *FAST]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while len(list(out.glob("*.png"))) < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()
    proc.stderr.close()
    first = {p.name: p.stat().st_ino for p in out.glob("*.png")}
    assert 2 <= len(first) < n, "the kill came too late to test a resume"
    assert all(Image.open(out / name).size == (128, 128) for name in first)   # every visible file is whole

    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert f"{len(first)} done before" in r.stderr and f"{n - len(first)} to render" in r.stderr
    jobs, _ = batch.plan(batch.read_lines(prompts), open_checkpoint("demo"))
    assert sorted(os.listdir(out)) == sorted(j.names[0] for j in jobs)   # exactly once; no .part, no failures
    assert {name: (out / name).stat().st_ino for name in first} == first  # done files were not rewritten
