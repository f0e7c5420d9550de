"""The text warm-up: the tiny demo's random language model learns the caption language from text alone.

`text_warmup:` in a phase-one config (steps > 0) runs it once before phase one, on the training samples with each
image described in words; train.py then trains the adapter on the warmed-up model.
"""

from __future__ import annotations

import logging

from backbones import quantize_language_model
from config import ConfigError, torch_dtype
from dataset import Collator, ConversationDataset, make_dataset
from model import IMAGE_TOKEN, PhiClipMLLM
from trainer import PhiClipTrainer, train_with_progress, training_arguments

logger = logging.getLogger("train")


def text_warmup(model: PhiClipMLLM, train_set: ConversationDataset, config: dict) -> None:
    """Train the LM alone on text: the training samples with each image described in words instead of shown.

    A stand-in for the pre-training a real Phi-3 brings (the tiny demo's LM is random): it learns the caption
    language, to say what its prompt describes and to answer questions about a described scene. It never sees an
    image; the adapter still has to learn to turn pixels into something the LM reads. A caption sample
    "<instruction> <image>" -> "<caption>" becomes "<instruction> <caption>" -> "<caption>"; in a conversation
    (`text_warmup.data` may add LLaVA-format ones) the image becomes its caption from the same data. With
    `describe: false` the image is dropped instead (the LM learns no use of its context; in the demo, phase one
    and phase two then reached far lower exact match, measured before conversations were added). With
    `model.quantize` the LM warms up unquantised (4- or 8-bit weights cannot train) and is quantised after it, as a
    pre-trained Phi-3 is loaded quantised: a new LM, on which the caller sets the training switches again.
    """
    settings = config["text_warmup"]
    data = make_dataset(settings["data"], seed=config["seed"]) if settings["data"] else train_set
    described = {record.images[0]: record.captions[0] for record in data.records if record.captions and record.images}
    samples = []
    for index in range(len(data)):
        sample = data.sample(index, epoch=0)
        turns = [dict(turn) for turn in sample["conversation"]]
        if sample["images"] and settings["describe"]:
            words = turns[-1]["content"] if data.records[index].captions else described.get(sample["images"][0])
            if words is None:
                continue  # a conversation about an image no caption describes
        elif sample["images"]:
            words = ""
        for turn in turns if sample["images"] else ():
            turn["content"] = " ".join(turn["content"].replace(IMAGE_TOKEN, words).split())
        samples.append({"conversation": turns, "images": []})
    if not samples:
        raise ConfigError(
            f"{config['path']}: text_warmup: none of its {len(data)} samples can be told in words (a conversation "
            "about an image needs a caption of that image among the data): give captions, or describe: false"
        )
    logger.info("text warm-up: %d steps on %d samples, each image described in words", settings["steps"], len(samples))
    model.requires_grad_(False)
    model.text_model.requires_grad_(True)
    args = training_arguments(
        config,
        config["checkpoint"]["output_dir"],
        max_steps=settings["steps"],
        learning_rate=settings["learning_rate"],
        per_device_train_batch_size=settings["batch_size"],
        save_strategy="no",
        eval_strategy="no",
        eval_steps=None,
        report_to="none",
        dataloader_num_workers=0,
        logging_steps=max(1, settings["steps"] // 5),
    )
    train_with_progress(
        PhiClipTrainer(model=model, args=args, train_dataset=samples, data_collator=Collator(model.processor)),
        "text warm-up",
    )
    if "text_model" not in model.config.saved_backbones:  # the LM changed: its name or path no longer loads it
        model.config.saved_backbones.append("text_model")
    quantize = (config["model"] or {}).get("quantize")
    if quantize:  # a quantised LM cannot train: warmed up in full precision, it is now loaded as a pre-trained one
        attn = model.config.attn_implementation
        model.text_model = quantize_language_model(model.text_model, quantize, torch_dtype(config["dtype"]), attn)
        model.config.quantize = quantize
        logger.info("text warm-up done: the language model is quantised (%s) from here on", quantize)
    model.prime_model("one")
