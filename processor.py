"""PhiClipProcessor: prompts, answers and images -> input_ids, attention_mask, labels, pixel_values.

The one path text and images take into the model, in training (answers, right padding) and in generation (left
padding, a generation prompt). Each <|placeholder1|> is expanded here, once, to the model's number of image tokens,
so attention masks, positions and labels line up with the image embeddings the model scatters in.

Also what the processor needs and no data source does: robust image loading (`load_image`: EXIF rotation, odd
modes, bombs; BadImageError) and `build_word_tokenizer` (a small tokenizer with Phi-3's special tokens).
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps
from transformers import PreTrainedTokenizerFast
from transformers.utils import is_torchvision_available

from config import IMAGE_TOKEN, PROMPT_FORMATS

logger = logging.getLogger(__name__)

__all__ = ["IMAGE_TOKEN", "PROMPT_FORMATS", "BadImageError", "PhiClipProcessor", "build_word_tokenizer", "load_image"]

ANSWER_SEPARATOR = "<|placeholder2|>"  # the seed format puts it between prompt and answer
# Phi-3's special tokens the prompt formats use: every tokenizer must have them, and build_word_tokenizer adds them
# (in Phi-3's id order).
PHI3_SPECIAL_TOKENS = ("<|endoftext|>", "<|assistant|>", "<|placeholder1|>", "<|placeholder2|>", "<|end|>", "<|user|>")
# The same markup as Phi-3-mini-instruct's template, so the demo tokenizer formats chats identically.
PHI3_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)
# Images above this are refused before decoding (PIL's own bomb guard only warns below 2x its limit).
MAX_IMAGE_PIXELS = 100_000_000
# An image the processor's resize (short side -> 224) would blow up past this is refused (aspect ratio ~500:1).
MAX_RESIZED_PIXELS = 25_000_000


class TooLong(ValueError):
    """A sample longer than max_length where truncation would cut into an image or into the prompt."""

    def __init__(self, message: str, length: int, limit: int) -> None:
        super().__init__(message)
        self.length, self.limit = length, limit  # for a caller's own words (chat.py: "/reset")

    def in_a_conversation(self) -> str:
        """The error as a chat says it: its limit is the model's, not a YAML max_length to raise."""
        return (
            f"the conversation is {self.length} tokens (images included), more than the {self.limit} this model "
            "reads with room for the reply: /reset starts a new conversation"
        )


class UnusableSample(ValueError):
    """A training sample with nothing left to learn: truncation to max_length removed its whole answer."""


