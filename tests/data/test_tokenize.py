"""Tests for alignforge.data.tokenize (chat-template rendering, masks, BOS, truncation)."""

from __future__ import annotations

import pytest

from alignforge.data.records import PreferenceRecord, SFTRecord, Source
from alignforge.data.tokenize import (
    Cut,
    load_preference_dataset,
    load_sft_dataset,
    render,
    tokenize_messages,
    tokenize_preference,
    tokenize_prompt_completion,
    tokenize_sft,
    truncate_prompt_responses,
)
from alignforge.errors import ConfigError, DataError

U = lambda c: {"role": "user", "content": c}  # noqa: E731
A = lambda c: {"role": "assistant", "content": c}  # noqa: E731
S = lambda c: {"role": "system", "content": c}  # noqa: E731
DEFAULT_SYS = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"


def masked_runs(tok, ids, mask):
    """Decoded text of each maximal run of masked tokens."""
    runs, cur = [], []
    for i, m in zip(ids, mask, strict=False):
        if m:
            cur.append(i)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return [tok.decode(r, skip_special_tokens=False) for r in runs]


def dec(tok, ids):
    return tok.decode(ids, skip_special_tokens=False)


# --------------------------------------------------------------------------- render / mask


def test_render_uses_chat_template(tiny_tokenizer):
    msgs = [U("Hello there"), A("Paris.")]
    assert render(tiny_tokenizer, msgs) == (
        DEFAULT_SYS + "<|im_start|>user\nHello there<|im_end|>\n<|im_start|>assistant\nParis.<|im_end|>\n"
    )
    assert render(tiny_tokenizer, msgs[:1], add_generation_prompt=True).endswith(
        "<|im_start|>user\nHello there<|im_end|>\n<|im_start|>assistant\n"
    )


def test_mask_single_turn(tiny_tokenizer):
    msgs = [U("What is the capital of France?"), A("Paris is the capital of France.")]
    ids, mask, cut = tokenize_messages(tiny_tokenizer, msgs)
    full = render(tiny_tokenizer, msgs)
    assert ids == tiny_tokenizer(full, add_special_tokens=False).input_ids
    assert masked_runs(tiny_tokenizer, ids, mask) == ["Paris is the capital of France.<|im_end|>"]
    assert dec(tiny_tokenizer, ids[cut:]) == "Paris is the capital of France.<|im_end|>\n"
    assert mask[-1] == 0  # trailing newline not trained on
    assert dec(tiny_tokenizer, [i for i, m in zip(ids, mask, strict=False) if not m]) == (
        DEFAULT_SYS + "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n\n"
    )


def test_mask_multi_turn_with_system(tiny_tokenizer):
    msgs = [S("Be brief."), U("Hi"), A("Hello! How can I help?"), U("A poem"), A("Sure, the sea.")]
    ids, mask, cut = tokenize_messages(tiny_tokenizer, msgs)
    assert masked_runs(tiny_tokenizer, ids, mask) == ["Hello! How can I help?<|im_end|>", "Sure, the sea.<|im_end|>"]
    assert dec(tiny_tokenizer, ids).startswith("<|im_start|>system\nBe brief.<|im_end|>")  # no default system
    assert dec(tiny_tokenizer, ids[cut:]) == "Sure, the sea.<|im_end|>\n"
    assert sum(mask[:cut]) == len(
        tiny_tokenizer("Hello! How can I help?<|im_end|>", add_special_tokens=False).input_ids
    )


def test_mask_with_plain_fallback(plain_tokenizer):
    msgs = [U("Hi"), A("Hello there"), U("more"), A("Sure")]
    assert render(plain_tokenizer, msgs) == (
        "\n\nHuman: Hi\n\nAssistant: Hello there<|im_end|>\n\nHuman: more\n\nAssistant: Sure<|im_end|>"
    )
    assert render(plain_tokenizer, msgs[:1], add_generation_prompt=True) == "\n\nHuman: Hi\n\nAssistant:"
    ids, mask, _ = tokenize_messages(plain_tokenizer, msgs)
    assert masked_runs(plain_tokenizer, ids, mask) == [" Hello there<|im_end|>", " Sure<|im_end|>"]
    p, c = tokenize_prompt_completion([U("Hi")], [A("Hello there")], plain_tokenizer)
    assert dec(plain_tokenizer, p) == "\n\nHuman: Hi\n\nAssistant:"
    assert dec(plain_tokenizer, c) == " Hello there<|im_end|>"


