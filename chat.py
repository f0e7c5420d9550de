"""A multi-turn terminal chat with a PhiClipMLLM checkpoint, streaming the reply as it is generated.

    python chat.py --checkpoint checkpoints/phi_clip_p2 [--image photo.jpg] [--temperature 0.7 --top_p 0.9]

Type a message and press Enter. `/image PATH` attaches an image to your next message (again before sending: switches
it; after: adds a second image to the conversation), `/reset` starts a new conversation (the last image stays
attached), `/quit` or end of input leaves. The history is formatted exactly as multi-turn training data is: a list of
user/assistant turns, each image a <|placeholder1|> after the text of the message it came with.
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

from config import IMAGE_TOKEN, CommandLine, checkpoint_problem, fail

COMMANDS_HELP = "/image PATH  attach an image · /reset  new conversation · /quit  leave"


def command_line() -> argparse.ArgumentParser:
    """chat.py's arguments."""
    parser = CommandLine(description="Chat with a PhiClipMLLM checkpoint in the terminal (replies stream).")
    parser.add_argument("--checkpoint", required=True, help="checkpoint directory written by train.py")
    parser.add_argument("--image", help="image attached to the first message")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); above 0 samples")
    parser.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling mass when sampling (0, 1]")
    parser.add_argument("--max_new_tokens", type=int, default=256, help="longest reply in tokens")
    parser.add_argument("--device", default=None, help="cuda, cpu, cuda:1, ... (default: cuda when available)")
    return parser


def check_arguments(args: argparse.Namespace) -> None:
    """Bad input ends here as one `error:` line, before torch or any weight is loaded."""
    if problem := checkpoint_problem(args.checkpoint):
        fail(f"--checkpoint {args.checkpoint}: {problem}")
    if args.image is not None and not Path(args.image).expanduser().is_file():
        fail(f"--image {args.image}: no such file")
    if args.temperature < 0:
        fail(f"--temperature must be 0 (greedy) or more, got {args.temperature}")
    if not 0 < args.top_p <= 1:
        fail(f"--top_p must be in (0, 1], got {args.top_p}")
    if args.max_new_tokens <= 0:
        fail(f"--max_new_tokens must be positive, got {args.max_new_tokens}")


if __name__ == "__main__":
    check_arguments(command_line().parse_args())  # answers --help and bad input before the imports below (~6 s)

import threading  # the heavy imports follow the early argument check above
from collections.abc import Iterator
from typing import TextIO

import torch
from transformers import TextIteratorStreamer

from generate import choose_device, load_checkpoint_or_exit
from model import PhiClipMLLM, generate
from processor import BadImageError, TooLong, load_image


class ReplyStreamer(TextIteratorStreamer):
    """Yields a reply's text as it grows, so that the pieces join to exactly generate()'s (stripped) reply.

    transformers' streamers print up to the last space and decode afresh after each newline; a byte-level or
    byte-fallback tokenizer can then show a half-decoded character (U+FFFD) that the whole reply does not have.
    Here the whole reply is decoded at each step, and only text that later tokens cannot change is released:
    nothing ending in U+FFFD (bytes of an unfinished character) and no trailing whitespace (stripped at the end).
    """

    def __init__(self, tokenizer, timeout: float | None = None):
        super().__init__(tokenizer, skip_prompt=True, timeout=timeout, skip_special_tokens=True)
        self.new_ids: list[int] = []
        self.released = 0

    def put(self, value: torch.Tensor) -> None:
        if self.next_tokens_are_prompt:  # generate() hands over the prompt's ids first
            self.next_tokens_are_prompt = False
            return
        if value.dim() > 1 and value.shape[0] > 1:
            raise ValueError("ReplyStreamer streams one reply at a time")
        self.new_ids.extend(value.reshape(-1).tolist())
        text = self.tokenizer.decode(self.new_ids, **self.decode_kwargs).lstrip()
        stable = text.rstrip("\ufffd").rstrip()
        if len(stable) > self.released:
            self.on_finalized_text(stable[self.released :])
            self.released = len(stable)

    def end(self) -> None:
        text = self.tokenizer.decode(self.new_ids, **self.decode_kwargs).strip()
        self.on_finalized_text(text[self.released :], stream_end=True)
        self.released = len(text)


class StreamedReply:
    """A reply generated in a background thread: iterate for its text pieces; then `.text` is generate()'s reply."""

    def __init__(self, model: PhiClipMLLM, conversation: list[dict], images: list, **options):
        self.streamer = ReplyStreamer(model.tokenizer)
        self.text: str | None = None
        self._error: BaseException | None = None

        def run() -> None:
            try:
                self.text = generate(model, [conversation], [images], streamer=self.streamer, **options)[0]
            except BaseException as error:  # handed to the reading thread
                self._error = error
                self.streamer.end()

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()

    def __iter__(self) -> Iterator[str]:
        for piece in self.streamer:
            if piece:
                yield piece
        self._thread.join()
        if self._error is not None:
            raise self._error


def sampling_options(temperature: float, top_p: float, max_new_tokens: int) -> dict:
    """generate() keywords for the sampling flags: temperature 0 is greedy."""
    options = {"max_new_tokens": int(max_new_tokens)}
    if temperature > 0:
        options.update(do_sample=True, temperature=float(temperature), top_p=float(top_p))
    return options


