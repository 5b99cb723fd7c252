"""Model zoo: architectures more than one application uses, and self-describing model specs.

- :func:`small_cnn` (DeepZero's adjustable CNN), :func:`lenet5`, :class:`ResNet20` — classifiers;
- :class:`DnCNN` — the residual denoiser of denoised smoothing (Zhang et al. 2017);
- :class:`ConvAutoencoder` — encoder/decoder for ZO-AE-DS (Zhang et al., ICLR 2022);
- :class:`FieldCorrector` — a small conv corrector of 2-D fields with conditioning channels;
- :class:`Normalize` — input normalisation as a first layer (noise is added in pixel space).

All are plain layers traceable by torch.fx, so the fast CGE engine can analyse them.
:func:`build_model` builds one by name; :func:`model_spec` / :func:`from_spec` turn a model into
plain data and back (with its :class:`Normalize` first layer) so any app rebuilds a checkpoint's model.
"""
from core.models.autoencoder import ConvAutoencoder, Decoder, Encoder
from core.models.classifiers import ResNet20, lenet5, small_cnn
from core.models.corrector import FieldCorrector
from core.models.denoiser import DnCNN
from core.models.normalize import Normalize
from core.models.registry import (ARCHS, build_model, count_params, from_spec, model_spec, register_model,
                                  with_normalize)

__all__ = ["ARCHS", "ConvAutoencoder", "Decoder", "DnCNN", "Encoder", "FieldCorrector", "Normalize",
           "ResNet20", "build_model", "count_params", "from_spec", "lenet5", "model_spec", "register_model",
           "small_cnn", "with_normalize"]
