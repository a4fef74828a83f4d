"""The LoRA stage: low-rank adapters (peft) on the converted model, trained end to end.

LoLCATs (arXiv 2410.10254, Sec. 3.2, "Stage 2"): after attention transfer, LoRA on the
attention projections recovers what the students still miss. The loss is next-token
cross-entropy on the stage's data (``loss: ce``), or the KL divergence from the teacher's
next-token distribution (``loss: kl``): the teacher is the same model with every student
in teacher mode and the adapters switched off, so no second copy sits in memory.

    kl = T^2 * mean_t KL(softmax(z_teacher_t / T) || softmax(z_student_t / T))

over real (non-padding) positions. Only the adapters train, plus the students' own parameters
when ``train_students`` is set.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..convert import attention_mode, students
from ..data import Blocks
from ..eval.perplexity import next_token_nll
from ..lora import add_lora, has_lora, lora_disabled, lora_parameters
from ..training import TrainingStage


class LoraStage(TrainingStage):
    name = "lora"

    def prepare(self) -> None:
        s = self.spec
        if not has_lora(self.model):
            add_lora(self.model, s.rank, s.alpha, s.dropout, s.target_modules)

    def trainable(self):
        params = [(n, p) for n, p in lora_parameters(self.model)]
        if self.spec.train_students:
            params += [(f"layers.{i}.{n}", p) for i, st in students(self.model).items() for n, p in st.student_parameters()]
        return params

    def _logits(self, batch: Blocks) -> torch.Tensor:
        return self.model(**batch.model_inputs(), use_cache=False).logits

    def loss(self, batch: Blocks):
        logits = self._logits(batch)
        if self.spec.loss == "ce":
            nll, n = next_token_nll(logits, batch.input_ids, batch.attention_mask)
            return nll / max(n, 1), {}
        return self._kl(logits, batch), {}

    def _kl(self, logits, batch: Blocks) -> torch.Tensor:
        T = self.spec.kl_temperature
        with torch.no_grad(), attention_mode(self.model, "teacher"), lora_disabled(self.model):
            teacher = self._logits(batch).float()
        real = batch.attention_mask.bool()
        log_p = F.log_softmax(teacher[real] / T, -1)
        log_q = F.log_softmax(logits.float()[real] / T, -1)
        return F.kl_div(log_q, log_p, log_target=True, reduction="batchmean") * T * T

    def evaluate(self, blocks: Blocks) -> dict:
        total, count, kl, n_batches = 0.0, 0, 0.0, 0
        for start in range(0, len(blocks), self.spec.batch_size):
            batch = blocks[start : start + self.spec.batch_size].to(self.device)
            logits = self._logits(batch)
            nll, n = next_token_nll(logits, batch.input_ids, batch.attention_mask)
            total, count = total + nll.item(), count + n
            if self.spec.loss == "kl":
                kl, n_batches = kl + self._kl(logits, batch).item(), n_batches + 1
        ce = total / max(count, 1)
        out = {"ce": ce, "perplexity": float(torch.tensor(ce).exp())}
        out["loss"] = kl / n_batches if self.spec.loss == "kl" else ce
        if self.spec.loss == "kl":
            out["kl"] = out["loss"]
        return out
