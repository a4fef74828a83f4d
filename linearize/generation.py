"""A decode path of fixed shapes and addresses for fully converted models, CUDA-graph capturable.

Decoding one token through ``generate()`` launches a few hundred to a thousand small kernels
(the projections, the feature maps, the state update of every layer), so at batch 1 a step's
time is the host's launch overhead, not the GPU's work. A student's decode state does not grow
with the context, so its step can run with the same tensor shapes and addresses every time, and
then one CUDA graph, captured once, replays the whole step in a single launch.

:class:`StaticDecoder` (and :func:`fast_generate`, which builds one per call) does that for a
model whose every attention layer is a student:

* prefill: the ordinary forward with a fresh cache over the (left-padded) prompts, with the
  position ids ``generate()`` makes from the attention mask;
* the prompt's state of every layer is then put in preallocated static buffers, in the fixed-size
  form of its student (a LoLCATs window shorter than ``W`` tokens is padded in front to ``W``
  empty slots, marked as padding: see below); later prompts of the same batch size are copied
  into the same buffers;
* each decode step reads the next token ids and the per-row position ids from static buffers
  (rows are left-padded, so their positions differ), runs the model's forward with no attention
  mask (after the prefill every new token is real, and padding keys only matter where the state
  stores them, which it marks itself) and writes every new state tensor back into its buffer in
  place (``copy_``), and the last logits into a static logits buffer;
* on CUDA the step is captured once into a ``torch.cuda.CUDAGraph`` (after warm-up steps on a side
  stream, the recipe of the PyTorch CUDA-graphs documentation; the warm-up's changes to the state
  are undone before the capture) and replayed at every step; on a CPU the same step runs eagerly.

Token choice runs outside the graph, eagerly: greedy (``argmax``) or sampling with
``temperature``, ``top_k`` and ``top_p`` (transformers' own logits warpers, applied in
``generate()``'s order, then ``torch.multinomial``, as ``generate()`` samples), and stopping at
``eos_token_id`` (finished rows get ``pad_token_id``, as ``generate()`` does). Not supported:
beam search, several returns per prompt, logits processors (repetition penalty, bad words, min
length, ...: such settings in ``model.generation_config`` are not applied), other stopping
criteria, assisted decoding, streamers, ``inputs_embeds``, and models that keep any softmax
attention layer (their key/value cache grows; they are refused).

What each student's state needed (checked by the tests in ``tests/test_generation.py``):

* Hedgehog (``HybridState`` with no window), LAWCAT (``LawcatState``: the gated ``S`` and the
  last ``K - 1`` convolution inputs): already fixed in size;
* LoLCATs (``HybridState``): its window buffer holds ``min(T, W)`` keys after a prompt of ``T``
  (padded) tokens and grows to ``W`` during decoding, so it is padded in front to ``W`` empty
  slots (zero keys, values and features, mask False). A masked slot gets no softmax term
  (``-inf`` score) and folds zeros into ``S, z`` when it leaves the window, exactly as the
  prompt's own padding slots do (the prefill zeroes their features and values and marks them),
  so the result equals the growing window's. Sink slots are fixed (``sink_size``) and fill in
  order with tensor ops;
* STILL (``StillState``): fixed in size because the selected set is bounded by
  ``selected_budget``; its step asked the device whether a chunk completed (a host read, which a
  CUDA graph cannot hold), so here it completes a chunk at every step and keeps the result only
  where one did complete (``branch_free``; same result, a little more work a step).

A state whose shape would change from one step to the next is refused with an error naming the
layer, never silently reallocated.
"""

from __future__ import annotations

import contextlib
import inspect

import torch

from .cache import StudentCacheLayer
from .kernels import GatedState, HybridState, StillState
from .students import Student
from .students.lawcat import LawcatState

__all__ = ["StaticDecoder", "check_static_decodable", "fast_generate"]


def _tensors(state) -> list[torch.Tensor]:
    """The tensors of a state object, in the order its ``map`` visits them."""
    out = []

    def visit(x):
        out.append(x)
        return x

    state.map(visit)
    return out


