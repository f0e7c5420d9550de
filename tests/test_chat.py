"""chat.py driven through stdin, its streamer, and demo.py driven through gradio_client: replies equal generate()."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT, random_image
from PIL import Image

import chat as chat_cli
from chat import Conversation, StreamedReply, sampling_options
from model import IMAGE_TOKEN, generate

COMMANDS = ("export.py", "chat.py", "demo.py", "shapes.py", "bench.py", "bench_lowmem.py")


def test_streamed_pieces_join_to_exactly_the_reply(make_model):
    model, streamed = make_model(), []
    for seed in range(6):  # a random model's bytes often end mid-character: the streamer must hold those back
        conversation = [{"role": "user", "content": f"Describe this image. {IMAGE_TOKEN}"}]
        reply = StreamedReply(model, conversation, [random_image(seed)], max_new_tokens=12)
        pieces = list(reply)
        assert "".join(pieces) == reply.text == generate(model, [conversation], [[random_image(seed)]], 12)[0]
        streamed.append(len(pieces))
    # Released as it grows, not all at the end (a reply of broken bytes may only settle at the end: the random
    # weights, and so the replies, differ between transformers versions).
    assert max(streamed) > 1, streamed


def test_conversation_is_kept_in_the_training_format():
    conversation, first, second = Conversation(), object(), object()
    conversation.attach(first)
    conversation.ask("Describe this image.")
    conversation.answer("a red circle")
    conversation.ask("And its colour?")
    conversation.answer("red")
    conversation.attach(second)
    conversation.ask("And this one?")
    assert conversation.turns == [
        {"role": "user", "content": f"Describe this image. {IMAGE_TOKEN}"},
        {"role": "assistant", "content": "a red circle"},
        {"role": "user", "content": "And its colour?"},
        {"role": "assistant", "content": "red"},
        {"role": "user", "content": f"And this one? {IMAGE_TOKEN}"},
    ]
    assert conversation.images == [first, second]
    conversation.undo_ask()
    assert len(conversation.turns) == 4 and conversation.images == [first] and conversation.pending_image is second
    conversation.reset()
    assert conversation.turns == [] and conversation.images == [] and conversation.pending_image is second
    assert sampling_options(0.0, 0.5, 9) == {"max_new_tokens": 9}
    assert sampling_options(0.7, 0.9, 9) == {"max_new_tokens": 9, "do_sample": True, "temperature": 0.7, "top_p": 0.9}


def test_chat_through_stdin_answers_as_generate_on_the_same_history(make_model, tmp_path):
    model = make_model()
    model.save_pretrained(tmp_path / "ckpt")
    paths = {}
    for name, seed in (("a", 0), ("b", 1), ("c", 2)):
        paths[name] = tmp_path / f"{name}.png"
        random_image(seed).save(paths[name])
    paths["long"] = tmp_path / "long.png"
    Image.new("RGB", (20000, 1)).save(paths["long"])  # too elongated to resize: refused at /image, c stays attached
    typed = [
        "Describe this image.",
        "And its colour?",
        f"/image {paths['b']}",
        f"/image {paths['c']}",  # before sending: switches the attached image
        f"/image {paths['long']}",
        "/image",  # no path: an error line, c stays attached
        "What about this one?",
        "/reset",  # the last image stays attached
        "Hello again",
        "caf\udce9 au lait",  # a byte a terminal sent that is not UTF-8: an error line, the conversation as it was
        "hello " * 300,  # past max_length: an error line, no reply, and the conversation as it was
    ]
    command = [sys.executable, "chat.py", "--checkpoint", str(tmp_path / "ckpt"), "--image", str(paths["a"])]
    command += ["--max_new_tokens", "8"]
    typed_bytes = ("\n".join(typed) + "\n").encode("utf-8", "surrogateescape")
    strict = os.environ | {"PYTHONIOENCODING": "utf-8:strict"}  # as a UTF-8 locale reads stdin
    result = subprocess.run(command, cwd=ROOT, input=typed_bytes, capture_output=True, timeout=300, env=strict)
    result.stdout, result.stderr = result.stdout.decode(), result.stderr.decode()
    assert result.returncode == 0, result.stderr[-3000:]

    def ask(turns, images):
        return generate(model, [turns], [[random_image(seed) for seed in images]], max_new_tokens=8)[0]

    turns = [{"role": "user", "content": f"Describe this image. {IMAGE_TOKEN}"}]
    first = ask(turns, [0])
    turns += [{"role": "assistant", "content": first}, {"role": "user", "content": "And its colour?"}]
    second = ask(turns, [0])
    turns += [
        {"role": "assistant", "content": second},
        {"role": "user", "content": f"What about this one? {IMAGE_TOKEN}"},
    ]
    third = ask(turns, [0, 2])
    fourth = ask([{"role": "user", "content": f"Hello again {IMAGE_TOKEN}"}], [2])
    assert result.stdout == "".join(f"{reply}\n" for reply in (first, second, third, fourth))
    assert "attached to your next message" in result.stderr and "new conversation" in result.stderr
    assert f"error: /image {paths['long']}: {paths['long']}: 20000x1 is too elongated" in result.stderr
    assert "error: a user turn's text is not valid Unicode: surrogates not allowed after 'caf'" in result.stderr
    assert "error: /image needs an image file's path" in result.stderr
    # Never generated from a truncated history (it was cut at max_length, the new message and the reply prompt lost);
    # the limit is the LM's 512 positions less the 8 of the reply, not the 256 tokens of a training sample.
    assert "tokens (images included), more than the 504 this model reads with room for the reply: /reset" in (
        result.stderr
    )


@pytest.mark.parametrize("command", COMMANDS)
def test_help_answers_without_importing_torch(command):
    result = subprocess.run(
        [sys.executable, "-X", "importtime", command, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0 and result.stdout.startswith("usage:"), result.stderr[-2000:]
    imported = {line.split("|")[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")}
    assert imported and not {"torch", "transformers", "numpy", "gradio"} & imported


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["chat.py", "--checkpoint", "nowhere"], "--checkpoint nowhere: no such directory"),
        (["chat.py", "--checkpoint", "CKPT", "--image", "missing.png"], "--image missing.png: no such file"),
        (["chat.py", "--checkpoint", "CKPT", "--temperature", "-1"], "--temperature must be 0 (greedy) or more"),
        (["chat.py", "--checkpoint", "CKPT", "--top_p", "0"], "--top_p must be in (0, 1]"),
        (["demo.py", "--checkpoint", "CKPT", "--port", "70000"], "--port must be in 1..65535"),
        (["demo.py", "--checkpoint", "CKPT", "--example", "missing.png"], "--example missing.png: no such file"),
        (["export.py", "--checkpoint", "nowhere", "--out", "x"], "--checkpoint nowhere: no such directory"),
        (
            ["export.py", "--checkpoint", "CKPT", "--out", "x"],
            "checkpoint is incomplete, adapter.safetensors is missing",
        ),
        (["shapes.py", "--out", "x", "--n", "10"], "--n must be at least 340 (val has 300)"),
        (
            ["shapes.py", "--out", "x", "--n", "400", "--conversations", "100"],
            "--conversations must be between 201 and 300",
        ),
    ],
)
def test_bad_input_is_one_error_line(tmp_path, argv, expected):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text("{}")  # never read: every case fails before loading
    argv = [str(tmp_path / "ckpt") if arg == "CKPT" else arg for arg in argv]
    result = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=60)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert expected in lines[0], result.stderr


def _remove_adapter(checkpoint):
    (checkpoint / "adapter.safetensors").unlink()


def _truncate_adapter(checkpoint):
    adapter = checkpoint / "adapter.safetensors"
    adapter.write_bytes(adapter.read_bytes()[:100])


def _corrupt_config(checkpoint):
    (checkpoint / "config.json").write_text('{"text_model": ')


def _record_missing_lora(checkpoint):
    values = json.loads((checkpoint / "config.json").read_text())
    values["lora_text"] = {"r": 4, "lora_alpha": 8, "target_modules": ["qkv_proj"]}  # but no lora_text/ beside it
    (checkpoint / "config.json").write_text(json.dumps(values))


@pytest.mark.parametrize(
    "damage, expected",
    [
        (_remove_adapter, "ckpt: checkpoint is incomplete, adapter.safetensors is missing"),
        (_truncate_adapter, "ckpt/adapter.safetensors: cannot be read as safetensors (truncated or corrupt?)"),
        (_corrupt_config, "ckpt/config.json: not a readable PhiClipMLLM config.json"),
        (_record_missing_lora, "ckpt/lora_text: LoRA adapter missing (config.json records lora_text)"),
    ],
)
def test_a_broken_checkpoint_is_one_error_line(make_model, tmp_path, capsys, damage, expected):
    checkpoint = make_model().save_pretrained(tmp_path / "ckpt")
    damage(checkpoint)
    with pytest.raises(SystemExit) as exited:
        chat_cli.main(["--checkpoint", str(checkpoint), "--device", "cpu"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert exited.value.code == 2 and len(lines) == 1 and lines[0].startswith("error: "), lines
    assert expected in lines[0], lines


def test_a_conversation_may_outgrow_the_training_max_length(make_model, tmp_path, capsys, monkeypatch):
    # 17 tokens per image: max_length=40 holds one image and its question, as the real recipe's 384 holds one
    # 257-token image; a second image still fits the LM's 512 positions.
    model = make_model(max_length=40)
    model.save_pretrained(tmp_path / "ckpt")
    for name, seed in (("a", 0), ("b", 1)):
        random_image(seed).save(tmp_path / f"{name}.png")
    typed = ["Describe this image.", f"/image {tmp_path / 'b.png'}", "And this one?"]
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(typed) + "\n"))
    chat_cli.main(["--checkpoint", str(tmp_path / "ckpt"), "--image", str(tmp_path / "a.png"), "--max_new_tokens", "8"])
    out, err = capsys.readouterr()
    assert "error" not in err, err
    turns = [{"role": "user", "content": f"Describe this image. {IMAGE_TOKEN}"}]
    first = generate(model, [turns], [[random_image(0)]], max_new_tokens=8)[0]
    turns += [{"role": "assistant", "content": first}, {"role": "user", "content": f"And this one? {IMAGE_TOKEN}"}]
    model.processor.max_length = 512
    second = generate(model, [turns], [[random_image(0), random_image(1)]], max_new_tokens=8)[0]
    assert out == f"{first}\n{second}\n"


def test_an_image_the_processor_would_refuse_is_refused_at_start(make_model, tmp_path, capsys):
    checkpoint = make_model().save_pretrained(tmp_path / "ckpt")
    Image.new("RGB", (20000, 1)).save(tmp_path / "long.png")
    with pytest.raises(SystemExit) as exited:
        chat_cli.main(["--checkpoint", str(checkpoint), "--image", str(tmp_path / "long.png"), "--device", "cpu"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert exited.value.code == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"error: --image {tmp_path / 'long.png'}: 20000x1 is too elongated"), lines


@pytest.mark.slow
def test_demo_page_answers_as_generate_through_gradio_client(make_model, tmp_path):
    pytest.importorskip("gradio", reason="demo.py needs pip install -e '.[demo]'")
    client_module = pytest.importorskip("gradio_client")
    from test_serve import free_port, wait_until_serving

    model = make_model()
    model.save_pretrained(tmp_path / "ckpt")
    image_path = tmp_path / "photo.png"
    random_image(3).save(image_path)
    port = free_port()
    command = [sys.executable, "demo.py", "--checkpoint", str(tmp_path / "ckpt"), "--port", str(port)]
    command += ["--example", str(image_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    server = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        wait_until_serving(server, f"http://127.0.0.1:{port}/")
        client = client_module.Client(f"http://127.0.0.1:{port}/", verbose=False)
        image = client_module.handle_file(str(image_path))
        messages, _ = client.predict("Describe this image.", image, 0.0, 1.0, 8, api_name="/answer")
        messages, _ = client.predict("And its colour?", image, 0.0, 1.0, 8, api_name="/answer")  # same image
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=20)
    turns = [{"role": "user", "content": f"Describe this image. {IMAGE_TOKEN}"}]
    first = generate(model, [turns], [[random_image(3)]], max_new_tokens=8)[0]
    turns += [{"role": "assistant", "content": first}, {"role": "user", "content": "And its colour?"}]
    second = generate(model, [turns], [[random_image(3)]], max_new_tokens=8)[0]
    texts = [
        (message["role"], part.get("text"))
        for message in messages
        for part in message["content"]
        if part.get("type") == "text"
    ]
    assert texts == [
        ("user", "Describe this image."),
        ("assistant", first),
        ("user", "And its colour?"),
        ("assistant", second),
    ]
    assert messages[0]["content"][0]["type"] == "file"  # the image shown in the conversation
