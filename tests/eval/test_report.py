"""``alignforge report``: one self-contained HTML page from two synthetic runs (one PPO), a response file with
a script payload and eval JSONs; rendered in headless Chromium without console errors or failed requests."""

import base64
import json
import os
import re
from pathlib import Path

import pytest

from alignforge.errors import DataError
from alignforge.eval.report import build_report, eval_tables, write_report

XSS = "<script>alert(1)</script>"
CHROMIUM = "/usr/bin/chromium"


@pytest.fixture
def inputs(tmp_path):
    sft = tmp_path / "sft"
    sft.mkdir()
    (sft / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 2.0 / s}) + "\n" for s in range(1, 6)))
    ppo = tmp_path / "ppo"
    ppo.mkdir()
    (ppo / "metrics.jsonl").write_text(
        "".join(
            json.dumps(
                {
                    "step": s,
                    "loss": 1.0 / s,
                    "reward_raw": 0.1 * s,
                    "reward": 0.2 * s,
                    "kl_ref": 0.01 * s,
                    "response_len": 10 + s,
                }
            )
            + "\n"
            for s in range(1, 6)
        )
    )
    (ppo / "samples.jsonl").write_text(
        "".join(
            json.dumps(
                {
                    "step": st,
                    "prompt": "p",
                    "response": "word " * (3 + k + st),
                    "reward": 0.5 * k + st,
                    "reward_raw": 0.0,
                    "n_tokens": 3,
                }
            )
            + "\n"
            for st in (1, 5)
            for k in range(4)
        )
    )
    a = tmp_path / "a.jsonl"
    b = tmp_path / "b.jsonl"
    a.write_text(
        json.dumps(
            {"id": "q1", "prompt": [{"role": "user", "content": "Say <b>hi</b> & bye"}], "response": XSS, "score": 1.5}
        )
        + "\n"
        + json.dumps({"id": "q2", "prompt": "second prompt", "response": "plain answer two", "score": -0.5})
        + "\n"
    )
    b.write_text(
        json.dumps({"id": "q2", "prompt": "second prompt", "responses": ["b turn one", "b turn two"]})
        + "\n"
        + json.dumps({"id": "q1", "prompt": [{"role": "user", "content": "Say <b>hi</b> & bye"}], "response": "B-ONE"})
        + "\n"
    )
    acc = tmp_path / "acc.json"
    acc.write_text(
        json.dumps(
            {
                "kind": "rm_accuracy",
                "table": {
                    "title": "RM accuracy <by category>",
                    "columns": ["category", "n", "accuracy"],
                    "rows": [
                        {"category": "safety<i>", "n": 4, "accuracy": 0.75},
                        {"category": "all", "n": 9, "accuracy": 0.6667},
                    ],
                },
            }
        )
    )
    harm = tmp_path / "harm.json"
    harm.write_text(
        json.dumps(
            {
                "harmful": {
                    "file": "x",
                    "n": 10,
                    "n_refused": 7,
                    "n_empty": 1,
                    "attack_success_rate": {"value": 0.3, "ci": [0.1, 0.6]},
                },
                "bootstrap": {"confidence": 0.95},
            }
        )
    )
    return {"runs": [sft, ppo], "responses": [a, b], "evals": [acc, harm], "tmp": tmp_path}


def _images(page: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)]


def test_report_inlines_images_tables_and_escapes_text(inputs):
    out = inputs["tmp"] / "out" / "report.html"
    write_report(inputs["runs"], out, eval_files=inputs["evals"], responses=inputs["responses"])
    page = out.read_text(encoding="utf-8")
    assert not list(out.parent.glob(".*.tmp"))  # atomic: no temp file left
    # self-contained: no external URL, no script element, only inlined PNGs
    assert not re.search(r'(src|href)="(?!data:image/png;base64,)', page)
    assert "http://" not in page and "https://" not in page
    assert "<script" not in page.lower()
    imgs = _images(page)
    assert imgs and all(i.startswith(b"\x89PNG\r\n\x1a\n") for i in imgs)
    alts = re.findall(r'<img alt="([^"]+)"', page)
    # curves: loss for both runs; PPO's reward, reward_raw, kl_ref, response_len; histograms of length and score
    assert alts == ["loss", "reward", "reward_raw", "kl_ref", "response_len", "length", "score"]
    # the model output and every other text is escaped
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "Say &lt;b&gt;hi&lt;/b&gt; &amp; bye" in page
    assert "<h3>RM accuracy &lt;by category&gt;</h3>" in page and "<td>safety&lt;i&gt;</td>" in page
    # tables: rm-accuracy (generic form), harm report, runs
    assert '<td class="num">0.75</td>' in page
    assert "<td>attack_success_rate</td>" in page
    assert '<td class="num">0.3</td><td class="num">0.1</td><td class="num">0.6</td>' in page  # value, CI
    assert "<td>sft</td>" in page and "<td>ppo</td>" in page and "last kl_ref" in page
    # examples: same prompt in one row, one column per response file, matched by id
    ex = page[page.index("Example responses") :]
    row_q1 = ex[ex.index("id q1") : ex.index("id q2")]
    assert "&lt;script&gt;" in row_q1 and "B-ONE" in row_q1 and "score 1.5" in row_q1
    assert "— turn 2 —\nb turn two" in ex[ex.index("id q2") :]


