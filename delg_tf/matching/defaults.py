"""The paper's local-matching parameters, defined once for the whole package.

DELG (Cao et al. ECCV 2020), App. B, retrieval datasets (Revisited Oxford/Paris,
GLDv2-retrieval): putative matches by descriptor L2 distance below 1.0 (1.1 for
the binarised DELG* descriptors), affine RANSAC with a 20 px residual threshold
and 1000 iterations, minimum number of inliers 0. (GLDv2-recognition uses 0.9
and 10 px.) Every default of :mod:`delg_tf.matching`, :mod:`delg_tf.retrieval`,
``delg_tf.evaluation.config`` and the ``python -m delg_tf.evaluate`` flags comes
from here.

No imports: importing these numbers costs nothing.
"""

DEFAULT_DESCRIPTOR_THRESHOLD = 1.0  # L2 distance, float DELG descriptors.
DEFAULT_BINARY_DESCRIPTOR_THRESHOLD = 1.1  # L2 distance, binarised DELG* descriptors.
DEFAULT_RANSAC_RESIDUAL_THRESHOLD = 20.0  # pixels.
DEFAULT_RANSAC_ITERATIONS = 1000
DEFAULT_MIN_INLIERS = 0  # any returned match counts.
DEFAULT_RATIO_TEST = 0.8  # Lowe's ratio, used only when the ratio test replaces the threshold.
DEFAULT_RANSAC_SEED = 0
