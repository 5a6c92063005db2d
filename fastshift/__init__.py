"""fastshift: one-shot neural architecture search with Supernet Shifting.

Quick use::

    import fastshift
    space = fastshift.spaces.spos_shufflenetv2()
    net = fastshift.Supernet(space, num_classes=1000)
    net.load_state_dict(fastshift.load_state_dict("supernet.pth"))
    result = fastshift.search(net, train_data, val_data, flops_limit=330e6, seed=0)
"""

from . import analysis, data, distributed, ops, spaces
from .analysis import order_preserving
from .checkpoint import load_state_dict
from .evolution import EvolutionSearcher
from .search import SearchResult, search
from .shifting import FitnessConfig, Shifter
from .space import SHUFFLE3, SHUFFLE5, SHUFFLE7, XCEPTION, Choice, LayerSpec, SearchSpace
from .supernet import Subnet, Supernet
from .train import train_supernet

__version__ = "0.1.0"

__all__ = [
    "Choice",
    "EvolutionSearcher",
    "FitnessConfig",
    "LayerSpec",
    "SHUFFLE3",
    "SHUFFLE5",
    "SHUFFLE7",
    "SearchResult",
    "SearchSpace",
    "Shifter",
    "Subnet",
    "Supernet",
    "XCEPTION",
    "analysis",
    "data",
    "distributed",
    "load_state_dict",
    "ops",
    "order_preserving",
    "search",
    "spaces",
    "train_supernet",
    "__version__",
]