def test_one_run_and_eval_only(inputs):
    page = build_report(inputs["runs"][:1])
    assert re.findall(r'<img alt="([^"]+)"', page) == ["loss"] and "Example responses" not in page
    page = build_report([], eval_files=inputs["evals"][:1])
    assert "Training curves" not in page and "safety&lt;i&gt;" in page


def test_generic_eval_json_forms(tmp_path):
    t = eval_tables([{"a": 1, "b": "x"}, {"a": 2, "c": None}], "f.json")
    assert len(t) == 1 and t[0].columns == ["a", "b", "c"] and len(t[0].rows) == 2
    t = eval_tables({"tables": [[{"x": 1}], {"title": "T", "rows": [{"y": 2}]}]}, "f.json")
    assert [x.title for x in t] == ["f.json (1)", "T"]
    t = eval_tables({"meta": 1, "per_model": [{"model": "m", "win": 0.5}]}, "f.json")
    assert t[0].title == "f.json: per_model"
    lengths = {
        "unit": "words",
        "files": [
            {
                "file": "/x/a.jsonl",
                "n": 2,
                "mean": 3.0,
                "median": 3.0,
                "by_category": {"c": {"n": 2, "mean": 3.0, "median": 3.0}},
            }
        ],
    }
    assert [r["category"] for r in eval_tables(lengths, "l.json")[0].rows] == ["c", "all"]


def test_bad_inputs_name_the_file(inputs):
    tmp = inputs["tmp"]
    empty = tmp / "empty_run"
    empty.mkdir()
    with pytest.raises(DataError, match=r"empty_run.*no metrics\.jsonl"):
        build_report([inputs["runs"][0], empty])
    bad = tmp / "broken.json"
    bad.write_text('{"table": [1, 2')
    with pytest.raises(DataError, match=r"broken\.json:1: invalid JSON"):
        build_report(inputs["runs"], eval_files=[bad])
    bad.write_text(json.dumps({"table": {"rows": [{"a": 1}, 3]}}))
    with pytest.raises(DataError, match=r"broken\.json: field 'table\.rows\[1\]'"):
        build_report(inputs["runs"], eval_files=[bad])
    bad.write_text(json.dumps({"x": 1}))
    with pytest.raises(DataError, match=r"broken\.json: no table found"):
        build_report(inputs["runs"], eval_files=[bad])
    (tmp / "m").mkdir()
    (tmp / "m" / "metrics.jsonl").write_text('{"loss": 1}\n')
    with pytest.raises(DataError, match=r"metrics\.jsonl:1: field 'step'"):
        build_report([tmp / "m"])
    out = tmp / "never.html"
    with pytest.raises(DataError):
        write_report([empty], out)
    assert not out.exists()


def test_cli_report(inputs, capsys):
    from alignforge.cli import main

    out = inputs["tmp"] / "cli.html"
    args = ["report", *map(str, inputs["runs"]), "--out", str(out)]
    for e in inputs["evals"]:
        args += ["--eval", str(e)]
    for r in inputs["responses"]:
        args += ["--responses", str(r)]
    assert main(args) == 0
    assert "&lt;script&gt;alert(1)" in out.read_text() and f"report: {out}" in capsys.readouterr().out
    assert main(["report", str(inputs["tmp"] / "nope"), "--out", str(out)]) == 2
    assert "nope" in capsys.readouterr().err


@pytest.mark.timeout(180)
@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} not installed")
def test_report_renders_in_chromium(inputs):
    pw_api = pytest.importorskip("playwright.sync_api")
    out = inputs["tmp"] / "report.html"
    write_report(inputs["runs"], out, eval_files=inputs["evals"], responses=inputs["responses"])
    console, failed, dialogs = [], [], []
    with pw_api.sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"]
        )
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.on("console", lambda m: console.append((m.type, m.text)))
            page.on("pageerror", lambda e: console.append(("pageerror", str(e))))
            page.on("requestfailed", lambda r: failed.append(r.url))
            page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
            page.goto(out.resolve().as_uri())
            page.wait_for_load_state("load")
            assert page.locator("script").count() == 0
            assert XSS in page.inner_text("table.ex")  # shown as text
            n_img = page.locator("img").count()
            assert n_img == 7
            widths = page.eval_on_selector_all("img", "els => els.map(e => e.naturalWidth)")
            assert all(w > 100 for w in widths), widths  # every inlined PNG decoded
            art = Path(
                os.environ.get(
                    "ALIGNFORGE_TEST_ARTIFACTS", Path(__file__).resolve().parents[2] / "outputs" / "test-artifacts"
                )
            )
            art.mkdir(parents=True, exist_ok=True)
            shot = art / "report.png"
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 10_000
        finally:
            browser.close()
    assert [c for c in console if c[0] in ("error", "pageerror")] == []
    assert failed == [] and dialogs == []
