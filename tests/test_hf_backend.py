"""transformers image-text-to-text models behind the Assistant interface (vlm/hf_assistant.py), on
tiny random-weight models of four families built offline (tests/hf_fixtures.py): chat streams,
evaluation gives what `model.generate` gives one question at a time, 4-bit loads and generates
on the CPU, `medvlm serve` answers the official openai SDK and gradio_client, and a hub id with no
network fails with one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from eval.run import evaluate
from eval.tasks import load_task
from tests.hf_fixtures import FAMILIES, tiny_hf_model, tiny_hf_models, tiny_vlm_folder  # noqa: F401 (fixtures)
from tests.serve_fixtures import TIMEOUT, ct_small, free_port, png_bytes
from vlm.backends import load_assistant
from vlm.cli import main
from vlm.errors import ModelSourceError
from vlm.generation import GenerationConfig

QUESTIONS = ["Is there a pleural effusion?", "What imaging modality is this?", "Is the heart enlarged?",
             "Which organ is shown in this image, and is it normal?", "Any fracture?"]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _image(seed: int, size=(48, 40)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (*size[::-1], 3), dtype=np.uint8))


def _vqa_task(tmp_path):
    lines = []
    for k, question in enumerate(QUESTIONS):
        _image(k, (40 + 8 * k, 48)).save(tmp_path / f"img{k}.png")
        lines.append(json.dumps({"id": f"q{k}", "image": f"img{k}.png", "question": question,
                                 "answer": "yes", "answer_type": "closed"}))
    (tmp_path / "vqa.jsonl").write_text("\n".join(lines) + "\n")
    return load_task("vqa-jsonl", tmp_path / "vqa.jsonl")


@torch.no_grad()
def _direct_answer(assistant, question: str, image: Image.Image, max_new_tokens: int) -> str:
    """What plain transformers gives for one question: the processor's own chat template and
    `model.generate`, greedy, with none of our code in between."""
    processor, model = assistant.processor, assistant.model
    messages = [{"role": "user", "content": [{"type": "image", "image": image},
                                             {"type": "text", "text": f"{question}\nAnswer briefly."}]}]
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def test_the_eval_runner_answers_as_model_generate_does_one_question_at_a_time(tiny_hf_model, tmp_path):
    task = _vqa_task(tmp_path)
    assistant = load_assistant(str(tiny_hf_model))
    results = evaluate(assistant, task, tmp_path / "out", batch_size=4, max_new_tokens=8, bootstrap=0,
                       model_ref=str(tiny_hf_model), progress=False)
    predicted = {json.loads(line)["id"]: json.loads(line)["prediction"]
                 for line in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()}
    expected = {it.id: _direct_answer(assistant, it.question, Image.open(it.image).convert("RGB"), 8)
                for it in task.items}
    assert predicted == expected
    assert any(predicted.values())  # the comparison is not between empty strings only
    info = results["model_info"]
    assert results["backend"] == "transformers" and info["model_type"] == tiny_hf_model.name
    assert info["revision"].startswith("sha256:") and results["prompt_template"].endswith("Answer briefly.")


def test_chat_streams_the_reply_that_generate_gives(tiny_hf_model, tmp_path, capsys):
    image = tmp_path / "x.png"
    _image(7).save(image)
    assistant = load_assistant(str(tiny_hf_model))
    gen = GenerationConfig(max_new_tokens=10).guarded()
    ask = [{"role": "user", "content": "Is the heart enlarged?"}]
    pieces = list(stream := assistant.stream(ask, [Image.open(image).convert("RGB")], gen))
    assert len(pieces) >= 2 and stream.num_tokens >= 2 and stream.finish_reason in ("stop", "length")
    expected = assistant.generate([ask], [[Image.open(image).convert("RGB")]], gen)[0]
    assert "".join(pieces).strip() == expected
    assert main(["chat", "Is the heart enlarged?", "--image", str(image), "--model", str(tiny_hf_model),
                 "--max-new-tokens", "10"]) == 0
    assert capsys.readouterr().out.strip() == expected


def test_bench_eval_and_info_take_a_transformers_model(tiny_hf_models, capsys):
    from eval.bench import bench_eval_batching

    assistant = load_assistant(str(tiny_hf_models["qwen2_5_vl"]))
    questions = [(q, _image(k, (40 + 16 * k, 48))) for k, q in enumerate(QUESTIONS)]
    b = bench_eval_batching(assistant, questions, batch_size=3, max_new_tokens=4)
    # Left-padded batches answer exactly as one question at a time, in either order.
    assert b["same_answers"] == b["same_answers_dataset_order"] == len(QUESTIONS)
    assert main(["info", "--model", str(tiny_hf_models["qwen2_5_vl"])]) == 0
    out = capsys.readouterr().out
    assert "backend      transformers" in out and "model_type   qwen2_5_vl" in out


def test_stop_strings_and_cancel_end_a_transformers_stream(tiny_hf_models):
    assistant = load_assistant(str(tiny_hf_models["gemma3"]))
    image = _image(3)
    ask = [{"role": "user", "content": "What imaging modality is this?"}]
    whole = assistant.generate([ask], [[image]], GenerationConfig(max_new_tokens=12))[0]
    cut = whole.strip()[3:6]
    assert cut.strip(), whole
    gen = GenerationConfig(max_new_tokens=12, stop=(cut,))
    stream = assistant.stream(ask, [image], gen)
    assert "".join(stream).strip() == whole.strip()[:whole.strip().index(cut)].strip()
    assert stream.finish_reason == "stop"
    assert assistant.generate([ask], [[image]], gen)[0] == whole.strip()[:whole.strip().index(cut)].strip()
    calls = []
    stream = assistant.stream(ask, [image], GenerationConfig(max_new_tokens=12),
                              cancelled=lambda: calls.append(1) or len(calls) > 2)
    list(stream)
    assert stream.num_tokens < 12


@pytest.mark.parametrize("family", FAMILIES)
def test_4bit_nf4_loads_and_generates_on_the_cpu(family, tmp_path_factory):
    import bitsandbytes as bnb

    assistant = load_assistant(str(tiny_vlm_folder(family, tmp_path_factory)), quantization="4bit")
    assert sum(isinstance(m, bnb.nn.Linear4bit) for m in assistant.model.modules()) > 0
    stream = assistant.stream(assistant.prompts.vqa_messages("Is there an effusion?"), [_image(1)],
                              GenerationConfig(max_new_tokens=6))
    text = "".join(stream)
    assert stream.num_tokens >= 1 and isinstance(text, str)
    assert assistant.describe()["quantization"] == "4bit"


def test_a_hub_id_with_no_network_fails_with_one_line_naming_it(capsys):
    with pytest.raises(ModelSourceError) as caught:
        load_assistant("hf:google/medgemma-4b-it")
    message = str(caught.value)
    assert "google/medgemma-4b-it" in message and "\n" not in message and "hf download" in message
    assert main(["chat", "hi", "--model", "hf:google/medgemma-4b-it"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("medvlm: error: ") and "google/medgemma-4b-it" in err and len(err.splitlines()) == 1


def test_options_of_another_model_kind_are_refused(tiny_hf_models, capsys):
    assert main(["chat", "hi", "--model", str(tiny_hf_models["llava"]), "--api-key-env", "X"]) == 2
    assert "--api-key-env: not an option of transformers models" in capsys.readouterr().err
    assert main(["chat", "hi", "--model", "demo", "--device-map", "auto"]) == 2
    assert "--device-map: not an option of medvlm models" in capsys.readouterr().err


def test_native_prompt_style_uses_the_model_cards_wording(tiny_hf_models):
    gemma = load_assistant(str(tiny_hf_models["gemma3"]), prompt_style="native")
    assert gemma.prompts.name == "native:medgemma"
    assert gemma.prompts.vqa_messages("Any effusion?")[0] == {"role": "system", "content": "You are an expert radiologist."}
    assert gemma.generate([gemma.prompts.vqa_messages("Any effusion?")], [[_image(0)]],
                          GenerationConfig(max_new_tokens=3))
    with pytest.raises(Exception, match="no model-card prompt is configured for model type 'llava'"):
        load_assistant(str(tiny_hf_models["llava"]), prompt_style="native")


# ---- medvlm serve --model <transformers folder>, as strangers' clients use it --------------------

@pytest.fixture(scope="module")
def hf_server(tmp_path_factory):
    folder = tiny_vlm_folder("gemma3", tmp_path_factory)
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    child = subprocess.Popen([sys.executable, "-m", "vlm.cli", "serve", "--model", str(folder), "--port", str(port)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and child.poll() is None:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.3)
    else:
        child.kill()
        pytest.fail(f"medvlm serve did not start: {child.communicate()[1][-2000:]}")
    yield url, folder
    child.terminate()
    child.wait(timeout=30)


def test_serve_answers_the_openai_sdk_for_a_transformers_model(hf_server):
    import base64

    from openai import OpenAI

    url, folder = hf_server
    client = OpenAI(base_url=url + "/v1", api_key="unused", timeout=TIMEOUT)
    assert [m.id for m in client.models.list().data] == [folder.name]
    image = "data:image/png;base64," + base64.b64encode(png_bytes(1)).decode()
    messages = [{"role": "user", "content": [{"type": "text", "text": "Is there an effusion?"},
                                             {"type": "image_url", "image_url": {"url": image}}]}]
    plain = client.chat.completions.create(model=folder.name, messages=messages, max_tokens=8)
    assert plain.choices[0].finish_reason in ("stop", "length") and plain.usage.completion_tokens >= 1
    chunks = list(client.chat.completions.create(model=folder.name, messages=messages, max_tokens=8, stream=True))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == plain.choices[0].message.content


def test_serve_drives_the_gradio_app_with_a_dicom_for_a_transformers_model(hf_server):
    from gradio_client import Client, handle_file

    url, _ = hf_server
    client = Client(url + "/", verbose=False, download_files=False)
    dicom = handle_file(ct_small())
    preview, info, *_ = client.predict(dicom, "lung", api_name="/upload")
    assert info.startswith("DICOM CT, 128x128") and "window lung" in info
    history, _ = client.predict("Is the heart enlarged?", [], dicom, "lung", 0, 8, 0, api_name="/chat")
    assert [m["role"] for m in history] == ["user", "assistant"]
    history, _ = client.predict("And the pleura?", history, dicom, "lung", 0, 8, 0, api_name="/chat")
    assert [m["role"] for m in history] == ["user", "assistant"] * 2  # a follow-up with no conversation cache
    study, findings, impression = client.predict(dicom, "lung", 0, 16, api_name="/draft_report")
    assert study == "CT of an unidentified region (from the DICOM header)"
    assert "No draft" in impression  # a CT is outside the study types drafts report
