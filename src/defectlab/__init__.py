"""defectlab: visual inspection when defect images are scarce.

Synthesize defects with exact masks, detect anomalies from normal images only, segment
defects from synthetic or weak labels, and measure all of it on real data.
"""

__version__ = "0.1.0"

from defectlab.errors import CheckpointError, DataError, DefectlabError, TrainingError

__all__ = ["CheckpointError", "DataError", "DefectlabError", "TrainingError", "__version__"]
