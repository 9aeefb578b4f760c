"""The paired study of arms: runs of one experiment grouped, their arms labelled, compared
over seeds, and written as ``study.md`` / ``study.csv`` by `starlora report`.

Modules: `groups` (which runs form one study), `arms` (labelling arms, the paired
comparisons),
`stats` (the pure numbers: AULC, the exact sign-flip test, Holm, the bootstrap, Spearman,
AUROC), `diagnostics` (per-round diagnostics, each run's AUROC of its test uncertainty) and
`report` (the tables). What each number is: docs/study.md.
"""

from starlora.study.arms import compute_study, label_arms, run_labels
from starlora.study.groups import study_groups
from starlora.study.report import write_studies

__all__ = ["compute_study", "label_arms", "run_labels", "study_groups", "write_studies"]