class PhiClipProcessor:
    """Text + images -> model inputs, for training (answers, right padding) and generation (left padding).

    It applies the prompt format, tokenises each whole conversation once, marks as supervised exactly the
    characters of each answer plus its end token (via offsets, so no token boundary is guessed), and expands every
    <|placeholder1|> into `num_image_tokens` ids so masks, positions and labels line up with the image embeddings.
    """

    def __init__(
        self,
        tokenizer,
        image_processor,
        num_image_tokens: int,
        prompt_format: str = "chat",
        max_length: int | None = None,
    ):
        missing = [t for t in PHI3_SPECIAL_TOKENS if t not in tokenizer.get_vocab()]
        if missing:
            raise ValueError(f"tokenizer {tokenizer.name_or_path!r} lacks the Phi-3 special tokens {missing}")
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.num_image_tokens = num_image_tokens
        self.prompt_format = prompt_format
        self.max_length = max_length
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        self.end_token = "<|end|>" if prompt_format == "chat" else "<|endoftext|>"
        self.stop_token_ids = sorted({tokenizer.convert_tokens_to_ids(t) for t in ("<|end|>", "<|endoftext|>")})
        # Padding is masked out of attention and labels by position, so its id never matters; the seed's bug was
        # deriving labels from pad == EOS, which this processor never does.
        pad = tokenizer.pad_token_id
        self.pad_token_id = pad if pad is not None else tokenizer.convert_tokens_to_ids("<|endoftext|>")

    def format_conversation(
        self, conversation: list[dict], add_generation_prompt: bool = False, verbatim_markup: bool = False
    ) -> tuple[str, list[tuple[int, int]]]:
        """Return (text, supervised character spans) for a list of {"role", "content"} turns.

        `verbatim_markup`: a lone user turn already in chat markup (a prompt string written as such) is taken as
        it is; a conversation's turns are always wrapped, whatever text they quote.
        """
        text, spans = "", []
        for turn in conversation:
            if not isinstance(turn, dict) or "role" not in turn or not isinstance(turn.get("content"), str):
                raise ValueError(
                    f"a conversation turn is {{'role': 'user' or 'assistant', 'content': 'text'}} with {IMAGE_TOKEN} "
                    f"where an image goes, got {turn!r:.120}"
                )
            try:  # a lone surrogate (half an emoji, or undecodable bytes from a terminal) reaches no tokenizer
                turn["content"].encode("utf-8")
            except UnicodeEncodeError as error:
                raise ValueError(
                    f"a {turn['role']} turn's text is not valid Unicode: {error.reason} after "
                    f"{turn['content'][: error.start][-40:]!r}"
                ) from None
        chat = self.prompt_format == "chat"
        if (
            verbatim_markup
            and len(conversation) == 1
            and conversation[0]["role"] == "user"
            and any(tag in conversation[0]["content"] for tag in ("<|user|>", "<|assistant|>"))
        ):  # already in chat markup: take it verbatim
            text = conversation[0]["content"]
            if add_generation_prompt and chat and not text.rstrip().endswith("<|assistant|>"):
                text += "<|assistant|>\n"
            return text, spans
        for turn in conversation:
            role, content = turn["role"], turn["content"].strip()
            if role == "user":
                # seed: no space after the separator (Phi-3's tokenizer strips it anyway), so answers start a word
                text += f"<|user|>\n{content}<|end|>\n" if chat else f"{content} {ANSWER_SEPARATOR}"
            elif role == "assistant":
                text += "<|assistant|>\n" if chat else ""
                start = len(text)
                text += content + self.end_token
                spans.append((start, len(text)))
                text += "\n" if chat else " "
            else:
                raise ValueError(f"conversation role must be 'user' or 'assistant', got {role!r}")
        if add_generation_prompt and chat:
            text += "<|assistant|>\n"
        return text, spans

    def __call__(
        self,
        prompts: str | list[str] | None = None,
        images: Any = None,
        answers: list[str] | None = None,
        *,
        conversations: list[list[dict]] | None = None,
        padding_side: str = "right",
        add_generation_prompt: bool = False,
        drop_unsupervised: bool = False,
    ) -> dict[str, torch.Tensor]:
        """Tokenise a batch. Give `prompts` (+ optional `answers`) or `conversations`; `images` per sample.

        `images`: None, one image (for one prompt), a list with one image (or None) per sample, or a list of lists.
        Returns input_ids, attention_mask, labels (when answers are given) and pixel_values (when images are).
        """
        from_prompts = conversations is None
        if from_prompts:
            if prompts is None:
                raise ValueError("give either prompts or conversations")
            prompts = [prompts] if isinstance(prompts, str) else list(prompts)
            if answers is not None and len(answers) != len(prompts):
                raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
            conversations = [
                [{"role": "user", "content": p}] + ([{"role": "assistant", "content": answers[i]}] if answers else [])
                for i, p in enumerate(prompts)
            ]
        images = _images_per_sample(images, len(conversations))
        formatted = [self.format_conversation(c, add_generation_prompt, from_prompts) for c in conversations]
        encoded = self.tokenizer([text for text, _ in formatted], add_special_tokens=False, return_offsets_mapping=True)
        rows, kept_images, dropped = [], [], 0
        for i, ((_, spans), ids, offsets) in enumerate(zip(formatted, encoded["input_ids"], encoded["offset_mapping"])):
            try:
                # A prompt to generate from is never truncated (its end is where the reply starts); without spans
                # of earlier answers to cut, one too long is an error.
                spans = [] if add_generation_prompt else spans
                rows.append(self._encode(ids, offsets, spans, len(images[i]), f"sample {i}"))
            except UnusableSample:
                if not drop_unsupervised:
                    raise
                dropped += 1
                continue
            kept_images.extend(images[i])
        if dropped:
            logger.warning(
                "dropped %d sample(s) whose answer was truncated away (max_length=%s)", dropped, self.max_length
            )
        if not rows:
            raise UnusableSample("every sample of the batch was dropped: no supervised tokens left")
        # A prompt to generate from supervises nothing (its earlier answers are context): no all -100 labels, which
        # would turn model(**batch) into a zero loss over zero logits.
        with_labels = not add_generation_prompt and any(spans for _, spans in formatted)
        batch = self._pad(rows, padding_side, with_labels=with_labels)
        if kept_images:
            pil_images = [load_image(image, self.image_short_side) for image in kept_images]
            batch["pixel_values"] = self.image_processor(images=pil_images, return_tensors="pt")["pixel_values"]
        return batch

    def check(self, conversation: list[dict], n_images: int, add_generation_prompt: bool = False) -> None:
        """Raise ValueError naming the problem when this training sample (or prompt) cannot be used as it is.

        Problems: a placeholder count that differs from `n_images`, truncation to max_length that would cut into
        an image or the prompt (any truncation of a prompt to generate from), or (UnusableSample) no answer token
        left after truncation. Text only: cheap.
        """
        text, spans = self.format_conversation(conversation, add_generation_prompt)
        encoded = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        spans = [] if add_generation_prompt else spans
        self._encode(encoded["input_ids"], encoded["offset_mapping"], spans, n_images, "sample")

    @property
    def image_short_side(self) -> int | None:
        """The side the image processor resizes an image's short side to (CLIP: 224), when it says."""
        size = getattr(self.image_processor, "size", None) or {}
        return size.get("shortest_edge") or min(size.get("height", 0), size.get("width", 0)) or None

    def _encode(self, ids: list[int], offsets: list, spans: list, n_images: int, where: str) -> tuple:
        """One tokenised text -> (input_ids, labels) with placeholders expanded and answers supervised."""
        ids = np.asarray(ids, dtype=np.int64)
        # A token is supervised when it overlaps an answer span (a token may carry a leading space from the
        # prompt side, and Phi-3's <|end|> carries the newline it strips).
        token_start, token_end = np.asarray(offsets, dtype=np.int64).reshape(-1, 2).T
        supervised = np.zeros(len(ids), dtype=bool)
        for start, end in spans:
            supervised |= (np.minimum(token_end, end) - np.maximum(token_start, start)) > 0
        supervised[:1] = False  # nothing comes before the first token to predict it (Trainer counts it otherwise)
        n_placeholders = int((ids == self.image_token_id).sum())
        if n_placeholders != n_images:
            raise ValueError(
                f"{where}: {n_placeholders} {IMAGE_TOKEN} placeholder(s) in the text but {n_images} image(s) given"
            )
        repeats = np.where(ids == self.image_token_id, self.num_image_tokens, 1)
        ids, supervised = np.repeat(ids, repeats), np.repeat(supervised, repeats)
        if self.max_length is not None and len(ids) > self.max_length:
            image_positions = np.flatnonzero(ids == self.image_token_id)
            cuts_image = len(image_positions) and image_positions[-1] >= self.max_length
            if cuts_image or not spans:
                raise TooLong(
                    f"{where} is {len(ids)} tokens long ({n_placeholders * self.num_image_tokens} of them "
                    f"image tokens) but max_length is {self.max_length}: truncation would cut into the "
                    f"{'image' if cuts_image else 'prompt'}; raise model.max_length or shorten it",
                    len(ids),
                    self.max_length,
                )
            ids, supervised = ids[: self.max_length], supervised[: self.max_length]
        if spans and not supervised.any():
            raise UnusableSample(
                f"{where} has no supervised answer tokens left after truncation to max_length="
                f"{self.max_length}; raise model.max_length or shorten the prompt"
            )
        return ids, np.where(supervised, ids, -100)

    def _pad(self, rows: list, padding_side: str, with_labels: bool) -> dict[str, torch.Tensor]:
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        width = max(len(ids) for ids, _ in rows)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        for row, (ids, row_labels) in enumerate(rows):
            span = slice(width - len(ids), width) if padding_side == "left" else slice(0, len(ids))
            input_ids[row, span] = torch.from_numpy(ids)
            attention_mask[row, span] = 1
            labels[row, span] = torch.from_numpy(row_labels)
        batch = {"input_ids": input_ids, "attention_mask": attention_mask}
        if with_labels:
            batch["labels"] = labels
        return batch


