"""Document-aware training (data.reset_attention_mask / reset_position_ids / eod_mask_loss): a
document's logits do not depend on the documents before it in the sample."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llm.config import DataConfig, ModelConfig
from llm.model import layers
from llm.model.gpt import IGNORE, build_model
from llm.model.inputs import model_inputs
from llm.model.layers import document_ids, document_positions

EOD = 2
DOCS = DataConfig(reset_attention_mask=True, reset_position_ids=True, eod_mask_loss=True, eod_token_id=EOD)


def _model(arch: str) -> torch.nn.Module:
    cfg = ModelConfig(architecture=arch, num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=24,
                      vocab_size=50, **({"num_query_groups": 2} if arch == "llama" else {}))  # fmt: skip
    return build_model(cfg, seed=3).eval()


def test_document_ids_and_positions() -> None:
    ids = torch.tensor([[5, 6, EOD, 7, EOD, EOD, 8, 9], [EOD, 1, 1, 1, 1, 1, 1, 1]])
    doc = document_ids(ids, EOD)
    assert doc.tolist() == [[0, 0, 0, 1, 1, 2, 3, 3], [0, 1, 1, 1, 1, 1, 1, 1]]
    assert document_positions(doc).tolist() == [[0, 1, 2, 0, 1, 0, 0, 1], [0, 0, 1, 2, 3, 4, 5, 6]]


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("dense", [False, True])
def test_a_document_sees_only_itself(arch: str, dense: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    if dense:  # the many-short-documents path: one call with a block-diagonal mask
        monkeypatch.setattr(layers, "MAX_DOCUMENT_CALLS_PER_SAMPLE", 0)
    model = _model(arch)
    gen = torch.Generator().manual_seed(0)
    a = torch.randint(3, 50, (9,), generator=gen).tolist() + [EOD]
    b = torch.randint(3, 50, (7,), generator=gen).tolist() + [EOD]
    c = torch.randint(3, 50, (5,), generator=gen).tolist()
    tokens = torch.tensor([a + b + c + [1], b + a + c + [1]])  # (2, 24): 23 inputs, 23 labels
    inputs, labels, positions, doc_ids = model_inputs(tokens, DOCS)
    with torch.no_grad():
        packed = model(inputs, positions=positions, doc_ids=doc_ids)
        alone = {name: model(torch.tensor([d])) for name, d in (("a", a), ("b", b), ("c", c))}
        plain = model(inputs)  # without the settings: B attends to A
    torch.testing.assert_close(packed[0, :10], alone["a"][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed[0, 10:18], alone["b"][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed[0, 18:23], alone["c"][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed[1, :8], alone["b"][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed[1, 8:18], alone["a"][0], atol=1e-5, rtol=1e-5)
    assert (plain[0, 10:18] - alone["b"][0]).abs().max() > 1e-3


def test_eod_mask_loss_leaves_the_prediction_at_an_eod_unscored() -> None:
    model = _model("gpt2")
    tokens = torch.tensor([[5, 6, EOD, 7, 8, EOD, 9, 10, 11]])
    data = DataConfig(eod_mask_loss=True, eod_token_id=EOD)
    inputs, labels = model_inputs(tokens, data)
    assert labels.tolist() == [[6, EOD, IGNORE, 8, EOD, IGNORE, 10, 11]]
    with torch.no_grad():
        loss = model(inputs, labels)
        logits = model(inputs)[0]
    keep = [0, 1, 3, 4, 6, 7]
    expected = F.cross_entropy(logits[keep], tokens[0, 1:][keep])
    torch.testing.assert_close(loss, expected)


def test_perplexity_scores_a_document_aware_model_as_it_trained() -> None:
    import numpy as np

    from llm.eval.perplexity import evaluate_stream

    model = _model("llama")
    stream = np.array([5, 6, EOD, 7, 8, 9, EOD, 10, 11, 12, 13], dtype=np.int64)
    result = evaluate_stream(model, stream, seq_length=10, batch_size=1, data=DOCS)
    with torch.no_grad():
        expected = model(*model_inputs(torch.from_numpy(stream)[None], DOCS))
    assert result.tokens == 8  # 10 predictions, the 2 made at an EOD not scored
    assert abs(result.loss - float(expected)) < 1e-6
    plain = evaluate_stream(
        model, stream, seq_length=10, batch_size=1
    )  # without the settings: all 10, across documents
    assert plain.tokens == 10 and abs(plain.loss - result.loss) > 1e-3
