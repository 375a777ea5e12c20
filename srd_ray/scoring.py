"""Answer scoring shared by reflect and evaluate: ROUGE-L F (stemmed) and exact match."""

from __future__ import annotations

import re
import string
from functools import lru_cache

from rouge_score import rouge_scorer


@lru_cache(maxsize=1)
def _scorer() -> rouge_scorer.RougeScorer:
    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(prediction: str, references: list[str]) -> float:
    """ROUGE-L F-measure in [0, 1], the best over the references (as the MiniLLM/SRD evaluations do)."""
    scorer = _scorer()
    return max(scorer.score(reference, prediction)["rougeL"].fmeasure for reference in references)


def _normalise_answer(text: str) -> str:
    # SQuAD-style normalisation, as in the MiniLLM evaluation: case, punctuation, articles, whitespace.
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, references: list[str]) -> float:
    """1.0 if the normalised prediction equals any normalised reference, else 0.0."""
    normalised = _normalise_answer(prediction)
    return float(any(normalised == _normalise_answer(reference) for reference in references))
