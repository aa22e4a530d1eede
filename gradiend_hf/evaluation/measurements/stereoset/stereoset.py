"""StereoSet intrasentence SS / LMS / ICAT as a Hugging Face `evaluate` measurement: pure arithmetic on the model's
scores of each triple's three candidates (e.g. gradiend_hf.evaluation.stereoset(...).examples)."""

import datasets
import evaluate

from gradiend_hf.evaluation.bias_scores import stereoset_scores

_CITATION = """@inproceedings{nadeem2021stereoset, title={StereoSet: Measuring stereotypical bias in pretrained
language models}, author={Nadeem, Moin and Bethke, Anna and Reddy, Siva}, booktitle={Proceedings of ACL-IJCNLP 2021},
year={2021}}"""

_DESCRIPTION = """SS: % of triples whose stereotype candidate scores higher than the anti-stereotype; LMS: % of the
two meaningful-vs-unrelated comparisons won by the meaningful candidate; ICAT = LMS * min(SS, 100 - SS) / 50.
averaging='target' (default) averages SS and LMS over target terms (the official StereoSet evaluation);
averaging='example' pools all triples. Ties count half."""

_KWARGS_DESCRIPTION = """
Args:
    stereotype_score, anti_stereotype_score, unrelated_score (list of float): the model's score of each candidate.
    target (list of str): the triple's target term.
    averaging (str, optional): 'target' (default) or 'example'.
Returns:
    ss, lms, icat (float, percent); n (int).
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class StereoSet(evaluate.Measurement):
    def _info(self):
        return evaluate.MeasurementInfo(
            module_type="measurement",
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({
                "stereotype_score": datasets.Value("float64"),
                "anti_stereotype_score": datasets.Value("float64"),
                "unrelated_score": datasets.Value("float64"),
                "target": datasets.Value("string"),
            }),
        )

    def _compute(self, stereotype_score, anti_stereotype_score, unrelated_score, target, averaging="target"):
        if averaging not in ("target", "example"):
            raise ValueError(f"averaging must be 'target' or 'example', got {averaging!r}.")
        targets = target if averaging == "target" else None
        scores = stereoset_scores(stereotype_score, anti_stereotype_score, unrelated_score, targets)
        return {**scores, "n": len(stereotype_score)}
