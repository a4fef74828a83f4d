"""The generation cache of a converted model: a fixed-size state per student layer.

A student keeps its recurrent state (linear ``S, z`` plus the raw keys/values of its window)
in a :class:`StudentCacheLayer` that sits in the ordinary transformers ``Cache`` at the
student's layer index, beside the ``DynamicLayer`` of any layer still on softmax attention. So
``generate()`` (greedy, sampling, beam search: the layer reorders and repeats its state on the
batch axis), padding masks and position ids all work unchanged, while the memory of a student
layer stays constant however long the context grows.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import CacheLayerMixin, DynamicLayer


class StudentCacheLayer(CacheLayerMixin):
    """One student layer's state in a transformers ``Cache``.

    It counts the tokens it has seen so that position ids and masks of the layers around it
    are built as if it held them all (``get_seq_length``, ``get_mask_sizes``).
    """

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, **kwargs):
        super().__init__()
        self.state = None  # a kernels.HybridState (or a student's own state object)
        self.seen = 0

    def lazy_initialization(self, *args, **kwargs) -> None:
        pass

    def update(self, *args, **kwargs):
        raise RuntimeError(
            "a student layer keeps a recurrent state, not keys and values; it is updated by the student itself"
        )

    def set_state(self, state, new_tokens: int) -> None:
        self.state = state
        self.seen += new_tokens
        self.is_initialized = True

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length) -> tuple[int, int]:
        if isinstance(query_length, torch.Tensor):  # older 5.x pass cache_position
            query_length = query_length.shape[0]
        return self.seen + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def _map(self, fn) -> None:
        if self.state is not None:
            self.state = self.state.map(fn)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map(lambda x: x.index_select(0, beam_idx.to(x.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map(lambda x: x.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map(lambda x: x[indices])

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError(
            "a recurrent student state cannot be rolled back; assisted decoding and prompt lookup are not supported"
        )

    def reset(self) -> None:
        self.state, self.seen = None, 0

    def offload(self):
        self._map(lambda x: x.to("cpu", non_blocking=True))

    def prefetch(self):
        pass

    def nbytes(self) -> int:
        return 0 if self.state is None else self.state.nbytes()


def student_cache_layer(cache, layer_idx: int) -> StudentCacheLayer:
    """The :class:`StudentCacheLayer` at ``layer_idx`` of a transformers ``Cache``, put in place
    of the (still empty) softmax layer the cache made there on its own."""
    layers = cache.layers
    while len(layers) <= layer_idx:
        factory = getattr(cache, "layer_class_to_replicate", None) or DynamicLayer
        layers.append(factory())
    layer = layers[layer_idx]
    if not isinstance(layer, StudentCacheLayer):
        if layer.get_seq_length() > 0:
            raise RuntimeError(
                f"the cache already holds softmax keys/values at layer {layer_idx}, which is a student layer; "
                "pass a fresh cache (or none) to a converted model"
            )
        layer = layers[layer_idx] = StudentCacheLayer()
    return layer


def cache_nbytes(cache) -> int:
    """Bytes held by a cache: student states plus any softmax keys/values."""
    total = 0
    for layer in getattr(cache, "layers", []):
        if isinstance(layer, StudentCacheLayer):
            total += layer.nbytes()
        elif getattr(layer, "keys", None) is not None and layer.keys.numel():
            total += layer.keys.nbytes + layer.values.nbytes
    return total
