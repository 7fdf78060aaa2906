"""Registry of models: ``build_model(name, data, **options)`` returns a dense ``nn.Module`` sized for
a :class:`maestro_lod.data.TaskData`. Importing this package registers the built-in models:
``lenet5``, ``mlp``, ``cnn4``, ``resnet18``, ``vgg19`` (classification) and ``char-lm`` (language model),
``transformer`` (seq2seq). Every model is made of nn.Linear / nn.Conv2d / nn.MultiheadAttention
layers, so :func:`maestro_lod.factorize` handles it."""

from . import language, vision  # noqa: F401  (register the built-in models)
from .registry import MODELS, available_models, build_model, model_options, register_model

__all__ = ["MODELS", "register_model", "available_models", "build_model", "model_options"]
