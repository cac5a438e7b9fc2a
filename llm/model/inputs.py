"""Token batches -> the model's inputs: ids, labels and, for document-aware training, per-token
positions and document ids. One function for training, evaluation during training and evaluate.py,
so all three see the same positions, attention and scored tokens."""

from __future__ import annotations

import torch

from llm.config import ConfigError, DataConfig
from llm.model.gpt import IGNORE
from llm.model.layers import document_ids, document_positions


def model_inputs(tokens: torch.Tensor, data: DataConfig) -> tuple[torch.Tensor | None, ...]:
    """(B, S + 1) tokens -> the model's (input_ids, labels[, positions, doc_ids]).

    Document-aware settings (data.*, Megatron's names): `eod_mask_loss` leaves the prediction made
    at an EOD token unscored (label IGNORE); `reset_position_ids` gives each token its position in
    its document; `reset_attention_mask` gives the document ids that keep attention inside one."""
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    if not data.document_aware:
        return inputs, labels
    eod = data.eod_token_id  # set from the tokenizer by resolve_vocab
    if eod is None:
        raise ConfigError("document-aware training needs data.eod_token_id (or data.tokenizer)")
    if data.eod_mask_loss:
        labels = labels.masked_fill(inputs == eod, IGNORE)
    if not (data.reset_position_ids or data.reset_attention_mask):
        return inputs, labels
    ids = document_ids(inputs, eod)
    positions = document_positions(ids) if data.reset_position_ids else None
    return inputs, labels, positions, ids if data.reset_attention_mask else None
