"""orthograd: machine unlearning by per-sample gradient orthogonalization (OrthoGrad), baselines and benchmarks."""

from orthograd import methods
from orthograd._version import __version__
from orthograd.api import unlearn
from orthograd.evaluation import evaluate
from orthograd.geometry import project_out
from orthograd.grads import per_sample_grads
from orthograd.lora import LoRAConfig, attach_lora, merge_lora
from orthograd.metrics import accuracy, uis
from orthograd.model_folder import load
from orthograd.results import UnlearnResult
from orthograd.training import train_classifier

__all__ = [
    "LoRAConfig",
    "UnlearnResult",
    "__version__",
    "accuracy",
    "attach_lora",
    "evaluate",
    "load",
    "merge_lora",
    "methods",
    "per_sample_grads",
    "project_out",
    "train_classifier",
    "uis",
    "unlearn",
]
