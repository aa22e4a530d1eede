"""The bias benchmarks in one import: CrowS-Pairs, StereoSet (intrasentence), BBQ and Winogender."""

from .bbq import BBQResult, bbq
from .crows_pairs import CrowsPairsResult, crows_pairs
from .stereoset import StereoSetResult, stereoset
from .winogender import WinogenderResult, winogender

__all__ = ["BBQResult", "CrowsPairsResult", "StereoSetResult", "WinogenderResult", "bbq", "crows_pairs", "stereoset",
           "winogender"]