def test_smollm2_mask_and_completion(smollm2_tokenizer):
    tok = smollm2_tokenizer
    msgs = [U("Hello there"), A("Paris is the capital."), U("And Spain?"), A("Madrid.")]
    ids, mask, _ = tokenize_messages(tok, msgs)
    assert masked_runs(tok, ids, mask) == ["Paris is the capital.<|im_end|>", "Madrid.<|im_end|>"]
    assert dec(tok, ids).startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert ids.count(tok.convert_tokens_to_ids("<|im_start|>")) == 5  # no extra BOS
    p, c = tokenize_prompt_completion(msgs[:3], msgs[3:], tok)
    assert dec(tok, c) == "Madrid.<|im_end|>"
    assert p + c == ids[:-1]  # everything but the trailing newline


def _fresh(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def test_not_prefix_consistent_template(tiny_model_dir):
    tok = _fresh(tiny_model_dir)
    # a template that hides earlier assistant turns (like reasoning-stripping templates)
    tok.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}"
        "<|im_start|>assistant\n...<|im_end|>\n{% else %}<|im_start|>{{ m['role'] }}\n"
        "{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    rec = SFTRecord([U("a"), A("b"), U("c"), A("d")], source=Source("f.jsonl", 7))
    with pytest.raises(DataError) as e:
        tokenize_sft(rec, tok, 512)
    assert "not prefix-consistent" in str(e.value) and str(e.value).startswith("f.jsonl:7: field 'messages'")
    # a single assistant turn is fine with that template
    ex, _ = tokenize_sft(SFTRecord([U("a"), A("b")]), tok, 512)
    assert masked_runs(tok, ex.input_ids, ex.loss_mask) == ["b<|im_end|>"]


def test_template_exception_is_data_error(tiny_model_dir):
    tok = _fresh(tiny_model_dir)
    tok.chat_template = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(DataError, match="roles must alternate"):
        tokenize_prompt_completion([U("a")], [A("b")], tok, Source("f", 3))


# --------------------------------------------------------------------------- BOS


@pytest.mark.parametrize("fixture", ["bos_tokenizer", "bos_template_tokenizer"])
def test_exactly_one_bos(request, fixture):
    tok = request.getfixturevalue(fixture)
    bos = tok.bos_token_id
    assert tok("x").input_ids[0] == bos
    msgs = [U("Hi"), A("Hello there")]
    ids, mask, _ = tokenize_messages(tok, msgs)
    assert ids[0] == bos and ids.count(bos) == 1 and mask[0] == 0
    assert masked_runs(tok, ids, mask) == ["Hello there<|im_end|>"]
    p, c = tokenize_prompt_completion(msgs[:1], msgs[1:], tok)
    assert p[0] == bos and (p + c).count(bos) == 1
    assert dec(tok, c) == "Hello there<|im_end|>"
    pair, _ = tokenize_preference(PreferenceRecord([U("Hi")], [A("yes")], [A("no")]), tok, 512)
    assert pair.prompt_ids.count(bos) == 1 and bos not in pair.chosen_ids + pair.rejected_ids


def test_no_bos_added_when_tokenizer_adds_none(tiny_tokenizer):
    assert tiny_tokenizer("x").input_ids[0] != tiny_tokenizer.bos_token_id
    ids, _, _ = tokenize_messages(tiny_tokenizer, [U("Hi"), A("Yo")])
    assert ids == tiny_tokenizer(render(tiny_tokenizer, [U("Hi"), A("Yo")]), add_special_tokens=False).input_ids


# --------------------------------------------------------------------------- prompt / completion


def test_prompt_completion_matches_full_render(tiny_tokenizer):
    prompt, comp = [S("Be kind."), U("Hi"), A("Hello"), U("Poem?")], [A("The sea and the sky.")]
    p, c = tokenize_prompt_completion(prompt, comp, tiny_tokenizer)
    assert (
        p
        == tiny_tokenizer(
            render(tiny_tokenizer, prompt, add_generation_prompt=True), add_special_tokens=False
        ).input_ids
    )
    assert dec(tiny_tokenizer, c) == "The sea and the sky.<|im_end|>"
    full = tiny_tokenizer(render(tiny_tokenizer, prompt + comp), add_special_tokens=False).input_ids
    assert p + c == full[:-1]