def check_static_decodable(model) -> dict[int, Student]:
    """The students of ``model`` by layer index, or ``ValueError`` naming the layers that still
    run softmax attention (or a student whose state has no fixed-size form here)."""
    from .architectures import adapter_for

    adapter = adapter_for(model.config)
    layers = adapter.layers(model)
    found = {}
    softmax = []
    for idx, layer in enumerate(layers):
        attn = adapter.attention(layer)
        if isinstance(attn, Student):
            found[idx] = attn
        else:
            softmax.append(idx)
    if softmax:
        raise ValueError(
            f"the static decode path needs every attention layer to be a student; layer(s) {softmax} of "
            f"{len(layers)} still run softmax attention ({type(adapter.attention(layers[softmax[0]])).__name__}), "
            "whose key/value cache grows with the context. Convert them, or use model.generate()"
        )
    known = ("hedgehog", "lolcats", "lawcat", "still")
    other = {i: s.kind for i, s in found.items() if s.kind not in known}
    if other:
        raise ValueError(f"the static decode path knows the states of {known}; layer(s) {other} are other students")
    modes = {i: s.mode for i, s in found.items() if s.mode != "student"}
    if modes:
        raise ValueError(f"the static decode path runs students in 'student' mode; layer(s) {modes} are not")
    return found


def fixed_size_state(state, student: Student):
    """``state`` in the fixed-size form the static decode step keeps from one step to the next."""
    if isinstance(state, HybridState):
        W, L = student.window, state.k.shape[2]
        if L > W:
            raise RuntimeError(f"layer {student.layer_idx}: the window holds {L} keys, more than its {W}")
        if L < W:  # empty slots in front: marked as padding, zero keys, values and features
            def front(x, value=0.0):
                dim = 2 if x.dim() == 4 else 1  # [B, H, L, D] tensors, the [B, L] mask
                shape = list(x.shape)
                shape[dim] = W - L
                return torch.cat([torch.full(shape, value, dtype=x.dtype, device=x.device), x], dim)

            state = HybridState(
                S=state.S, z=state.z, k=front(state.k), v=front(state.v), fk=front(state.fk),
                mask=front(state.mask, False), sink_k=state.sink_k, sink_v=state.sink_v, sink_mask=state.sink_mask,
            )
        return state
    if isinstance(state, (GatedState, LawcatState, StillState)):
        return state
    raise TypeError(f"layer {student.layer_idx}: no fixed-size form for a state of type {type(state).__name__}")


class StaticStateLayer(StudentCacheLayer):
    """A student layer's cache entry whose state lives in fixed buffers: :meth:`set_state` copies
    the student's new state into them in place, so every step reads and writes the same tensors."""

    def __init__(self, buffers, layer_idx: int, seen: int = 0):
        super().__init__()
        self.state = buffers
        self.buffers = _tensors(buffers)
        self.layer_idx = layer_idx
        self.seen = seen
        self.is_initialized = True

    def load(self, state) -> None:
        """Copy ``state`` (same structure and shapes) into the buffers."""
        self._copy(_tensors(state))

    def _copy(self, new: list[torch.Tensor]) -> None:
        if len(new) != len(self.buffers) or any(
            n.shape != b.shape or n.dtype != b.dtype for n, b in zip(new, self.buffers)
        ):
            raise RuntimeError(
                f"layer {self.layer_idx}: the student's new state has shapes "
                f"{[tuple(n.shape) for n in new]}, its static buffers {[tuple(b.shape) for b in self.buffers]}: "
                "this state cannot be kept at fixed addresses"
            )
        owned = {b.untyped_storage().data_ptr() for b in self.buffers if b.numel()}
        pending = []
        for n, b in zip(new, self.buffers):
            if n is b or not b.numel():
                continue
            # a new tensor that views another buffer must be read before that buffer is written
            pending.append((b, n.clone() if n.numel() and n.untyped_storage().data_ptr() in owned else n))
        for b, n in pending:
            b.copy_(n)

    def set_state(self, state, new_tokens: int) -> None:
        self._copy(_tensors(state))
        self.seen += new_tokens

    def _map(self, fn) -> None:
        raise NotImplementedError("the static decode path keeps its state in fixed buffers: no reordering or expansion")


def _cache_argument(model) -> str:
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _returned_cache(out):
    return out.get("cache") if out.get("cache") is not None else out.get("past_key_values")