def _images_per_sample(images: Any, batch_size: int) -> list[list]:
    if images is None:
        return [[] for _ in range(batch_size)]
    if not isinstance(images, (list, tuple)):
        images = [images]
    if all(isinstance(item, (list, tuple)) for item in images) and len(images) == batch_size:
        return [list(item) for item in images]
    if len(images) == batch_size:
        return [[] if item is None else [item] for item in images]
    if batch_size == 1:
        return [list(images)]
    raise ValueError(f"{batch_size} prompts but {len(images)} images: give one image (or list) per prompt")


def image_processor_class() -> type:
    """The CLIP image-processor class to use here (the PIL one when torchvision is absent)."""
    # transformers' default CLIP processor needs torchvision from 5.5 on; its PIL twin gives the same pixels.
    if not is_torchvision_available():
        try:
            from transformers import CLIPImageProcessorPil

            return CLIPImageProcessorPil
        except ImportError:  # transformers < 5.5, where CLIPImageProcessor is the PIL one
            pass
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor


# ------------------------------------------------------------------------------------------------ images
class BadImageError(ValueError):
    """An image that cannot be used: missing, empty, corrupt, truncated or too large."""


def load_image(image: str | os.PathLike | Image.Image | np.ndarray, short_side: int | None = None) -> Image.Image:
    """Open a path, PIL image or HxW[xC] array as an upright RGB PIL image; raise BadImageError if unusable.

    `short_side`: the size the image processor scales the short side to. An image whose scaled size would pass
    MAX_RESIZED_PIXELS (an extreme aspect ratio: 20000x1 scales to 224 x 4,480,000) is refused before resizing.
    """
    if isinstance(image, np.ndarray):
        if image.ndim == 3 and image.shape[2] == 1:  # HxWx1 grey (as many libraries keep it): PIL reads HxW
            image = image[:, :, 0]
        try:  # what PIL reads as an image: HxW (uint8, uint16, bool, ...) or HxWxC uint8 with C 2, 3 or 4
            image = Image.fromarray(image)
        except (TypeError, ValueError):
            raise TypeError(
                f"an image array must be HxW or HxWxC uint8 (as PIL reads), got {image.shape} {image.dtype}"
            ) from None
    if isinstance(image, Image.Image):
        name = getattr(image, "filename", "") or "image"  # Image.open's images know their file
        if 0 in image.size:
            raise BadImageError(f"{name}: {image.size[0]}x{image.size[1]} has no pixels")
        _check_resized_size(image.size, short_side, name)
        try:  # an image opened lazily decodes here: a truncated file fails now, not inside the image processor
            image.load()
            return _to_rgb(_upright(image))
        except (OSError, ValueError, SyntaxError, EOFError) as error:
            raise BadImageError(f"{name}: cannot be decoded as an image ({error})") from error
    if not isinstance(image, (str, os.PathLike)):
        raise TypeError(f"an image is a file path, a PIL image or a uint8 array, got {type(image).__name__}")
    if str(image).startswith(("http://", "https://")):
        raise BadImageError(f"{image}: URLs are not downloaded; save the image and give its path")
    path = Path(image)
    try:
        if path.stat().st_size == 0:
            raise BadImageError(f"{path}: empty file (0 bytes)")
        with warnings.catch_warnings():
            # Our own limit below decides; PIL's warning between its two thresholds would only be noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as opened:
                width, height = opened.size
                if width * height > MAX_IMAGE_PIXELS:
                    raise BadImageError(
                        f"{path}: {width}x{height} = {width * height} pixels exceeds the limit of "
                        f"{MAX_IMAGE_PIXELS} (possible decompression bomb)"
                    )
                return load_image(opened, short_side)
    except BadImageError:
        raise
    except FileNotFoundError as error:
        raise BadImageError(f"{path}: file not found") from error
    except Image.DecompressionBombError as error:
        raise BadImageError(f"{path}: refused as a possible decompression bomb ({error})") from error
    except (OSError, ValueError, SyntaxError, EOFError) as error:
        raise BadImageError(f"{path}: cannot be decoded as an image ({error})") from error


