"""The student contract.

A student replaces one softmax attention module of a Hugging Face model and is called exactly
where the teacher was (same keyword arguments, returns ``(output, None)``). It is built *from*
the teacher module (:meth:`Student.from_teacher`) and takes over its projections under the same
names (``q_proj``, ``k_proj``, ``v_proj``, ``o_proj`` and, for Qwen3, ``q_norm``/``k_norm``), so
parameter names, LoRA targets and full-weight checkpoints keep the teacher's layout.

Each student runs in one of three modes (see :func:`linearize.convert.attention_mode`):

* ``student``: its own attention: the parallel (chunked) form for prefill and training, the
  recurrent form for one-token decoding from the state in the cache;
* ``teacher``: the original softmax attention, through the teacher class's own ``forward``;
* ``transfer``: both on the same inputs; it records the distillation loss against the teacher's
  per-head output (before ``o_proj``) and passes the *teacher's* output on, so every layer
  trains on teacher activations and no second model is held in memory.

A subclass supplies :meth:`attend` (and its settings dataclass as ``Config``). A student whose
attention takes queries and keys without RoPE sets ``rotary = False``: it then gets them
unrotated, while the teacher's attention in ``transfer`` mode still gets them rotated.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn
from ..architectures import rotary_function
from ..cache import student_cache_layer
from ..masks import IMPLEMENTATION, softmax_attention

MODES = ("student", "teacher", "transfer")


@dataclass
class TransferRecord:
    """One layer's distillation terms from the last forward in ``transfer`` mode."""

    mse: torch.Tensor  # mean squared error, differentiable
    ce: torch.Tensor | None  # cross-entropy of the attention weights, differentiable, if asked for
    sq_err: float  # sum of squared errors (for the relative error)
    sq_ref: float  # sum of squared teacher outputs
    tokens: int


def repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """``[B, H_kv, T, D] -> [B, H_kv * groups, T, D]`` (GQA: each kv head serves ``groups`` q heads)."""
    if groups == 1:
        return x
    B, H, T, D = x.shape
    return x[:, :, None].expand(B, H, groups, T, D).reshape(B, H * groups, T, D)


def key_padding_mask(attention_mask, length: int) -> torch.Tensor | None:
    """Which of the last ``length`` key positions are real tokens, as ``[B, length]`` bool, or
    None when all are.

    transformers hands attention modules a 2D padding mask, a 4D mask (bool, or additive
    float) or None. In a 4D mask a real token always attends to itself, a padding token never,
    so the diagonal of the new tokens' block tells them apart whatever else the mask encodes.
    """
    if attention_mask is None:
        return None
    if attention_mask.dim() == 2:
        keep = attention_mask[:, -length:].bool()
    elif attention_mask.dim() == 4:
        block = attention_mask[:, 0, -length:, -length:]
        diag = torch.diagonal(block, dim1=-2, dim2=-1)
        keep = diag if diag.dtype == torch.bool else diag > torch.finfo(diag.dtype).min / 2
    else:
        raise ValueError(f"unexpected attention mask of shape {tuple(attention_mask.shape)}")
    return None if bool(keep.all()) else keep

# private per-instance state the teacher class's own ``forward`` reads, taken over with the module:
# with Hugging Face's ``kernels`` installed (transformers 5.2x depends on it), ``use_kernelized_func``
# wraps e.g. ``LlamaAttention.forward`` to look up ``self._kernel_funcs``, which its ``__init__`` sets
TEACHER_PRIVATE_STATE = ("_kernel_funcs",)