class StaticDecoder:
    """Greedy or sampled decoding of a fully converted ``model`` at batch size ``batch_size``
    through a step of fixed shapes and addresses (see the module docstring).

    ``cuda_graph``: capture the step in a CUDA graph (default: when the model is on CUDA);
    ``warmup_steps``: eager steps on a side stream before the capture. The buffers and the graph
    are made at the first prompt and kept for the next ones (same batch size), so the capture is
    paid once per decoder.

    >>> decoder = StaticDecoder(model, batch_size=2)
    >>> out = decoder.generate(input_ids, attention_mask, max_new_tokens=32)   # [2, T + 32] ids
    """

    def __init__(self, model, batch_size: int, cuda_graph: bool | None = None, warmup_steps: int = 2):
        self.students = check_static_decodable(model)
        self.model = model
        self.batch_size = batch_size
        self.device = next(model.parameters()).device
        if cuda_graph is None:
            cuda_graph = self.device.type == "cuda"
        if cuda_graph and self.device.type != "cuda":
            raise ValueError("cuda_graph=True needs the model on a CUDA device")
        self.cuda_graph = cuda_graph
        self.warmup_steps = warmup_steps
        self.graph = None
        self.cache = None
        self.layers: dict[int, StaticStateLayer] = {}
        long = dict(dtype=torch.long, device=self.device)
        self.input_ids = torch.zeros(batch_size, 1, **long)  # the token each step reads
        self.position_ids = torch.zeros(batch_size, 1, **long)  # its position, per row
        self.logits = torch.zeros(batch_size, model.config.vocab_size, dtype=torch.float32, device=self.device)
        self._cache_name = _cache_argument(model)

    # ----------------------------------------------------------------- the static tensors
    def static_tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor the decode step reads or writes at a fixed address, by name."""
        out = {"input_ids": self.input_ids, "position_ids": self.position_ids, "logits": self.logits}
        for idx, layer in self.layers.items():
            for j, b in enumerate(layer.buffers):
                out[f"layer{idx}.state{j}"] = b
        return out

    @contextlib.contextmanager
    def _decode_mode(self):
        saved = [(s, s.form, s.static_step) for s in self.students.values()]
        for s in self.students.values():
            s.form, s.static_step = "recurrent", True
        try:
            yield
        finally:
            for s, form, static in saved:
                s.form, s.static_step = form, static

    # ----------------------------------------------------------------- prefill and step
    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Run the prompts (``[B, T]``, left-padded where ``attention_mask`` is 0), put their state in
        the static buffers and set the positions of the first new token. Returns the last
        position's logits ``[B, vocab]`` fp32."""
        if input_ids.shape[0] != self.batch_size:
            raise ValueError(f"this decoder was made for batch size {self.batch_size}, got {input_ids.shape[0]}")
        input_ids = input_ids.to(self.device)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        attention_mask = attention_mask.to(self.device)
        if bool((attention_mask[:, -1] == 0).any()):
            raise ValueError("the static decode path takes left-padded prompts: every row's last token must be real")
        positions = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)  # as generate()
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, use_cache=True,
                         logits_to_keep=1)
        cache = _returned_cache(out)
        T = input_ids.shape[1]
        for idx, student in self.students.items():
            layer = cache.layers[idx]
            if not isinstance(layer, StudentCacheLayer) or layer.state is None:
                raise RuntimeError(f"layer {idx}: the prefill left no student state in the cache")
            state = fixed_size_state(layer.state, student)
            if idx in self.layers:
                self.layers[idx].load(state)
                self.layers[idx].seen = T
            else:
                self.layers[idx] = StaticStateLayer(state.map(lambda x: x.clone().contiguous()), idx, T)
        if self.cache is None:
            for idx, layer in self.layers.items():
                cache.layers[idx] = layer
            self.cache = cache
        self.position_ids.copy_(positions[:, -1:] + 1)
        self.logits.copy_(out.logits[:, -1])
        return self.logits

    def _step(self) -> None:
        with self._decode_mode():
            out = self.model(input_ids=self.input_ids, position_ids=self.position_ids, use_cache=True,
                             **{self._cache_name: self.cache})
        self.logits.copy_(out.logits[:, -1])

    def _capture(self) -> None:
        tensors = list(self.static_tensors().values())
        saved = [t.clone() for t in tensors]
        stream = torch.cuda.Stream(device=self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(self.warmup_steps):
                self._step()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        for t, s in zip(tensors, saved):  # undo the warm-up's steps
            t.copy_(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.device(self.device), torch.cuda.graph(graph):
            self._step()
        self.graph = graph

    @torch.no_grad()
    def step(self, next_tokens: torch.Tensor) -> torch.Tensor:
        """Feed ``next_tokens`` (``[B]``) and advance every row by one token. Returns the static
        logits buffer ``[B, vocab]`` fp32 (overwritten by the next step: clone to keep it)."""
        if self.cache is None:
            raise RuntimeError("call prefill() first")
        self.input_ids.copy_(next_tokens.view(self.batch_size, 1))
        if self.cuda_graph:
            if self.graph is None:
                self._capture()
            self.graph.replay()
        else:
            self._step()
        self.position_ids.add_(1)
        return self.logits

    # ----------------------------------------------------------------- generation
    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        max_new_tokens: int = 20,
        do_sample: bool | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        eos_token_id=None,
        pad_token_id: int | None = None,
        output_logits: bool = False,
    ):
        """``[B, T + new]`` token ids: the prompts followed by up to ``max_new_tokens`` new tokens,
        as ``model.generate(input_ids, attention_mask=..., max_new_tokens=..., do_sample=...)``
        makes them (``do_sample``, the sampling settings and the special tokens, when not given,
        come from ``model.generation_config`` and then transformers' defaults, as there: greedy,
        and ``top_k=50`` when sampling). Other settings of ``model.generation_config``
        (repetition penalty, minimum length, ...) are not applied. With ``output_logits``, also
        the list of each step's raw logits ``[B, vocab]`` fp32 (``generate()``'s ``output_logits``)."""
        config = self.model.generation_config
        defaults = getattr(type(config), "_get_default_generation_params", dict)()  # generate()'s fallbacks

        def pick(given, name):
            if given is not None:
                return given
            value = getattr(config, name, None)
            return value if value is not None else defaults.get(name)

        do_sample = bool(pick(do_sample, "do_sample"))
        eos = pick(eos_token_id, "eos_token_id")
        pad = pick(pad_token_id, "pad_token_id")
        warpers = []
        if do_sample:
            warpers = self._warpers(pick(temperature, "temperature"), pick(top_k, "top_k"), pick(top_p, "top_p"))
        eos = None if eos is None else torch.as_tensor(eos, device=self.device).view(-1)
        if eos is not None and pad is None:
            pad = int(eos[0])
        logits = self.prefill(input_ids, attention_mask)
        input_ids = input_ids.to(self.device)
        unfinished = torch.ones(self.batch_size, dtype=torch.long, device=self.device)
        new, raw = [], []
        for i in range(max_new_tokens):
            if i:
                logits = self.step(new[-1])
            scores = logits.clone()
            if output_logits:
                raw.append(scores.clone())
            for warp in warpers:
                scores = warp(input_ids, scores)
            if do_sample:
                token = torch.multinomial(torch.softmax(scores, -1), num_samples=1).squeeze(1)
            else:
                token = scores.argmax(-1)
            if eos is not None:
                token = token * unfinished + pad * (1 - unfinished)
                unfinished = unfinished & ~torch.isin(token, eos)
            new.append(token)
            if eos is not None and int(unfinished.max()) == 0:
                break
        out = torch.cat([input_ids, torch.stack(new, 1)], 1) if new else input_ids
        return (out, raw) if output_logits else out

    @staticmethod
    def _warpers(temperature, top_k, top_p) -> list:
        """transformers' sampling warpers, in the order ``generate()`` applies them."""
        from transformers.generation.logits_process import (
            TemperatureLogitsWarper,
            TopKLogitsWarper,
            TopPLogitsWarper,
        )

        out = []
        if temperature is not None and temperature != 1.0:
            out.append(TemperatureLogitsWarper(temperature))
        if top_k is not None and top_k != 0:
            out.append(TopKLogitsWarper(top_k=top_k, min_tokens_to_keep=1))
        if top_p is not None and top_p < 1.0:
            out.append(TopPLogitsWarper(top_p=top_p, min_tokens_to_keep=1))
        return out


def fast_generate(model, input_ids, attention_mask=None, max_new_tokens: int = 20, cuda_graph: bool | None = None,
                  **options):
    """:meth:`StaticDecoder.generate` with a decoder made for this batch (the CUDA graph, when
    there is one, is captured at every call: keep a :class:`StaticDecoder` to decode many
    batches of one size). ``options``: ``do_sample``, ``temperature``, ``top_k``, ``top_p``,
    ``eos_token_id``, ``pad_token_id``, ``output_logits``."""
    decoder = StaticDecoder(model, input_ids.shape[0], cuda_graph=cuda_graph)
    return decoder.generate(input_ids, attention_mask, max_new_tokens=max_new_tokens, **options)
