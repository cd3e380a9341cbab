"""Textual inversion: a new word with its own embedding row, the only row that learns."""

import pytest
import torch

from lora_nb.course.tiny import build_text_encoder, build_tokenizer
from lora_nb.textual_inversion import (
    add_placeholder_token,
    nearest_words,
    read_learned_embedding,
    save_learned_embedding,
    train_only_rows,
)


@pytest.fixture
def parts():
    torch.manual_seed(0)
    tokenizer = build_tokenizer()
    return tokenizer, build_text_encoder(tokenizer)


def test_new_word_starts_at_its_initializer_and_is_one_token(parts):
    tokenizer, text_encoder = parts
    token_id = add_placeholder_token(tokenizer, text_encoder, "<toy>", initializer_token="star")
    assert tokenizer("a <toy> star", add_special_tokens=False).input_ids[1] == token_id
    table = text_encoder.get_input_embeddings().weight
    assert torch.equal(table[token_id], table[tokenizer.convert_tokens_to_ids("star</w>")])
    assert nearest_words(tokenizer, text_encoder, table[token_id], k=1)[0][0] == "star"


@pytest.mark.parametrize(
    "token, initializer, message",
    [
        ("star", "circle", "'star' already exists"),
        ("<toy>", "zebra", "initializer_token 'zebra' must be one token"),
        ("<toy>", None, "needs an initializer_token"),
    ],
)
def test_bad_words_are_refused_and_nothing_changes(parts, token, initializer, message):
    tokenizer, text_encoder = parts
    size = len(tokenizer)
    with pytest.raises(ValueError, match=message):
        add_placeholder_token(tokenizer, text_encoder, token, initializer_token=initializer)
    assert len(tokenizer) == size and text_encoder.get_input_embeddings().weight.shape[0] == size


def test_only_the_new_row_learns(parts):
    tokenizer, text_encoder = parts
    token_id = add_placeholder_token(tokenizer, text_encoder, "<toy>", initializer_token="star")
    embeddings = text_encoder.get_input_embeddings()
    before = embeddings.weight.detach().clone()
    restore = train_only_rows(embeddings, [token_id])
    optimizer = torch.optim.AdamW([embeddings.weight], lr=0.1, weight_decay=0.1)
    ids = tokenizer(["a <toy> on a red circle"], return_tensors="pt").input_ids
    text_encoder(ids)[0].pow(2).mean().backward()
    optimizer.step()
    restore()
    changed = (embeddings.weight != before).any(dim=1).nonzero().flatten().tolist()
    assert changed == [token_id]


def test_saved_word_reads_back(parts, tmp_path):
    tokenizer, text_encoder = parts
    add_placeholder_token(tokenizer, text_encoder, "<toy>", initializer_token="star")
    save_learned_embedding(tmp_path, tokenizer, text_encoder, "<toy>")
    token, vector = read_learned_embedding(tmp_path)
    assert token == "<toy>" and vector.shape == (text_encoder.config.hidden_size,)
