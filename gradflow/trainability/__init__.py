"""Trainability from one traced step: predictors at initialisation, checked against training outcomes.

``measure_variants`` builds each of the paper's variants at several seeds and measures the
predictors (:mod:`.predictors`) from one traced step per batch; ``rank_check`` (:mod:`.check`)
tests each against the laptop runs and the paper's errors with rank correlations, bootstrap
intervals and a verdict. ``python -m gradflow trainability table1 table2 --runs DIR`` does both.
"""
from gradflow.trainability.check import best_predictor, rank_check
from gradflow.trainability.measure import measure_variants
from gradflow.trainability.outcomes import Variant, laptop_outcome, laptop_runs, paper_outcome, variants
from gradflow.trainability.predictors import PREDICTORS, IdentityDistance, measure

__all__ = ["PREDICTORS", "IdentityDistance", "measure", "measure_variants", "rank_check", "best_predictor",
           "Variant", "variants", "laptop_runs", "laptop_outcome", "paper_outcome"]
