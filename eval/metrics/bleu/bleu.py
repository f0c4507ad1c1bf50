"""Corpus BLEU as a local ``evaluate`` metric, so scoring never needs the Hugging Face Hub.

Load it by path: ``evaluate.load("/abs/path/eval/metrics/bleu")``. It wraps ``sacrebleu``, whose
tokenisation (13a by default) makes scores comparable across papers. One import per line:
evaluate's dependency scanner misreads ``import a, b``.
"""

from __future__ import annotations

import datasets
import evaluate
import sacrebleu

_DESCRIPTION = """\
BLEU (Bilingual Evaluation Understudy) is the geometric mean of the modified 1- to 4-gram precisions
of the predictions against their references, times a brevity penalty for predictions shorter than the
references. Computed at corpus level by sacrebleu, on a 0-100 scale. Corpus BLEU needs matching 4-grams:
texts shorter than four tokens score 0 unless smoothing or effective order is used.
"""

_CITATION = """\
@inproceedings{papineni-etal-2002-bleu,
    title = "{B}leu: a Method for Automatic Evaluation of Machine Translation",
    author = "Papineni, Kishore and Roukos, Salim and Ward, Todd and Zhu, Wei-Jing",
    booktitle = "Proceedings of the 40th Annual Meeting of the Association for Computational Linguistics",
    year = "2002",
    address = "Philadelphia, Pennsylvania, USA",
    url = "https://aclanthology.org/P02-1040",
    pages = "311--318",
}
@inproceedings{post-2018-call,
    title = "A Call for Clarity in Reporting {BLEU} Scores",
    author = "Post, Matt",
    booktitle = "Proceedings of the Third Conference on Machine Translation: Research Papers",
    year = "2018",
    address = "Belgium, Brussels",
    url = "https://aclanthology.org/W18-6319",
    pages = "186--191",
}
"""

_INPUTS_DESCRIPTION = """\
Args:
    predictions: list of predicted texts.
    references: one reference text per prediction, or a list of reference texts per prediction
        (the lists may differ in length; one form per call).
    tokenize: sacrebleu tokenizer (default "13a").
    lowercase: compare lowercased texts (default False).
    smooth_method: "exp" (default), "floor", "add-k" or "none".
    smooth_value: the value for "floor" and "add-k" smoothing.
    use_effective_order: ignore n-gram orders with no candidates (for sentence-level use).
Returns:
    score: BLEU in [0, 100]; precisions: the 1- to 4-gram precisions (0-100); brevity_penalty;
    length_ratio; sys_len and ref_len (token counts); counts and totals (matched and candidate n-grams).
Example:
    >>> bleu = evaluate.load("eval/metrics/bleu")
    >>> bleu.compute(predictions=["the cat sat on the mat"], references=["the cat sat on the mat"])["score"]
    100.0
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _INPUTS_DESCRIPTION)
class Bleu(evaluate.Metric):
    """Corpus-level BLEU (0-100) with its precisions and brevity penalty."""

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
            codebase_urls=["https://github.com/mjpost/sacrebleu"],
            reference_urls=["https://aclanthology.org/P02-1040", "https://aclanthology.org/W18-6319"],
        )

    def _compute(
        self,
        predictions: list[str],
        references: list[str] | list[list[str]],
        tokenize: str = "13a",
        lowercase: bool = False,
        smooth_method: str = "exp",
        smooth_value: float | None = None,
        use_effective_order: bool = False,
    ) -> dict[str, float | int | list[float] | list[int]]:
        result = sacrebleu.corpus_bleu(
            list(predictions),
            reference_streams(references),
            tokenize=tokenize,
            lowercase=lowercase,
            smooth_method=smooth_method,
            smooth_value=smooth_value,
            use_effective_order=use_effective_order,
        )
        return {
            "score": float(result.score),
            "precisions": [float(p) for p in result.precisions],
            "brevity_penalty": float(result.bp),
            "length_ratio": float(result.sys_len / result.ref_len) if result.ref_len else 0.0,
            "sys_len": int(result.sys_len),
            "ref_len": int(result.ref_len),
            "counts": [int(c) for c in result.counts],
            "totals": [int(t) for t in result.totals],
        }


def reference_streams(references: list[str] | list[list[str]]) -> list[list[str | None]]:
    """Transpose per-prediction references into sacrebleu's streams; missing ones are None (ignored)."""
    per_prediction = [[refs] if isinstance(refs, str) else list(refs) for refs in references]
    if any(not refs for refs in per_prediction):
        raise ValueError("every prediction needs at least one reference")
    width = max((len(refs) for refs in per_prediction), default=1)
    return [[refs[i] if i < len(refs) else None for refs in per_prediction] for i in range(width)]
