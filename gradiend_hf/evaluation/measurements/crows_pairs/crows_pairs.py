"""CrowS-Pairs stereotype score as a Hugging Face `evaluate` measurement: pure arithmetic on per-pair scores.

The scores (log-likelihoods, higher = preferred) come from the model, e.g. gradiend_hf.evaluation.crows_pairs(...)
.examples (sent_more_score, sent_less_score); this module only compares them (gradiend_hf.evaluation.bias_scores).
"""

import datasets
import evaluate

from gradiend_hf.evaluation.bias_scores import crows_pairs_score, stereotype_orientation

_CITATION = """@inproceedings{nangia2020crows, title={CrowS-Pairs: A Challenge Dataset for Measuring Social Biases in
Masked Language Models}, author={Nangia, Nikita and Vania, Clara and Bhalerao, Rasika and Bowman, Samuel R.},
booktitle={Proceedings of EMNLP 2020}, year={2020}}"""

_DESCRIPTION = """% of CrowS-Pairs pairs whose stereotypical sentence the model scores higher (50 = no preference).
For 'antistereo' pairs sent_more is the anti-stereotypical sentence. Ties count half."""

_KWARGS_DESCRIPTION = """
Args:
    sent_more_score (list of float): the model's score (log-likelihood) of each pair's sent_more.
    sent_less_score (list of float): the score of each pair's sent_less.
    stereo_antistereo (list of str): 'stereo' or 'antistereo', the pair's direction.
Returns:
    stereotype_score (float): percent of pairs where the stereotypical sentence scores higher.
    n (int): number of pairs.
Example:
    >>> m = evaluate.load("path/to/measurements/crows_pairs")
    >>> m.compute(sent_more_score=[-3.0, -5.0], sent_less_score=[-4.0, -4.0], stereo_antistereo=["stereo", "stereo"])
    {'stereotype_score': 50.0, 'n': 2}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class CrowsPairs(evaluate.Measurement):
    def _info(self):
        return evaluate.MeasurementInfo(
            module_type="measurement",
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({
                "sent_more_score": datasets.Value("float64"),
                "sent_less_score": datasets.Value("float64"),
                "stereo_antistereo": datasets.Value("string"),
            }),
        )

    def _compute(self, sent_more_score, sent_less_score, stereo_antistereo):
        stereo, anti = stereotype_orientation(sent_more_score, sent_less_score, stereo_antistereo)
        return {"stereotype_score": crows_pairs_score(stereo, anti), "n": len(stereo)}
