"""Built-in data and forget/retain/test splits."""

from orthograd.data.digits import load_digits_dataset
from orthograd.data.splits import UnlearningSplit, class_forgetting_split, random_forgetting_split

__all__ = ["UnlearningSplit", "class_forgetting_split", "load_digits_dataset", "random_forgetting_split"]
