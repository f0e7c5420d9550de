"""generate(): captions and answers from a PhiClipMLLM, for notebooks; and its command line.

python generate.py --checkpoint DIR --image PATH [--prompt TEXT] [--max_new_tokens N] [--stream]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from config import IMAGE_TOKEN, CommandLine, ConfigError, checkpoint_problem, fail

DEFAULT_PROMPT = f"Describe this image. {IMAGE_TOKEN}"  # one of the instructions training draws from


def command_line() -> argparse.ArgumentParser:
    """generate.py's arguments."""
    parser = CommandLine(description="Caption or answer about an image with a PhiClipMLLM checkpoint.")
    parser.add_argument("--checkpoint", required=True, help="checkpoint directory written by train.py")
    parser.add_argument("--image", required=True, help="image file")
    parser.add_argument(
        "--prompt",
        default=DEFAULT_PROMPT,
        help=f"instruction; {IMAGE_TOKEN} (or <image>) marks where the image goes, at the end when missing",
    )
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    parser.add_argument("--device", default=None, help="cuda, cpu, cuda:1, ... (default: cuda when available)")
    return parser


def check_arguments(args: argparse.Namespace) -> None:
    """Bad input ends here as one `error:` line, before torch or any weight is loaded."""
    if problem := checkpoint_problem(args.checkpoint):
        fail(f"--checkpoint {args.checkpoint}: {problem}")
    if not Path(args.image).expanduser().is_file():
        fail(f"--image {args.image}: no such file")
    if args.max_new_tokens <= 0:
        fail(f"--max_new_tokens must be positive, got {args.max_new_tokens}")


if __name__ == "__main__":
    check_arguments(command_line().parse_args())  # answers --help and bad input before the imports below (~6 s)

import torch  # the heavy imports follow the early argument check above

# generate() lives with the model (`from model import generate` works, as in the original); this is its command line.
from model import CheckpointError, PhiClipMLLM, generate


def choose_device(argument: str | None) -> str:
    """The device `--device` names (default: cuda when available), or one `error:` line when it cannot be used here.

    Shared by every command line that loads a model, so that a typo fails before it loads, not in `.to(device)`.
    """
    if argument is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(argument)
    except RuntimeError:  # torch's own message lists twenty device types and names no option
        fail(f"--device {argument!r}: not a device; expected cpu, cuda or cuda:N (N: a GPU's index), or mps")
    if device.type == "cuda" and not torch.cuda.is_available():
        fail(f"--device {argument}: no CUDA device is available here (use --device cpu)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        fail(f"--device {argument}: this machine has {torch.cuda.device_count()} GPU(s), numbered from cuda:0")
    return argument


def load_checkpoint_or_exit(checkpoint: str, device: str) -> PhiClipMLLM:
    """The checkpoint on `device` (bf16 on a GPU that has it), or exit with one `error:` line naming what is wrong.

    For the command lines (generate.py, chat.py, demo.py, evaluate.py); a library caller wants
    PhiClipMLLM.from_pretrained, which raises instead.
    """
    dtype = torch.bfloat16 if device.startswith("cuda") and torch.cuda.is_bf16_supported() else None
    try:
        return PhiClipMLLM.from_pretrained(Path(checkpoint).expanduser(), dtype=dtype, device=device)
    except (ConfigError, CheckpointError, FileNotFoundError) as error:
        fail(str(error))


def main(argv: list[str] | None = None) -> None:
    """Command line: print the model's reply about one image."""
    args = command_line().parse_args(argv)
    check_arguments(args)
    device = choose_device(args.device)
    prompt = args.prompt.replace("<image>", IMAGE_TOKEN)  # LLaVA's marker, as in training data
    prompt = prompt if IMAGE_TOKEN in prompt else f"{prompt} {IMAGE_TOKEN}"
    model = load_checkpoint_or_exit(args.checkpoint, device)
    streamer = None
    if args.stream:
        from transformers import TextStreamer

        streamer = TextStreamer(model.tokenizer, skip_prompt=True, skip_special_tokens=True)
    try:
        text = generate(model, prompt, [args.image], max_new_tokens=args.max_new_tokens, streamer=streamer)[0]
    except ValueError as error:  # an image that cannot be read (BadImageError), a prompt too long (TooLong)
        fail(str(error))
    if not args.stream:
        print(text)


if __name__ == "__main__":
    main(sys.argv[1:])