class Student(nn.Module):
    """Base class of every student. ``kind`` names it in recipes; ``Config`` holds its settings."""

    kind: ClassVar[str]
    Config: ClassVar[type]
    rotary: ClassVar[bool] = True  # whether attend() gets q and k after RoPE
    # set (per instance) by linearize.generation around its decode steps: a one-token step must
    # then read no tensor value on the host (no data-dependent branch), so it can be captured
    # in a CUDA graph; only STILL's step has such a branch (it turns it off when this is set)
    static_step: bool = False

    def __init__(self, attn: nn.Module, adapter, config, layer_idx: int):
        super().__init__()
        # Take over the teacher's submodules and attributes under their own names.
        for name, module in attn.named_children():
            self.add_module(name, module)
        for name, value in vars(attn).items():
            if not name.startswith("_") and name not in ("training",) and not hasattr(self, name):
                setattr(self, name, value)
        for name in TEACHER_PRIVATE_STATE:
            if name in vars(attn):
                self.__dict__[name] = vars(attn)[name]
        self.teacher_class = type(attn)
        # the teacher's softmax implementation (sdpa, eager, ...): teacher and transfer modes use it
        impl = getattr(attn.config, "_attn_implementation", None) or "eager"
        self.softmax_implementation = "sdpa" if impl == IMPLEMENTATION else impl
        self.adapter = adapter
        self.settings = config
        self.layer_idx = layer_idx
        self.num_heads = attn.config.num_attention_heads
        self.mode = "student"
        self.form = "auto"  # kernels.hybrid_attention's form: auto | chunk | recurrent | naive
        self.attention_ce = False  # record the attention-weight cross-entropy in transfer mode
        self.transfer_record: TransferRecord | None = None

    @classmethod
    def from_teacher(cls, attn: nn.Module, config=None, adapter=None, layer_idx: int | None = None) -> "Student":
        """Build this student in place of the teacher attention module ``attn``."""
        from ..architectures import adapter_for

        config = config if config is not None else cls.Config()
        adapter = adapter if adapter is not None else adapter_for(attn.config)
        layer_idx = layer_idx if layer_idx is not None else attn.layer_idx
        student = cls(attn, adapter, config, layer_idx)
        # Trained parts are fp32 whatever the teacher's dtype; they live on the teacher's device.
        device = attn.o_proj.weight.device
        for name, p in student.student_parameters():
            p.data = p.data.to(device=device, dtype=torch.float32)
        return student

    # ----------------------------------------------------------------- what a subclass provides
    def attend(self, q, k, v, key_mask, state, output_state):
        """Student attention. ``q, k, v: [B, H, T, D]`` after RoPE (unless the class sets
        ``rotary = False``), kv heads already expanded.
        Returns ``(y [B, H, T, D] fp32, new_state or None)``."""
        raise NotImplementedError

    def attention_weights(self, q, k, key_mask):
        """The student's normalised attention weights ``[B, H, T, T]`` (for the CE loss)."""
        raise NotImplementedError

    # ----------------------------------------------------------------- the trained parts
    def student_parameters(self):
        """``(name, parameter)`` of the student's own parameters (not the teacher's)."""
        teacher = {id(p) for m in self._teacher_modules() for p in m.parameters()}
        return [(n, p) for n, p in self.named_parameters() if id(p) not in teacher]

    def _teacher_modules(self):
        return [m for n, m in self.named_children() if n in ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm")]

    def student_state_dict(self) -> dict[str, torch.Tensor]:
        return {n: p.detach() for n, p in self.student_parameters()}

    # ----------------------------------------------------------------- forward
    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings=None,
        attention_mask: torch.Tensor | None = None,
        cache=None,
        past_key_values=None,
        **kwargs,
    ):
        if self.mode == "teacher":
            return self._teacher_forward(
                hidden_states, position_embeddings, attention_mask, cache, past_key_values, **kwargs
            )
        cache = cache if cache is not None else past_key_values
        B, T, _ = hidden_states.shape
        q, k_kv, v_kv = self.adapter.project(self, hidden_states, position_embeddings if self.rotary else None)
        k, v = repeat_kv(k_kv, self.num_key_value_groups), repeat_kv(v_kv, self.num_key_value_groups)
        key_mask = key_padding_mask(attention_mask, T)
        layer_cache = student_cache_layer(cache, self.layer_idx) if cache is not None else None
        state = layer_cache.state if layer_cache is not None else None
        y, state = self.attend(q, k, v, key_mask, state, output_state=layer_cache is not None)
        if layer_cache is not None:
            layer_cache.set_state(state, T)
        if self.mode == "transfer":
            student_qk = (q, k)
            if not self.rotary and position_embeddings is not None:  # the teacher attends with RoPE
                q, k_kv = rotary_function(self)(q, k_kv, *position_embeddings)
            y = self._record_transfer(y, q, k_kv, v_kv, student_qk, attention_mask, key_mask)
        y = y.to(hidden_states.dtype).transpose(1, 2).reshape(B, T, -1)  # [B, T, H * D]
        return self.o_proj(y), None

    def _teacher_forward(self, hidden_states, position_embeddings, attention_mask, cache, past_key_values, **kwargs):
        if cache is not None:
            kwargs["cache"] = cache
        if past_key_values is not None:
            kwargs["past_key_values"] = past_key_values
        return self.teacher_class.forward(
            self, hidden_states, position_embeddings=position_embeddings, attention_mask=attention_mask, **kwargs
        )

    def teacher_attention(self, q, k_kv, v_kv, attention_mask) -> torch.Tensor:
        """The teacher's softmax attention output ``[B, H, T, D]`` before ``o_proj``, through the
        same attention function the teacher model uses (:func:`linearize.masks.softmax_attention`)."""
        out, _ = softmax_attention(
            self,
            q,
            k_kv,
            v_kv,
            attention_mask,
            dropout=0.0,
            scaling=self.scaling,
            sliding_window=getattr(self, "sliding_window", None),
        )
        return out.transpose(1, 2)

    def _record_transfer(self, y, q, k_kv, v_kv, student_qk, attention_mask, key_mask):
        """``q, k_kv`` as the teacher attends (after RoPE); ``student_qk``: ``(q, k)`` as
        :meth:`attend` got them, kv heads expanded."""
        with torch.no_grad():
            y_teacher = self.teacher_attention(q, k_kv, v_kv, attention_mask).float()
        diff = y - y_teacher
        if key_mask is not None:  # score real query positions only
            diff = diff[key_mask[:, None, :, None].expand_as(diff)]
            ref = y_teacher[key_mask[:, None, :, None].expand_as(y_teacher)]
        else:
            ref = y_teacher
        ce = None
        if self.attention_ce:
            ce = self._attention_ce(q, repeat_kv(k_kv, self.num_key_value_groups), student_qk, key_mask)
        self.transfer_record = TransferRecord(
            mse=diff.pow(2).mean(),
            ce=ce,
            sq_err=float(diff.detach().pow(2).sum()),
            sq_ref=float(ref.pow(2).sum()),
            tokens=int(y.shape[0] * y.shape[2] if key_mask is None else key_mask.sum()),
        )
        return y_teacher

    def _attention_ce(self, q, k, student_qk, key_mask):
        """Hedgehog's attention-weight cross-entropy ``-sum_s A_teacher log A_student`` averaged over
        queries (quadratic in T: meant for the short sequences of attention transfer). ``q, k``:
        the teacher's (after RoPE, expanded); ``student_qk``: what :meth:`attend` got."""
        T = q.shape[2]
        with torch.no_grad():
            scores = (q.float() @ k.float().transpose(-1, -2)) * self.scaling
            causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
            allowed = causal if key_mask is None else causal & key_mask[:, None, None, :]
            teacher = torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1)
        student = self.attention_weights(*student_qk, key_mask)
        return -(teacher * torch.log(student.clamp_min(1e-12))).sum(-1).mean()

    def extra_repr(self) -> str:
        return f"kind={self.kind}, layer={self.layer_idx}, mode={self.mode}"
