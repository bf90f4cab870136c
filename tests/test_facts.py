"""Facts files: the shared CounterFact / zsRE data load completely, every accepted layout
parses, and bad input raises a QeditError naming the file and the line."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import DATA, FACTS

from qedit.core.errors import QeditError
from qedit.core.facts import EditRequest, demo_requests, load_requests, request_from_dict

GOOD = {"prompt": "Toyota is a company from", "subject": "Toyota", "target_new": "Italy", "ground_truth": "Japan"}


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def _count_objects(path: Path) -> int:
    return sum(1 for line in path.read_text(encoding="utf-8").splitlines() if line.strip())


@pytest.mark.parametrize("name, n_expected", [("counterfact-dev.jsonl", 2000), ("zsre-dev.jsonl", 500)])
def test_shared_data_loads_completely(name, n_expected):
    path = DATA / name
    requests = load_requests(path)
    assert len(requests) == _count_objects(path) == n_expected
    raw = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    for r, obj in zip(requests, raw, strict=True):
        assert (r.prompt, r.subject, r.target_new, r.ground_truth) == (
            obj["prompt"], obj["subject"], obj["target_new"], obj["ground_truth"])
        assert r.subject in r.prompt
        assert r.rephrase_prompts == (obj["rephrase_prompt"],)
        assert r.locality_prompts == (obj["locality_prompt"],) and r.locality_answers == (obj["locality_ground_truth"],)
        assert r.case_id == (None if "case_id" not in obj else str(obj["case_id"]))
    assert len(load_requests(path, limit=7)) == 7


def test_layouts():
    plain = request_from_dict({"prompt": "The Eiffel Tower is in", "subject": "Eiffel Tower", "target": "Rome"})
    assert (plain.target_new, plain.ground_truth, plain.rephrase_prompts) == ("Rome", None, ())
    original = request_from_dict({
        "case_id": 4, "requested_rewrite": {"prompt": "{} plays the sport of", "subject": "Michael Jordan",
                                            "target_new": {"str": "tennis"}, "target_true": {"str": "basketball"}},
        "paraphrase_prompts": ["Michael Jordan is known for", "Jordan plays"]})
    assert original == EditRequest("Michael Jordan plays the sport of", "Michael Jordan", "tennis", "basketball",
                                   ("Michael Jordan is known for", "Jordan plays"), case_id="4")
    easyedit = request_from_dict(dict(FACTS[0], locality_prompt=["a", "b"], locality_ground_truth=["x", "y"]))
    assert easyedit.locality_prompts == ("a", "b") and easyedit.locality_answers == ("x", "y")
    assert request_from_dict(dict(GOOD, ground_truth=["Japan", "Nippon"])).ground_truth == "Japan"


def test_blank_lines_crlf_and_byte_order_mark(tmp_path):
    path = tmp_path / "facts.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + (json.dumps(GOOD) + "\r\n\r\n   \r\n" + json.dumps(FACTS[0]) + "\r\n").encode())
    assert [r.subject for r in load_requests(path)] == ["Toyota", "Eiffel Tower"]


def test_demo_facts_load():
    requests = demo_requests()
    assert len(requests) >= 3 and all(r.ground_truth for r in requests)


def test_missing_file_names_it(tmp_path):
    with pytest.raises(QeditError, match=r"missing\.jsonl: no such facts file"):
        load_requests(tmp_path / "missing.jsonl")
    with pytest.raises(QeditError, match="no such facts file"):
        load_requests(tmp_path)                          # a directory is not a facts file


# (bad line, what the message must say). The bad line is always line 3 (after a good line and a blank).
BAD_LINES = [
    ('{"prompt": "Toyota is", "subject": "Toyota", "target_new": "Italy"', "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    ('"just a string"', "expected a JSON object"),
    (json.dumps({"subject": "Toyota", "target_new": "Italy"}), "missing field 'prompt'"),
    (json.dumps({"prompt": "Toyota is", "target_new": "Italy"}), "missing field 'subject'"),
    (json.dumps({"prompt": "Toyota is", "subject": "Toyota"}), "missing field 'target_new'"),
    (json.dumps(dict(GOOD, target_new=5)), "'target_new' must be a string"),
    (json.dumps(dict(GOOD, prompt={"text": "Toyota"})), "'prompt' must be a string"),
    (json.dumps(dict(GOOD, ground_truth=1.5)), "'ground_truth' must be a string"),
    (json.dumps(dict(GOOD, rephrase_prompt=[1, 2])), "'rephrase_prompt' must be a string or a list"),
    (json.dumps(dict(GOOD, subject="Honda")), "subject 'Honda' does not occur in prompt"),
    (json.dumps(dict(GOOD, subject=" ")), "subject is empty"),
    (json.dumps(dict(GOOD, target_new="")), "target_new is empty"),
    (json.dumps(dict(GOOD, target_new="   ")), "target_new is empty"),
    (json.dumps(dict(GOOD, ground_truth="")), "ground_truth is empty"),
    (json.dumps(dict(GOOD, locality_prompt="Honda is from")), "needs 'locality_ground_truth'"),
    (json.dumps(dict(GOOD, locality_prompt=["a", "b"], locality_ground_truth=["x"])), "differ in length"),
    (json.dumps(dict(GOOD, locality_prompt="Honda is from", locality_ground_truth="")), "locality answer is empty"),
    (json.dumps({"requested_rewrite": {"prompt": "{} is from", "subject": "Toyota"}}), "'requested_rewrite.target_new'"),
    (json.dumps({"requested_rewrite": "Toyota"}), "'requested_rewrite' must be an object"),
]


@pytest.mark.parametrize("bad, message", BAD_LINES, ids=[m for _, m in BAD_LINES])
def test_bad_line_names_file_and_line(tmp_path, bad, message):
    path = _write(tmp_path / "facts.jsonl", [json.dumps(GOOD), "", bad, json.dumps(GOOD)])
    with pytest.raises(QeditError) as info:
        load_requests(path)
    text = str(info.value)
    assert text.startswith(f"{path}:3: "), text
    assert message in text
    assert "\n" not in text


def test_empty_file_and_bad_encoding(tmp_path):
    empty = _write(tmp_path / "empty.jsonl", ["", "  "])
    with pytest.raises(QeditError, match=r"empty\.jsonl: no facts found"):
        load_requests(empty)
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(json.dumps(GOOD).replace("Toyota", "Citro\u00ebn").encode("latin-1"))
    with pytest.raises(QeditError, match=r"latin\.jsonl: not UTF-8"):
        load_requests(latin)


@pytest.mark.parametrize("limit", [0, -1])
def test_limit_must_be_positive(facts_file, limit):
    with pytest.raises(QeditError, match="limit"):
        load_requests(facts_file, limit=limit)


def test_to_json_round_trips_through_the_loader():
    from qedit.core.facts import EditRequest, request_from_dict

    full = EditRequest(prompt="Toyota is from", subject="Toyota", target_new="Italy", ground_truth="Japan",
                       rephrase_prompts=("Toyota comes from",), locality_prompts=("Honda is from",),
                       locality_answers=("Japan",), case_id="7")
    bare = EditRequest(prompt="Toyota is from", subject="Toyota", target_new="Italy")
    for req in (full, bare):
        assert request_from_dict(req.to_json()) == req