def _chat_template_ids(tok, conv):
    out = tok.apply_chat_template(conv, tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


@pytest.mark.parametrize("which", ["tiny", "plain", "smollm2"])
def test_full_render_ids_are_apply_chat_template(which, request):
    """The reward model's sequence is exactly what HF users feed: apply_chat_template(conversation)."""
    tok = request.getfixturevalue(
        {"tiny": "tiny_tokenizer", "plain": "plain_tokenizer", "smollm2": "smollm2_tokenizer"}[which]
    )
    prompt, comp = [S("Be kind."), U("Hi"), A("Hello"), U("Poem?")], [A("The sea and the sky.")]
    p, c = tokenize_prompt_completion(prompt, comp, tok, full_render=True)
    p0, c0 = tokenize_prompt_completion(prompt, comp, tok)
    if has_template := which != "plain":
        assert p + c == _chat_template_ids(tok, prompt + comp)
    assert p == p0 and c[: len(c0)] == c0
    if has_template:  # ChatML: the newline after <|im_end|> is kept, and it is the last token
        assert len(c) == len(c0) + 1 and dec(tok, c[len(c0) :]) == "\n"
    else:  # the plain format ends with EOS: nothing follows it
        assert c == c0
    rec = PreferenceRecord(prompt, comp, [A("No.")])
    pair, _ = tokenize_preference(rec, tok, 4096, full_render=True)
    assert pair.prompt_ids + pair.chosen_ids == p + c
    assert (
        pair.prompt_ids + pair.rejected_ids
        == tokenize_prompt_completion(prompt, [A("No.")], tok, full_render=True)[0]
        + tokenize_prompt_completion(prompt, [A("No.")], tok, full_render=True)[1]
    )


def test_prompt_completion_boundary_merge_falls_back(tiny_model_dir):
    tok = _fresh(tiny_model_dir)
    tok.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'user' %}User: {{ m['content'] }}\n"
        "{% else %}Assistant: {{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}Assistant: {% endif %}"
    )
    p, c = tokenize_prompt_completion([U("Hi")], [A("Paris is")], tok)
    joint = tok("User: Hi\nAssistant: Paris is<|im_end|>", add_special_tokens=False).input_ids
    assert joint[: len(p)] != p  # the space merged into the completion's first token
    assert p == tok("User: Hi\nAssistant: ", add_special_tokens=False).input_ids
    assert c == tok("Paris is<|im_end|>", add_special_tokens=False).input_ids


# --------------------------------------------------------------------------- truncation


def test_truncate_rule_exact():
    P, R1, R2 = list(range(10)), list(range(100, 105)), list(range(200, 203))
    assert truncate_prompt_responses(P, [R1, R2], 15) == (P, [R1, R2], False)
    # max_length 12: min_prompt 6, keep max(12-5, 6) = 7
    p, (a, b), t = truncate_prompt_responses(P, [R1, R2], 12)
    assert t and p == P[3:] and a == R1 and b == R2
    # max_length 8: keep max(3, 4) = 4, responses get 4
    p, (a, b), _ = truncate_prompt_responses(P, [R1, R2], 8)
    assert p == P[6:] and a == R1[:4] and b == R2
    # leading BOS kept and counted
    p, (a,), _ = truncate_prompt_responses([99] + P, [R1], 8, keep_first=True)
    assert p == [99, 7, 8, 9] and a == R1[:4]
    # max_prompt_length overrides max_length // 2
    p, (a,), _ = truncate_prompt_responses(P, [R1], 8, max_prompt_length=2)
    assert p == P[7:] and a == R1
    p, (a,), _ = truncate_prompt_responses(P, [list(range(20))], 8, max_prompt_length=100)
    assert len(p) == 7 and len(a) == 1  # clamped so one response token remains


