"""linearize: turn a pretrained Hugging Face LLM into a linear-attention model by distillation.

>>> import linearize
>>> model, tokenizer = linearize.load("runs/smoke", return_tokenizer=True)
>>> model.generate(**tokenizer("The sea", return_tensors="pt"), max_new_tokens=20)
"""

from .convert import ConversionSpec, attention_mode, convert_model, students
from .generation import StaticDecoder, fast_generate
from .io import load, save
from .recipe import load_recipe

__version__ = "0.1.0"

__all__ = [
    "ConversionSpec", "StaticDecoder", "attention_mode", "convert_model", "fast_generate", "load", "load_recipe", "save",
    "students", "__version__",
]
