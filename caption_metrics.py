"""The COCO caption metrics of generated captions: exact match, BLEU-1..4, METEOR, ROUGE-L and CIDEr-D.

pycocoevalcap's scorers, as the COCO caption evaluation runs them, on the standard Java PTB tokenisation (or, without
java, `normalize_caption`'s). What is hand-written here is what pycocoevalcap's own wrappers get wrong: one line per
caption whatever it holds, and a METEOR java process whose failure is a warning, not a hang.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import re
import shutil
import string
import subprocess
import unicodedata
from pathlib import Path
from typing import Any

from config import last_line

CAPTION_TOKENIZERS = ("auto", "ptb", "simple")  # caption_scores's `tokenizer`

logger = logging.getLogger("evaluate")

_PUNCTUATION = re.compile(f"[{re.escape(string.punctuation)}]")


def normalize_caption(text: str) -> str:
    """The form exact match and answer accuracy compare: Unicode NFKC (full-width letters, composed accents),
    case-folded, every ASCII punctuation mark or symbol and every Unicode punctuation mark (’ “ ” — …) a space,
    whitespace collapsed. Articles and number words stay as they are."""
    text = _PUNCTUATION.sub(" ", unicodedata.normalize("NFKC", text).casefold())
    return " ".join("".join(" " if unicodedata.category(c)[0] == "P" else c for c in text).split())


class PTBUnavailable(OSError):
    """The Java PTBTokenizer could not run (no java, or it failed)."""


def ptb_tokenize(captions: list[str]) -> list[str]:
    """The standard COCO caption evaluation's tokenisation: pycocoevalcap's Stanford PTBTokenizer (CoreNLP 3.4.1,
    run with java), lower-cased, its punctuation tokens dropped, exactly as its PTBTokenizer wrapper does.

    Unlike that wrapper it keeps one output line per caption whatever the caption holds (a carriage return, a
    vertical tab or U+2028 in one shifted every later caption onto the wrong image and lost the last ones), writes
    no file beside the jar and lets no line through to stderr. Raises PTBUnavailable when java or the jar cannot run.
    """
    from pycocoevalcap.tokenizer import ptbtokenizer

    jar = Path(ptbtokenizer.__file__).with_name(ptbtokenizer.STANFORD_CORENLP_3_4_1_JAR)
    lines = [" ".join(caption.split()) for caption in captions] + ["end"]  # "end": a last line, never dropped
    command = ["java", "-cp", str(jar), "edu.stanford.nlp.process.PTBTokenizer", "-preserveLines", "-lowerCase"]
    try:
        done = subprocess.run(command, input="\n".join(lines).encode(), capture_output=True, check=False)
    except OSError as error:  # no java on PATH
        raise PTBUnavailable(f"cannot run java: {error.strerror or error}") from None
    tokenized = done.stdout.decode("utf-8", errors="replace").split("\n")
    if done.returncode or len(tokenized) != len(lines):
        said = done.stderr.decode(errors="replace").strip().splitlines()
        problem = said[-1] if said else f"{len(tokenized)} lines back for {len(lines)}"
        raise PTBUnavailable(f"java PTBTokenizer failed (exit {done.returncode}): {problem}")
    drop = set(ptbtokenizer.PUNCTUATIONS)
    return [" ".join(w for w in line.rstrip().split(" ") if w not in drop) for line in tokenized[:-1]]


def caption_scores(
    predictions: dict[Any, str], references: dict[Any, list[str]], tokenizer: str = "auto"
) -> dict[str, Any]:
    """Exact match (against any reference, both `normalize_caption`ed), BLEU-1..4, METEOR, ROUGE-L and CIDEr-D of one
    caption per key.

    The scores are pycocoevalcap's scorers, as the COCO caption evaluation runs them: corpus BLEU (closest reference
    length), METEOR 1.5 (its jar, run with java), ROUGE-L (beta 1.2, best reference per image), CIDEr-D (the COCO
    server's "CIDEr": sigma 6, clipped counts, x10, so 0-10 here where papers print x100) with document frequencies
    taken from the scored images' references (fewer images, other values; a single image always scores 0).
    `tokenizer`: "ptb" is the standard Java PTBTokenizer (`ptb_tokenize`), "simple" is `normalize_caption` (within
    0.1 BLEU-4 and 0.7 CIDEr points of PTB on COCO val), "auto" PTB when java runs, else simple with a warning.
    `caption_tokenizer` in the result says which one scored. METEOR runs beside PTB only, as both need java: with
    simple tokens, or when its jar fails, `meteor` is None.
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    if tokenizer not in CAPTION_TOKENIZERS:
        raise ValueError(f"tokenizer must be one of {', '.join(CAPTION_TOKENIZERS)}, got {tokenizer!r}")
    keys = sorted(predictions, key=str)
    if not keys:
        raise ValueError("no predictions to score")
    if len({str(k) for k in keys}) < len(keys):  # pycocoevalcap keys by string: 7 and "7" would be one image
        raise ValueError("prediction keys collide once written as strings (e.g. 7 and '7')")
    hits = [normalize_caption(predictions[k]) in {normalize_caption(r) for r in references[k]} for k in keys]
    exact = sum(hits) / len(keys)
    texts = [predictions[k] for k in keys] + [r for k in keys for r in references[k]]
    used = "simple"
    if tokenizer != "simple":
        try:
            tokens, used = ptb_tokenize(texts), "ptb"
        except PTBUnavailable as error:
            if tokenizer == "ptb":
                raise
            logger.warning("BLEU, ROUGE-L and CIDEr-D tokenised by normalize_caption, not PTB; no METEOR (%s)", error)
    if used == "simple":
        tokens = [normalize_caption(text) for text in texts]
    preds, refs, rest = {}, {}, iter(tokens[len(keys) :])
    for k, prediction in zip(keys, tokens):
        preds[str(k)], refs[str(k)] = [prediction], [next(rest) for _ in references[k]]
    bleu, _ = Bleu(4).compute_score(refs, preds, verbose=0)
    # pycocoevalcap's CIDEr-D fails (max() of nothing) when no reference has a token ('.' only): no n-gram, 0
    cider = Cider().compute_score(refs, preds)[0] if any(r for rs in refs.values() for r in rs) else 0.0
    return (
        {"exact_match": exact}
        | {f"bleu{n}": float(bleu[n - 1]) for n in (1, 2, 3, 4)}
        | {"meteor": meteor_score(refs, preds) if used == "ptb" else None}
        | {"rouge_l": float(Rouge().compute_score(refs, preds)[0])}
        | {"cider": float(cider), "caption_tokenizer": used}
    )


@functools.cache
def _meteor_scorer() -> Any:
    # pycocoevalcap's Meteor is one java process (~10 s to load its paraphrase table, 1.2 GB resident); kept for
    # the next call, as a notebook evaluating checkpoint after checkpoint would wait that long for each
    from pycocoevalcap.meteor.meteor import Meteor

    if shutil.which("java") is None:  # checked first: a Meteor whose Popen failed complains again when collected
        raise FileNotFoundError("no java on PATH")
    return Meteor()


def meteor_score(references: dict[str, list[str]], predictions: dict[str, list[str]]) -> float | None:
    """Corpus METEOR 1.5 of tokenised captions, as the COCO caption evaluation computes it; None, with a warning,
    when its java process cannot start or fails."""

    # Its line protocol separates fields by "|||" and requests by newlines; pycocoevalcap cleans the prediction
    # only, and a reference "a dog ||| on a mat" counted as two ("a dog", "on a mat"). PTB tokens hold neither.
    def clean(text: str) -> str:
        return " ".join(text.replace("|||", " ").split())

    references = {k: [clean(r) for r in rs] for k, rs in references.items()}
    predictions = {k: [clean(p) for p in ps] for k, ps in predictions.items()}
    scorer = None
    try:
        scorer = _meteor_scorer()
        return float(scorer.compute_score(references, predictions)[0])
    except (OSError, ValueError) as error:  # no java, a JVM that could not start (it asks for 2 GB), or died
        _meteor_scorer.cache_clear()
        said = [last_line(error) or type(error).__name__]
        if scorer is not None:  # the JVM's own last words say more than the empty line it left behind
            if scorer.lock.locked():  # compute_score raised holding it; the scorer's __del__ would wait forever
                scorer.lock.release()
            scorer.meteor_p.kill()
            # What it never read is still buffered in its pipe, whose closing then fails with "Broken pipe": closed
            # here, quietly, or the scorer's __del__ printed that as a traceback ("Exception ignored in ...").
            with contextlib.suppress(OSError):
                scorer.meteor_p.stdin.close()
            said = scorer.meteor_p.stderr.read().decode(errors="replace").strip().splitlines()[-1:] or said
        logger.warning("no METEOR: its java process failed (%s)", said[0])
        return None
