"""VQA evaluation: the official accuracy, the submission file, and the loop over an eval loader.

Normalisation and scoring follow the official evaluator (GT-Vision-Lab/VQA,
``PythonEvaluationTools/vqaEvaluation/vqaEval.py``) line for line, quirks included, so that
validation numbers are comparable with the evaluation server's: the prediction is always
normalised, the human answers only have their punctuation processed, and only when the humans
disagree. A prediction scores min(#humans who gave it / 3, 1), averaged over the leave-one-out
subsets of the human answers (the 10 choose 9 subsets for VQAv2's 10 answers).
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from pathlib import Path

import torch
from ..dist import gather_objects, lockstep, world
from .qa import answer_candidates

CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at",
    "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've",
    "someone'dve": "someone'd've", "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}
NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
           "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = ("a", "an", "the")
PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
# The official lookbehind is misspelt "(?!<=" and so never applies; kept as is.
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")


def process_punctuation(text: str) -> str:
    """Punctuation next to a space (or any text with a digit,digit comma) is deleted, other
    punctuation becomes a space; periods go unless a digit follows ("2.5" stays)."""
    out = text
    for p in PUNCTUATION:
        if p + " " in text or " " + p in text or _COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out)


def process_digit_article(text: str) -> str:
    """Lowercase; number words to digits; articles dropped; contractions given their apostrophe."""
    words = [NUMBERS.get(w, w) for w in text.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def normalize_answer(answer: str) -> str:
    """The official evaluator's normalisation of a predicted answer."""
    answer = answer.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(answer))


def question_accuracy(prediction: str, humans: list[str]) -> float:
    """Official VQA accuracy of one prediction against the human answers (with repeats)."""
    prediction = normalize_answer(prediction)
    if len(set(humans)) > 1:
        humans = [process_punctuation(h) for h in humans]
    matches = sum(h == prediction for h in humans)
    return sum(min(1.0, (matches - (h == prediction)) / 3) for h in humans) / len(humans)


def exact_match(prediction: str, answer: str) -> float:
    """VideoQA (MSRVTT-QA) has one ground-truth answer: exact match after normalisation."""
    return float(normalize_answer(prediction) == normalize_answer(answer))


def human_answers(answers: list[str], weights: list[float], humans: int = 10) -> list[str]:
    """The human answers with repeats, back from the loader's unique answers and their weights
    (count / total). VQA asks 10 humans per question, so a total of 10 is tried first (a
    unanimous [1.0] means 10 agreeing humans); otherwise the smallest total giving whole counts."""
    for total in (humans, *range(1, 1001)):
        counts = [w * total for w in weights]
        if all(abs(c - round(c)) < 1e-6 for c in counts):
            break
    return [a for a, c in zip(answers, counts) for _ in range(round(c))]


def summarize(scores: list[float], answer_types: list | None = None) -> dict:
    """Overall and per-answer-type accuracy in percent, rounded as the official evaluator."""
    metrics = {"accuracy": round(100 * sum(scores) / len(scores), 2) if scores else 0.0}
    for kind in sorted({t for t in answer_types or [] if t is not None}):
        mine = [s for s, t in zip(scores, answer_types) if t == kind]
        metrics[f"accuracy_{kind.replace('/', '_').replace(' ', '_')}"] = round(100 * sum(mine) / len(mine), 2)
    return metrics


def write_submission(path, results: list[dict]):
    """``[{"question_id": int, "answer": str}, ...]`` as the evaluation server expects; written
    to a temporary file and renamed, so a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [{"question_id": int(r["question_id"]), "answer": str(r["answer"])} for r in results]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(rows))
    os.replace(tmp, path)


def prior_scores(scored: list[dict], video: bool) -> list[float]:
    """Each question's score for answering every question with the set's most given answer: the
    VQA paper's "prior" baseline, taken on this set; it is what the report calls chance (a uniform
    pick among thousands of candidate answers scores about zero, which says nothing)."""
    counts = Counter()
    for r in scored:
        for answer, weight in zip(r["gt"], r["weights"]):
            counts[normalize_answer(answer)] += weight
    prior = counts.most_common(1)[0][0]
    if video:
        return [exact_match(prior, max(zip(r["weights"], r["gt"]))[1]) for r in scored]
    return [question_accuracy(prior, human_answers(r["gt"], r["weights"])) for r in scored]


def evaluate_qa(forward, loader, cfg, tokenizer, answer_list=None, results_path=None, image_size=None) -> dict:
    """Answer every question of ``loader`` with ``cfg.eval.inference`` and score the answers.

    ``forward`` is the engine's (or the objective's) forward; ``answer_list`` (strings, or a
    JSON file of them) is needed for candidate inference. Predictions are gathered from all ranks,
    a question seen twice counts once, and with ``results_path``
    rank 0 writes the submission file. Questions without answers (test splits) are predicted
    but not scored: without any labelled question the metrics have no accuracy (and no
    ``select``), only the counts. VideoQA (``cfg.data.media == "video"``) scores exact match against the
    most-given answer.
    """
    extra = None
    if cfg.eval.inference == "candidates":
        if answer_list is None:
            raise ValueError("candidate inference needs an answer list (set eval.answer_list)")
        if isinstance(answer_list, (str, Path)):
            answer_list = json.loads(Path(answer_list).read_text())
        extra = answer_candidates(tokenizer, answer_list)

    frames = (cfg.data.num_frames,) if cfg.data.media == "video" else ()
    image_size = image_size or cfg.data.image_size
    question = tokenizer(["?"], padding="max_length", truncation=True, max_length=8, return_tensors="pt")
    dummy = {"pixel_values": torch.zeros(1, *frames, 3, image_size, image_size), "question_id": [-1],
             "question": ["?"], "input_ids": question["input_ids"], "attention_mask": question["attention_mask"]}
    records = []
    for batch, real in lockstep(loader, dummy):
        predicted = forward(batch, 0, cfg.eval.inference, extra)
        if not real:
            continue
        answers = batch.get("answers") or [None] * len(predicted)
        weights = batch.get("answer_weights") or [None] * len(predicted)
        types = batch.get("answer_type") or [None] * len(predicted)
        for qid, pred, gt, w, kind in zip(batch["question_id"], predicted, answers, weights, types):
            records.append({"question_id": qid, "answer": pred, "gt": gt, "weights": w, "answer_type": kind})

    unique = {}
    for r in (r for part in gather_objects(records) for r in part):  # every rank's, in rank order
        unique.setdefault(r["question_id"], r)
    records = list(unique.values())
    scored = [r for r in records if r["gt"]]
    if cfg.data.media == "video":
        scores = [exact_match(r["answer"], max(zip(r["weights"], r["gt"]))[1]) for r in scored]
    else:
        scores = [question_accuracy(r["answer"], human_answers(r["gt"], r["weights"])) for r in scored]
    metrics = {"num_questions": len(records), "num_scored": len(scored)}
    if scored:  # unlabeled questions (test-dev) get a prediction in the results file, no score
        types = [r["answer_type"] for r in scored]
        metrics.update(summarize(scores, types))
        metrics["select"] = metrics["accuracy"]
        metrics["chance"] = summarize(prior_scores(scored, cfg.data.media == "video"), types)
    if results_path is not None and world()[0] == 0:
        write_submission(results_path, records)
    return metrics
