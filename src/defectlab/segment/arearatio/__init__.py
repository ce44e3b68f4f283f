"""``arearatio-gcn``: segmentation learnt from per-image area ratios with a superpixel graph.

Parts: :mod:`.networks` (per-pixel feature FCNs), :mod:`.superpixels` (SLIC and the graph),
:mod:`.gcn` (graph convolutions), :mod:`.pseudolabels` (vertex labels from a ratio),
:mod:`.model` (config and the registered model). Importing the package registers the model.
"""

from defectlab.segment.arearatio.model import AreaRatioConfig, AreaRatioGCN

__all__ = ["AreaRatioConfig", "AreaRatioGCN"]
