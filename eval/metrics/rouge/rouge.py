"""ROUGE as a local ``evaluate`` metric, so scoring never needs the Hugging Face Hub.

Load it by path: ``evaluate.load("/abs/path/eval/metrics/rouge")``. It wraps Google's
``rouge_score`` package. One import per line: evaluate's dependency scanner misreads
``import a, b``.
"""

from __future__ import annotations

import re

import datasets
import evaluate
from rouge_score import rouge_scorer

_DESCRIPTION = """\
ROUGE (Recall-Oriented Understudy for Gisting Evaluation) counts the n-grams (rouge1, rouge2) and the
longest common subsequence (rougeL per text, rougeLsum over sentences split on . ! ? and newlines)
that a prediction shares with its reference. The score of each type is the F-measure, averaged over
the examples. With several references per prediction, the best-matching reference counts.
"""

_CITATION = """\
@inproceedings{lin-2004-rouge,
    title = "{ROUGE}: A Package for Automatic Evaluation of Summaries",
    author = "Lin, Chin-Yew",
    booktitle = "Text Summarization Branches Out",
    year = "2004",
    address = "Barcelona, Spain",
    publisher = "Association for Computational Linguistics",
    url = "https://aclanthology.org/W04-1013",
    pages = "74--81",
}
"""

_INPUTS_DESCRIPTION = """\
Args:
    predictions: list of predicted texts.
    references: list of reference texts, or a list of reference texts per prediction (one form per call).
    rouge_types: which scores to return (default rouge1, rouge2, rougeL, rougeLsum).
    use_stemmer: apply the Porter stemmer to tokens longer than 3 characters (default True).
    use_aggregator: return the mean F-measure per type (default True); False returns per-example lists.
Returns:
    a dict from ROUGE type to a float in [0, 1] (or a list of floats without aggregation).
Example:
    >>> rouge = evaluate.load("eval/metrics/rouge")
    >>> rouge.compute(predictions=["the cat sat"], references=["the cat ran"])["rouge1"]
    0.666...
"""

DEFAULT_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")


def split_sentences(text: str) -> str:
    """One sentence per line: rouge_score's rougeLsum reads sentences from newlines (nltk's punkt is offline-unavailable)."""
    return "\n".join(part.strip() for part in _SENTENCE_END.split(text.strip()) if part.strip())


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _INPUTS_DESCRIPTION)
class Rouge(evaluate.Metric):
    """ROUGE-1/2/L/Lsum F-measure, mean over examples."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_INPUTS_DESCRIPTION,
            features=[
                datasets.Features(
                    {"predictions": datasets.Value("string"), "references": datasets.Sequence(datasets.Value("string"))}
                ),
                datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Value("string")}),
            ],
            codebase_urls=["https://github.com/google-research/google-research/tree/master/rouge"],
            reference_urls=["https://aclanthology.org/W04-1013"],
        )

    def _compute(
        self,
        predictions: list[str],
        references: list[str] | list[list[str]],
        rouge_types: list[str] | None = None,
        use_stemmer: bool = True,
        use_aggregator: bool = True,
    ) -> dict[str, float | list[float]]:
        types = list(rouge_types or DEFAULT_TYPES)
        scorer = rouge_scorer.RougeScorer(types, use_stemmer=use_stemmer)
        per_example = [self._score_one(scorer, prediction, refs) for prediction, refs in zip(predictions, references)]
        scores = {name: [example[name] for example in per_example] for name in types}
        if not use_aggregator:
            return scores
        return {name: (sum(values) / len(values) if values else 0.0) for name, values in scores.items()}

    @staticmethod
    def _score_one(scorer: rouge_scorer.RougeScorer, prediction: str, references: str | list[str]) -> dict[str, float]:
        """F-measure per type against the best reference; texts are split into sentences for rougeLsum."""
        refs = [references] if isinstance(references, str) else list(references)
        if not refs:
            raise ValueError("every prediction needs at least one reference")
        result = scorer.score_multi([split_sentences(ref) for ref in refs], split_sentences(prediction))
        return {name: score.fmeasure for name, score in result.items()}