def test_tokenize_preference_truncate_and_drop(tiny_tokenizer):
    rec = PreferenceRecord(
        [U("Write a function in Python that returns the sum of a list. " * 3)],
        [A("Sure, here is a short poem about the sea and the sky. " * 2)],
        [A("I'm sorry.")],
        category="c",
        source=Source("f", 2),
    )
    full, over = tokenize_preference(rec, tiny_tokenizer, 4096)
    assert not over and full.category == "c" and full.source == Source("f", 2)
    P, C, R = full.prompt_ids, full.chosen_ids, full.rejected_ids
    assert dec(tiny_tokenizer, R) == "I'm sorry.<|im_end|>"
    L = 48
    assert len(P) > L // 2 and len(C) > L // 2  # both get cut
    t, over = tokenize_preference(rec, tiny_tokenizer, L)
    assert over
    keep = max(L - len(C), L // 2)
    assert t.prompt_ids == [P[0]] + P[len(P) - keep + 1 :]  # leading <|im_start|> (the BOS) kept
    assert len(t.prompt_ids) == keep == L // 2
    assert t.chosen_ids == C[: L - keep] and t.rejected_ids == R
    assert len(t.prompt_ids) + max(len(t.chosen_ids), len(t.rejected_ids)) == L
    t2, _ = tokenize_preference(rec, tiny_tokenizer, L, max_prompt_length=10)
    keep2 = L - len(C)  # max(L - len(C), 10) > 10 here, and < L // 2
    assert 10 < keep2 < L // 2
    assert len(t2.prompt_ids) == keep2 and t2.chosen_ids == C[: L - keep2]
    assert tokenize_preference(rec, tiny_tokenizer, L, overlong="drop") == (None, Cut.RESPONSE)
    with pytest.raises(ConfigError):
        tokenize_preference(rec, tiny_tokenizer, 1)
    with pytest.raises(ConfigError):
        tokenize_preference(rec, tiny_tokenizer, 10, overlong="cut")  # type: ignore[arg-type]


LONG_PROMPT = "Write a function in Python that returns the sum of a list. " * 3
LONG_ANSWER = "Sure, here is a short poem about the sea and the sky. " * 2


def test_truncate_prompt_cuts_the_prompt_first_and_drops_a_cut_response(tiny_tokenizer):
    L = 48
    fits = PreferenceRecord([U("Hi")], [A("Hello!")], [A("No.")])
    long_prompt = PreferenceRecord([U(LONG_PROMPT)], [A("I'm sorry.")], [A("No.")])
    long_answer = PreferenceRecord([U(LONG_PROMPT)], [A(LONG_ANSWER)], [A("No.")])
    full, _ = tokenize_preference(long_prompt, tiny_tokenizer, 4096)
    P, C, R = full.prompt_ids, full.chosen_ids, full.rejected_ids
    assert len(P) + len(C) > L and len(C) <= L // 2  # cutting the prompt to L // 2 tokens suffices
    for mode in ("truncate", "truncate_prompt"):
        assert tokenize_preference(fits, tiny_tokenizer, L, overlong=mode)[1] == Cut.NONE
        t, cut = tokenize_preference(long_prompt, tiny_tokenizer, L, overlong=mode)
        assert cut == Cut.PROMPT and t.chosen_ids == C and t.rejected_ids == R  # responses whole
        assert t.prompt_ids == [P[0]] + P[len(P) - (L - len(C)) + 1 :]  # cut from the left, BOS kept
        assert len(t.prompt_ids) + len(t.chosen_ids) == L
    # a response that does not fit even with the prompt cut to min_prompt
    t, cut = tokenize_preference(long_answer, tiny_tokenizer, L, overlong="truncate")
    assert cut == Cut.RESPONSE and len(t.prompt_ids) == L // 2 and len(t.chosen_ids) == L // 2
    assert t.chosen_ids[-1] != tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")  # cut in mid-text
    assert tokenize_preference(long_answer, tiny_tokenizer, L, overlong="truncate_prompt") == (None, Cut.RESPONSE)
    # a lower prompt floor keeps the response whole
    t, cut = tokenize_preference(long_answer, tiny_tokenizer, L, max_prompt_length=4, overlong="truncate_prompt")
    n_c = len(tokenize_preference(long_answer, tiny_tokenizer, 4096)[0].chosen_ids)
    assert cut == Cut.PROMPT and len(t.chosen_ids) == n_c and len(t.prompt_ids) == L - n_c


def test_report_counts_pairs_cut_and_dropped(jl, tiny_tokenizer):
    p = jl(
        [
            {"prompt": "Hi", "chosen": "Hello!", "rejected": "No."},
            {"prompt": LONG_PROMPT, "chosen": "I'm sorry.", "rejected": "No."},
            {"prompt": LONG_PROMPT, "chosen": LONG_ANSWER, "rejected": "No."},
            {"prompt": "Hi", "chosen": LONG_ANSWER * 2, "rejected": "No."},
        ]
    )
    pairs, rep = load_preference_dataset(p, tiny_tokenizer, 48, overlong="truncate_prompt")
    assert (rep.n_out, rep.n_truncated, rep.n_response_truncated, rep.n_overlong_dropped) == (2, 1, 0, 2)
    assert [x.source.line for x in pairs] == [1, 2]
    s = rep.summary()
    assert "2 examples from 4 records" in s and "1 truncated to max_length 48 (0 with a response cut)" in s
    assert "2 dropped: a response would not fit in max_length 48 even with the prompt cut" in s
    assert rep.counts()["n_overlong_dropped"] == 2 and rep.counts()["overlong"] == "truncate_prompt"
    pairs, rep = load_preference_dataset(p, tiny_tokenizer, 48)
    assert (rep.n_out, rep.n_truncated, rep.n_response_truncated, rep.n_overlong_dropped) == (4, 3, 2, 0)
    assert "3 truncated to max_length 48 (2 with a response cut)" in rep.summary()
    _, rep = load_preference_dataset(p, tiny_tokenizer, 48, overlong="drop")
    assert (rep.n_out, rep.n_truncated, rep.n_overlong_dropped) == (1, 0, 3)
    assert "3 dropped as longer than max_length 48" in rep.summary()


def test_tokenize_sft_truncate_and_drop(tiny_tokenizer):
    msgs = [
        U("Hello! How can I help you today?"),
        A("The quick brown fox."),
        U("Write a function in Python that returns the sum of a list."),
        A("Sure, here is a short poem about the sea and the sky."),
    ]
    full, over = tokenize_sft(SFTRecord(msgs), tiny_tokenizer, 4096)
    assert not over and len(full.input_ids) == len(full.loss_mask)
    ids, mask, cut = tokenize_messages(tiny_tokenizer, msgs)
    assert full.input_ids == ids
    L = 40
    n_resp = len(ids) - cut
    keep = max(L - n_resp, L // 2)
    t, over = tokenize_sft(SFTRecord(msgs), tiny_tokenizer, L)
    assert over and len(t.input_ids) == len(t.loss_mask) == L
    kept = [0] + list(range(cut - keep + 1, cut)) + list(range(cut, cut + L - keep))
    assert t.input_ids == [ids[i] for i in kept] and t.loss_mask == [mask[i] for i in kept]
    assert t.loss_mask[keep] == 1 and sum(t.loss_mask[:keep]) == sum(mask[cut - keep + 1 : cut])
    assert over == Cut.PROMPT and n_resp <= L - keep  # the prompt was cut, the last response is whole
    assert tokenize_sft(SFTRecord(msgs), tiny_tokenizer, L, overlong="drop") == (None, Cut.PROMPT)
    assert tokenize_sft(SFTRecord(msgs), tiny_tokenizer, L, overlong="truncate_prompt") == (t, Cut.PROMPT)
    assert tokenize_sft(SFTRecord(msgs), tiny_tokenizer, L // 2, overlong="truncate_prompt") == (None, Cut.RESPONSE)
    t, over = tokenize_sft(SFTRecord(msgs), tiny_tokenizer, L // 2)
    assert over == Cut.RESPONSE and len(t.input_ids) == L // 2


# --------------------------------------------------------------------------- datasets


def test_load_sft_dataset_report(jl, tiny_tokenizer):
    long = "The quick brown fox jumps over the lazy dog. " * 20
    p1 = jl(
        [{"messages": [U("Hi"), A("Hello")]}, {"messages": [U("Hi")]}, {"prompt": "q", "completion": long}],
        name="a.jsonl",
    )
    p2 = jl([{"prompt": "q", "chosen": "good", "rejected": "bad"}], name="b.jsonl")
    ex, rep = load_sft_dataset([str(p1), p2], tiny_tokenizer, 64, on_error="skip")
    assert (rep.n_read, rep.n_dropped, rep.n_truncated, rep.n_overlong_dropped, rep.n_out) == (4, 1, 1, 0, 3)
    assert [len(e.input_ids) for e in ex][1] == 64
    assert ex[2].source == Source(str(p2), 1)
    s = rep.summary()
    assert "3 examples from 4 records in 2 file(s)" in s and "1× no assistant turn" in s and "1 truncated" in s
    ex, rep = load_sft_dataset(p1, tiny_tokenizer, 64, overlong="drop", on_error="skip")
    assert (rep.n_out, rep.n_overlong_dropped, rep.n_truncated) == (1, 1, 0)
    assert "1 dropped as longer than max_length 64" in rep.summary()
    with pytest.raises(DataError, match="a.jsonl:2: field 'messages'"):
        load_sft_dataset([p1], tiny_tokenizer, 64)


def test_load_preference_dataset_real_hh(hh_dir, tiny_tokenizer):
    pairs, rep = load_preference_dataset(
        [hh_dir / "helpful-base" / "test.jsonl.gz"], tiny_tokenizer, max_length=256, on_error="skip"
    )
    assert rep.n_read == 2354 and rep.n_out == len(pairs) == 2354 - rep.n_dropped
    assert rep.n_truncated > 0
    end = tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")
    for p in pairs:
        assert len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids)) <= 256
        assert p.chosen_ids and p.rejected_ids and p.chosen_ids != p.rejected_ids
    short = [p for p in pairs if len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids)) < 256]
    assert short and all(p.chosen_ids[-1] == end and p.rejected_ids[-1] == end for p in short)
