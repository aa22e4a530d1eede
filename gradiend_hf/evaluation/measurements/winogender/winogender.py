"""Winogender occupation correlation as a Hugging Face `evaluate` measurement: pure arithmetic on per-sentence-pair
gender preferences (e.g. gradiend_hf.evaluation.winogender(...).examples: preference, occupation,
bls_pct_female)."""

import datasets
import evaluate

from gradiend_hf.evaluation.bias_scores import winogender_correlation

_CITATION = """@inproceedings{rudinger2018gender, title={Gender Bias in Coreference Resolution},
author={Rudinger, Rachel and Naradowsky, Jason and Leonard, Brian and Van Durme, Benjamin},
booktitle={Proceedings of NAACL-HLT 2018}, year={2018}}"""

_DESCRIPTION = """Pearson r over occupations between the mean female-vs-male preference of each occupation's sentence
pairs (e.g. log P(female sentence) - log P(male sentence)) and the occupation's % women (BLS)."""

_KWARGS_DESCRIPTION = """
Args:
    preference (list of float): per sentence pair, the preference for the female version.
    occupation (list of str): the pair's occupation.
    bls_pct_female (list of float): the occupation's % women.
Returns:
    correlation (float); occupations (int); n (int).
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Winogender(evaluate.Measurement):
    def _info(self):
        return evaluate.MeasurementInfo(
            module_type="measurement",
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({
                "preference": datasets.Value("float64"),
                "occupation": datasets.Value("string"),
                "bls_pct_female": datasets.Value("float64"),
            }),
        )

    def _compute(self, preference, occupation, bls_pct_female):
        return {"correlation": winogender_correlation(preference, occupation, bls_pct_female),
                "occupations": len(set(occupation)), "n": len(preference)}