class Conversation:
    """The history in training's form (user/assistant turns, one <|placeholder1|> per image) and its images."""

    def __init__(self):
        self.turns: list[dict] = []
        self.images: list = []
        self.pending_image = None  # attached to the next user message
        self.last_image = None
        self._asked_with_image = False

    def attach(self, image) -> None:
        """Attach an image to the next message (replacing one attached since the last message)."""
        self.pending_image = self.last_image = image

    def reset(self) -> None:
        """Forget every turn; the last image used is attached to the next message again."""
        self.turns, self.images, self.pending_image = [], [], self.last_image

    def ask(self, text: str) -> None:
        """Add a user message (with the pending image, if any)."""
        self._asked_with_image = self.pending_image is not None
        if self._asked_with_image:
            text = f"{text} {IMAGE_TOKEN}"
            self.images.append(self.pending_image)
        self.turns.append({"role": "user", "content": text})
        self.pending_image = None

    def undo_ask(self) -> None:
        """Take back the last user message (its reply failed); its image is attached again."""
        self.turns.pop()
        if self._asked_with_image:
            self.pending_image = self.images.pop()

    def answer(self, text: str) -> None:
        """Add the model's reply to the last user message."""
        self.turns.append({"role": "assistant", "content": text})


def full_context(model: PhiClipMLLM, reply_tokens: int) -> PhiClipMLLM:
    """Let a conversation grow to the language model's positions (less `reply_tokens` for the reply), not to
    training's model.max_length.

    max_length caps training samples: the real recipe's 384 holds one 257-token image and ~120 tokens of text, so a
    second image, or a question after a long reply, was refused although Phi-3 takes 4096 positions. The reply is
    generated after the prompt, so the prompt leaves it room: a reply past the LM's positions would be garbled.
    """
    positions = getattr(model.text_model.config, "max_position_embeddings", None)
    room = positions - reply_tokens if positions else None
    if room and model.processor.max_length is not None and room > model.processor.max_length:
        model.processor.max_length = model.config.max_length = room
    return model


def run_chat(
    model: PhiClipMLLM, conversation: Conversation, options: dict, lines: TextIO, out: TextIO, notices: TextIO
) -> None:
    """Read messages and commands from `lines`; stream replies to `out`, notices and errors to `notices`."""
    interactive = getattr(lines, "isatty", lambda: False)()
    while True:
        if interactive:
            out.write("you> ")
            out.flush()
        line = lines.readline()
        if not line:
            return
        line = line.strip()
        if not line:
            continue
        command, _, argument = line.partition(" ")
        if command in ("/quit", "/exit"):
            return
        if command == "/reset":
            conversation.reset()
            kept = " (the last image stays attached)" if conversation.pending_image is not None else ""
            print(f"new conversation{kept}", file=notices)
            continue
        if command == "/image":
            if not argument.strip():
                print(f"error: /image needs an image file's path; {COMMANDS_HELP}", file=notices)
                continue
            try:
                conversation.attach(load_image(Path(argument.strip()).expanduser(), model.processor.image_short_side))
            except BadImageError as error:
                print(f"error: /image {argument.strip()}: {error}", file=notices)
                continue
            print(f"image {argument.strip()} attached to your next message", file=notices)
            continue
        if command.startswith("/"):
            print(f"error: unknown command {command}; {COMMANDS_HELP}", file=notices)
            continue
        conversation.ask(line)
        if interactive:
            out.write("model> ")
        reply = StreamedReply(model, conversation.turns, conversation.images, **options)
        try:
            for piece in reply:
                out.write(piece)
                out.flush()
        except ValueError as error:  # e.g. the conversation no longer fits model.max_length
            conversation.undo_ask()
            print(f"\nerror: {error.in_a_conversation() if isinstance(error, TooLong) else error}", file=notices)
            continue
        out.write("\n")
        out.flush()
        conversation.answer(reply.text)


def main(argv: list[str] | None = None) -> None:
    """Command line: load the checkpoint, then chat on stdin/stdout."""
    args = command_line().parse_args(argv)
    check_arguments(args)
    device = choose_device(args.device)
    conversation = Conversation()
    if args.image:
        try:
            image = load_image(Path(args.image).expanduser())  # a file that is no image fails before the model loads
        except BadImageError as error:
            fail(str(error))
    model = full_context(load_checkpoint_or_exit(args.checkpoint, device), args.max_new_tokens)
    if args.image:
        try:  # one the processor would refuse (too elongated to resize) is refused now, not at every message
            conversation.attach(load_image(image, model.processor.image_short_side))
        except BadImageError as error:
            named = f"{getattr(image, 'filename', '') or 'image'}: "  # the error names the file the image came from
            fail(f"--image {args.image}: {str(error).removeprefix(named)}")
    if sys.stdin.isatty():
        print(f"chatting with {args.checkpoint} · {COMMANDS_HELP}", file=sys.stderr)
    options = sampling_options(args.temperature, args.top_p, args.max_new_tokens)
    # A byte that is not UTF-8 (a terminal set to another encoding) is then one message's error, not the end.
    if isinstance(sys.stdin, io.TextIOWrapper):
        sys.stdin.reconfigure(errors="surrogateescape")
    try:
        run_chat(model, conversation, options, sys.stdin, sys.stdout, sys.stderr)
    except KeyboardInterrupt:
        print(file=sys.stderr)


if __name__ == "__main__":
    main(sys.argv[1:])
