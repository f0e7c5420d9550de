"""A small web page to try a PhiClipMLLM checkpoint: an image, a multi-turn chat with streamed replies, sampling sliders.

    pip install -e ".[demo]"          # Gradio is optional
    python demo.py --checkpoint checkpoints/phi_clip_p2 [--example photo.jpg ...] [--port 7860] [--share]

It listens on 127.0.0.1 only, unless `--host 0.0.0.0` (your network) or `--share` (a public Gradio link) is asked for.
The conversation is the one chat.py keeps (training's turn format); a new or changed image is attached to the next
message. Examples: the images given with --example, else the first few of the tiny demo's set when it exists.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from config import CommandLine, checkpoint_problem, fail

DEMO_IMAGES = Path(__file__).resolve().parent / "data/demo/images"  # `python train.py --demo` writes them there
TITLE = "PhiClipMLLM"
MAX_NEW_TOKENS = 1024  # the reply-length slider's top


def command_line() -> argparse.ArgumentParser:
    """demo.py's arguments."""
    parser = CommandLine(description="A Gradio page to chat with a PhiClipMLLM checkpoint about an image.")
    parser.add_argument("--checkpoint", required=True, help="checkpoint directory written by train.py")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--share", action="store_true", help="also open a public gradio.live link")
    parser.add_argument("--example", action="append", default=[], help="an example image (repeatable)")
    parser.add_argument("--max_new_tokens", type=int, default=256, help="the slider's starting value")
    parser.add_argument("--device", default=None, help="cuda, cpu, cuda:1, ... (default: cuda when available)")
    return parser


def check_arguments(args: argparse.Namespace) -> None:
    """Bad input ends here as one `error:` line, before torch, Gradio or any weight is loaded."""
    if problem := checkpoint_problem(args.checkpoint):
        fail(f"--checkpoint {args.checkpoint}: {problem}")
    if not 1 <= args.port <= 65535:
        fail(f"--port must be in 1..65535, got {args.port}")
    for example in args.example:
        if not Path(example).expanduser().is_file():
            fail(f"--example {example}: no such file")
    if args.max_new_tokens <= 0:
        fail(f"--max_new_tokens must be positive, got {args.max_new_tokens}")
    try:
        import gradio  # noqa: F401
    except ImportError:
        fail('demo.py needs Gradio, an optional dependency: pip install -e ".[demo]"')


if __name__ == "__main__":
    check_arguments(command_line().parse_args())  # answers --help and bad input before the imports below

import hashlib  # the heavy imports follow the early argument check above
import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # a local page reports nothing anywhere

import gradio as gr

from chat import Conversation, StreamedReply, full_context, sampling_options
from generate import choose_device, load_checkpoint_or_exit
from model import PhiClipMLLM
from processor import BadImageError, TooLong, load_image


def image_key(image) -> str:
    """The same picture gives the same key, whatever temporary file the browser's upload landed in."""
    return hashlib.sha256(image.tobytes() + repr(image.size).encode()).hexdigest()


def build_demo(model: PhiClipMLLM, examples: list[str], max_new_tokens: int = 256) -> gr.Blocks:
    """The page: image and sliders on the left, the conversation on the right."""

    def answer(question, image_path, temperature, top_p, max_tokens, state):
        # The page's messages live in the session state too, so API clients see the whole conversation.
        state = state or {"conversation": Conversation(), "image": None, "messages": []}
        conversation, messages = state["conversation"], state["messages"]
        if image_path:
            try:
                image = load_image(image_path, model.processor.image_short_side)
            except BadImageError as error:
                raise gr.Error(str(error)) from None
            if image_key(image) != state["image"]:  # a new picture: it goes with this message
                conversation.attach(image)
                state["image"] = image_key(image)
                messages.append({"role": "user", "content": {"path": image_path}})
        question = (question or "").strip()
        if not question:
            raise gr.Error("type a question first")
        conversation.ask(question)
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": ""}]
        reply = StreamedReply(
            model, conversation.turns, conversation.images, **sampling_options(temperature, top_p, max_tokens)
        )
        try:
            for piece in reply:
                messages[-1] = {"role": "assistant", "content": messages[-1]["content"] + piece}
                yield list(messages), state, ""
        except Exception as error:  # the question goes, or every later message would carry it and fail again
            conversation.undo_ask()
            del messages[-2:]
            if isinstance(error, TooLong):
                raise gr.Error(error.in_a_conversation()) from None
            if isinstance(error, ValueError):
                raise gr.Error(str(error)) from None
            raise
        conversation.answer(reply.text)
        messages[-1] = {"role": "assistant", "content": reply.text}
        yield list(messages), state, ""

    def reset():
        return [], None

    with gr.Blocks(title=TITLE) as demo:
        gr.Markdown(f"## {TITLE}\nUpload an image (or pick an example), ask about it, and keep the conversation going.")
        state = gr.State(None)
        with gr.Row():
            with gr.Column(scale=2):
                image = gr.Image(type="filepath", label="Image", sources=["upload", "clipboard"], height=300)
                if examples:
                    gr.Examples(examples, inputs=image, label="Examples")
                with gr.Accordion("Sampling", open=True):
                    temperature = gr.Slider(0.0, 1.5, value=0.0, step=0.05, label="temperature (0 = greedy)")
                    top_p = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="top_p")
                    max_tokens = gr.Slider(1, MAX_NEW_TOKENS, value=max_new_tokens, step=1, label="max new tokens")
            with gr.Column(scale=3):
                chatbot = gr.Chatbot(label="Conversation", height=420)
                question = gr.Textbox(placeholder="Ask about the image and press Enter", show_label=False)
                with gr.Row():
                    send = gr.Button("Send", variant="primary")
                    clear = gr.Button("New conversation")
        inputs = [question, image, temperature, top_p, max_tokens, state]
        outputs = [chatbot, state, question]
        send.click(answer, inputs, outputs, api_name="answer")
        question.submit(answer, inputs, outputs, api_name=False)
        clear.click(reset, None, [chatbot, state], api_name="reset")
    return demo


def main(argv: list[str] | None = None) -> None:
    """Command line: load the checkpoint and serve the page until interrupted."""
    args = command_line().parse_args(argv)
    check_arguments(args)
    device = choose_device(args.device)
    examples = [str(Path(p).expanduser()) for p in args.example]
    demo_images = next((d for d in (DEMO_IMAGES, Path("data/demo/images")) if d.is_dir()), None)
    if not examples and demo_images:  # the clone's, or (an installed copy) where `python -m shapes` wrote them
        examples = [str(p.resolve()) for p in sorted(demo_images.glob("*.png"))[:4]]
    model = full_context(load_checkpoint_or_exit(args.checkpoint, device), MAX_NEW_TOKENS)  # the slider's top
    demo = build_demo(model, examples, args.max_new_tokens)
    demo.queue().launch(
        server_name=args.host,
        server_port=args.port,
        share=args.share,
        allowed_paths=[str(Path(p).parent) for p in examples],
        footer_links=["api"],
    )


if __name__ == "__main__":
    main(sys.argv[1:])