def _check_resized_size(size: tuple[int, int], short_side: int | None, name: Any) -> None:
    width, height = size
    if not short_side:
        return
    resized = short_side * short_side * max(width, height) // max(1, min(width, height))
    if resized > MAX_RESIZED_PIXELS:
        raise BadImageError(
            f"{name}: {width}x{height} is too elongated: scaling its short side to {short_side} px would make "
            f"{resized} pixels (limit {MAX_RESIZED_PIXELS})"
        )


def _upright(image: Image.Image) -> Image.Image:
    # exif_transpose returns a copy even of an upright image; the collator sees every image a second time.
    if image.getexif().get(ExifTags.Base.Orientation, 1) in (0, 1):
        return image
    return ImageOps.exif_transpose(image)


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I") or image.mode == "F":
        # PIL's convert("RGB") clips wide greys to 255 instead of scaling them down.
        array = np.asarray(image, dtype=np.float64)
        white = _white_level(image.mode, float(array.max()) if array.size else 0.0)
        image = Image.fromarray(np.clip(np.rint(array * (255.0 / white)), 0, 255).astype(np.uint8))
    if image.mode in ("P", "PA", "LA", "RGBA", "La", "RGBa"):
        # Composite transparency on white rather than letting it turn black.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _white_level(mode: str, peak: float) -> float:
    # 16-bit files say so in their mode; 32-bit int/float images carry no range, so guess it from the data.
    if mode.startswith("I;16"):
        return 65535.0
    for level in (1.0, 255.0, 65535.0) if mode == "F" else (255.0, 65535.0):
        if peak <= level:
            return level
    return peak


def build_word_tokenizer(texts: list[str], vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Train a small byte-level BPE tokenizer with Phi-3's special tokens (the tiny demo's and tests' tokenizer).

    Byte-level, so any text round-trips exactly; trained on ``texts`` so demo captions are a few tokens each.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(PHI3_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        padding_side="right",
    )
    tokenizer.chat_template = PHI3_CHAT_TEMPLATE
    return tokenizer
