"""Fine-tuning data readers: every format on tiny files, the odd cases, and every bad-input message."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from megabert.data.tasks import (
    Answer,
    check_labels,
    detect_sequence_format,
    label_list_from,
    read_conll,
    read_examples,
    read_multiple_choice,
    read_sequence_classification,
    read_squad,
)
from megabert.errors import UserError

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def write(path: Path, text: str, bom: bool = False) -> Path:
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode("utf-8"))
    return path


# --------------------------------------------------------------------------------------------
# Sequence classification
# --------------------------------------------------------------------------------------------


def test_glue_presets_detected_from_header(tmp_path):
    sst = write(tmp_path / "sst.tsv", "sentence\tlabel\na fine film \t1\ndull\t0\n")
    mrpc = write(
        tmp_path / "mrpc.tsv",
        "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
        '1\t11\t12\tHe said "so.\tHe "said" so.\n0\t13\t14\tA cat.\tA dog.\n',
        bom=True,
    )
    stsb = write(
        tmp_path / "stsb.tsv",
        "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
        "0\tmain\tMSR\t2012\t0001\tnone\tnone\tA plane.\tAn air plane.\t5.000\n"
        "1\tmain\tMSR\t2012\t0004\tnone\tnone\tA man.\tA flute.\t0.600\n",
    )
    cola = write(tmp_path / "cola.tsv", "gj04\t1\t\tThe sailors rode.\ngj04\t0\t*\tRode sailors the.\n")
    assert [detect_sequence_format(p) for p in (sst, mrpc, stsb, cola)] == [
        "glue-sst2", "glue-mrpc", "glue-stsb", "glue-cola",
    ]  # fmt: skip

    s = read_sequence_classification(sst)
    assert [(e.text, e.text_pair, e.label) for e in s] == [("a fine film ", None, "1"), ("dull", None, "0")]
    assert s[0].where == f"{sst}:2"
    m = read_sequence_classification(mrpc)
    # The BOM is not part of the first column name, and unbalanced quotes are plain text.
    assert (m[0].text, m[0].text_pair, m[0].label) == ('He said "so.', 'He "said" so.', "1")
    b = read_sequence_classification(stsb)
    assert [e.label for e in b] == [5.0, 0.6] and b[1].text_pair == "A flute."
    c = read_sequence_classification(cola)
    assert [(e.text, e.label) for e in c] == [("The sailors rode.", "1"), ("Rode sailors the.", "0")]
    assert c[0].where == f"{cola}:1"  # no header: data starts on line 1
    # An explicit preset works without the header heuristics.
    assert read_sequence_classification(cola, format="glue-cola")[1].label == "0"


def test_generic_tsv_csv_jsonl_by_name_and_index(tmp_path):
    tsv = write(tmp_path / "d.tsv", "id\tpremise\thypothesis\tgold\n1\tA.\tB.\tyes\n2\tC.\tD.\tno\n")
    r = read_sequence_classification(tsv, text_column="premise", text_pair_column=3 - 1, label_column="gold")
    assert [(e.text, e.text_pair, e.label) for e in r] == [("A.", "B.", "yes"), ("C.", "D.", "no")]
    # Column indices as strings (as from a command line) work too.
    r2 = read_sequence_classification(tsv, text_column="1", text_pair_column="2", label_column="3")
    assert [e.label for e in r2] == ["yes", "no"]
    noheader = write(tmp_path / "n.tsv", "x\tgood\t1\ny\tbad\t0\n")
    r3 = read_sequence_classification(noheader, has_header=False, text_column=1, label_column=-1)
    assert [(e.text, e.label) for e in r3] == [("good", "1"), ("bad", "0")]

    csv_file = write(tmp_path / "d.csv", 'text,label\n"hello, world",pos\n"multi\nline",neg\n')
    c = read_sequence_classification(csv_file)
    assert [(e.text, e.label) for e in c] == [("hello, world", "pos"), ("multi\nline", "neg")]
    assert [e.where for e in c] == [f"{csv_file}:2", f"{csv_file}:3"]

    jsonl = write(
        tmp_path / "d.jsonl",
        '{"sentence": "a", "label": 1}\n\n{"sentence": "b", "label": 0}\n',
    )
    j = read_sequence_classification(jsonl)
    assert [(e.text, e.label, e.where) for e in j] == [("a", "1", f"{jsonl}:1"), ("b", "0", f"{jsonl}:3")]


def test_regression_and_multi_label(tmp_path):
    reg = write(tmp_path / "r.tsv", "text\tscore\na\t1.5\nb\t-2\n")
    assert [e.label for e in read_sequence_classification(reg, problem_type="regression")] == [1.5, -2.0]
    ml = write(tmp_path / "m.jsonl", '{"text": "a", "label": ["x", "y"]}\n{"text": "b", "label": []}\n')
    r = read_sequence_classification(ml, problem_type="multi_label_classification")
    assert [e.label for e in r] == [("x", "y"), ()]
    mls = write(tmp_path / "m.tsv", "text\tlabel\na\tsport| politics\nb\tsport\n")
    r2 = read_sequence_classification(mls, problem_type="multi_label_classification", label_separator="|")
    assert [e.label for e in r2] == [("sport", "politics"), ("sport",)]
    assert label_list_from(r2) == ["politics", "sport"]


def test_unlabeled(tmp_path):
    f = write(tmp_path / "test.tsv", "index\tsentence\n0\thello\n")
    r = read_sequence_classification(f, labeled=False)
    assert (r[0].text, r[0].label) == ("hello", None)
    with pytest.raises(UserError, match=r"test.tsv:1: cannot tell which column holds the label \(the columns are \['index', 'sentence'\]\)"):
        read_sequence_classification(f)


def test_label_list_sorted_and_validation_labels(tmp_path):
    train = write(tmp_path / "train.tsv", "text\tlabel\na\t10\nb\t2\nc\t2\nd\t-1\n")
    labels = label_list_from(read_sequence_classification(train))
    assert labels == ["-1", "2", "10"]  # numeric order, not text order
    names = write(tmp_path / "names.tsv", "text\tlabel\na\tpos\nb\tneg\nc\tneutral\n")
    assert label_list_from(read_sequence_classification(names)) == ["neg", "neutral", "pos"]
    dev = write(tmp_path / "dev.tsv", "text\tlabel\na\t2\nb\t7\n")
    with pytest.raises(UserError, match=r"dev.tsv:3: label '7' is not among the training labels \['-1', '2', '10'\]"):
        check_labels(read_sequence_classification(dev), labels)
    check_labels(read_sequence_classification(train), labels)  # no error
    reg = read_sequence_classification(write(tmp_path / "r.tsv", "text\tlabel\na\t0.5\n"), problem_type="regression")
    with pytest.raises(UserError, match="regression targets"):
        label_list_from(reg)


def test_sequence_bad_input_messages(tmp_path):
    bad_cols = write(tmp_path / "b.tsv", "text\tlabel\na\t1\nb\t1\textra\nc\t0\n")
    with pytest.raises(UserError, match=r"b.tsv:3: expected 2 columns, found 3"):
        read_sequence_classification(bad_cols)
    r = read_sequence_classification(bad_cols, on_bad="skip")
    assert [e.text for e in r] == ["a", "c"] and r.num_skipped == 1
    assert r.skipped == [f"{bad_cols}:3: expected 2 columns, found 3"]

    reg = write(tmp_path / "r.tsv", "text\tscore\na\t1.0\nb\thigh\n")
    with pytest.raises(UserError, match=r"r.tsv:3: regression label 'high' is not a number"):
        read_sequence_classification(reg, problem_type="regression")
    nan = write(tmp_path / "nan.tsv", "text\tscore\na\tnan\n")
    with pytest.raises(UserError, match=r"nan.tsv:2: regression label 'nan' is not finite"):
        read_sequence_classification(nan, problem_type="regression")
    empty_label = write(tmp_path / "el.tsv", "text\tlabel\na\t\n")
    with pytest.raises(UserError, match=r"el.tsv:2: empty label"):
        read_sequence_classification(empty_label)

    js = write(tmp_path / "b.jsonl", '{"text": "a", "label": "x"}\n{"text": "b", "label": \n["no"]\n{"text": 3, "label": "x"}\n')
    with pytest.raises(UserError, match=r"b.jsonl:2: not valid JSON"):
        read_sequence_classification(js)
    skipped = read_sequence_classification(js, on_bad="skip")
    assert len(skipped) == 1
    assert [s.split(": ")[0] for s in skipped.skipped] == [f"{js}:2", f"{js}:3", f"{js}:4"]
    assert "expected a JSON object, got list" in skipped.skipped[1]
    assert "the text must be a string, got 3" in skipped.skipped[2]
    missing = write(tmp_path / "m.jsonl", '{"text": "a", "label": "x"}\n{"text": "b"}\n')
    with pytest.raises(UserError, match=r"m.jsonl:2: missing label key 'label'"):
        read_sequence_classification(missing)

    with pytest.raises(UserError, match=r"no label column 'gold'; the columns are \['text', 'label'\]"):
        read_sequence_classification(bad_cols, label_column="gold")
    with pytest.raises(UserError, match=r"text column 5 is out of range \(2 columns\)"):
        read_sequence_classification(bad_cols, text_column=5)
    with pytest.raises(UserError, match=r"unknown format 'xml'"):
        read_sequence_classification(bad_cols, format="xml")
    with pytest.raises(UserError, match=r"unknown problem_type 'ranking'"):
        read_sequence_classification(bad_cols, problem_type="ranking")
    with pytest.raises(UserError, match=r"the header \['text', 'label'\] is not the glue-mrpc header"):
        read_sequence_classification(bad_cols, format="glue-mrpc")


def test_empty_and_missing_files(tmp_path, caplog):
    empty = write(tmp_path / "e.tsv", "")
    with pytest.raises(UserError, match=r"e.tsv: no examples found \(the file is empty\)"):
        read_sequence_classification(empty, has_header=False, text_column=0, label_column=1)
    header_only = write(tmp_path / "h.tsv", "sentence\tlabel\n")
    with pytest.raises(UserError, match=r"h.tsv: no examples found"):
        read_sequence_classification(header_only)
    all_bad = write(tmp_path / "a.tsv", "text\tlabel\nonly-one-column\n")
    with pytest.raises(UserError, match=r"a.tsv: no usable examples: all 1 records were skipped; the first: .*a.tsv:2"):
        read_sequence_classification(all_bad, on_bad="skip")
    with pytest.raises(UserError, match=r"nope.tsv: no such file"):
        read_sequence_classification(tmp_path / "nope.tsv")
    bad_utf8 = tmp_path / "u.tsv"
    bad_utf8.write_bytes(b"text\tlabel\n\xff\xfe\t1\n")
    with pytest.raises(UserError, match=r"u.tsv:2: not valid UTF-8"):
        read_sequence_classification(bad_utf8)
    # Skips are logged with their count, never silent.
    two_bad = write(tmp_path / "t.tsv", "text\tlabel\na\t1\nb\nc\n")
    with caplog.at_level(logging.WARNING, logger="megabert.data"):
        assert len(read_sequence_classification(two_bad, on_bad="skip")) == 1
    assert "skipped 2 bad record(s)" in caplog.text


# --------------------------------------------------------------------------------------------
# CoNLL
# --------------------------------------------------------------------------------------------


def test_conll(tmp_path):
    f = write(
        tmp_path / "d.txt",
        "-DOCSTART- -X- -X- O\n\nEU NNP B-NP B-ORG\nrejects VBZ B-VP O\n\n\nPeter NNP B-NP B-PER\n"
        "Blackburn NNP I-NP I-PER\n-DOCSTART- -X- O\nLondon B-LOC\n",
    )
    r = read_conll(f)
    assert [(e.words, e.tags) for e in r] == [
        (("EU", "rejects"), ("B-ORG", "O")),
        (("Peter", "Blackburn"), ("B-PER", "I-PER")),
        (("London",), ("B-LOC",)),
    ]
    assert [e.line for e in r] == [3, 7, 10]
    assert label_list_from(r) == ["B-LOC", "B-ORG", "B-PER", "I-PER", "O"]
    unlabeled = read_conll(write(tmp_path / "u.txt", "EU\nrejects\n\nPeter\n"), labeled=False)
    assert [(e.words, e.tags) for e in unlabeled] == [(("EU", "rejects"), None), (("Peter",), None)]


def test_conll_bad_input(tmp_path):
    f = write(tmp_path / "d.txt", "EU B-ORG\nrejects\n\nPeter B-PER\n")
    with pytest.raises(UserError, match=r"d.txt:2: expected 'word \.\.\. TAG', found 'rejects' \(in the sentence starting at line 1\)"):
        read_conll(f)
    r = read_conll(f, on_bad="skip")
    assert [e.words for e in r] == [("Peter",)] and r.num_skipped == 1  # the whole sentence goes
    with pytest.raises(UserError, match=r"e.txt: no sentences found \(the file is empty\)"):
        read_conll(write(tmp_path / "e.txt", "\n\n-DOCSTART- O\n\n"))
    train = read_conll(write(tmp_path / "t.txt", "EU B-ORG\nx O\n"))
    dev = read_conll(write(tmp_path / "v.txt", "a O\n\nb O\nParis B-LOC\n"))
    with pytest.raises(UserError, match=r"v.txt:4: tag 'B-LOC' is not among the training labels \['B-ORG', 'O'\]"):
        check_labels(dev, label_list_from(train))


# --------------------------------------------------------------------------------------------
# SQuAD
# --------------------------------------------------------------------------------------------


def squad(paragraphs: list[dict], version: str = "1.1") -> dict:
    return {"version": version, "data": [{"title": "T", "paragraphs": paragraphs}]}


def test_squad_v1_and_v2(tmp_path):
    context = "Denver Broncos won Super Bowl 50 in 2016."
    doc = squad(
        [
            {
                "context": context,
                "qas": [
                    {"id": "q1", "question": "Who won?", "answers": [
                        {"text": "Denver Broncos", "answer_start": 0},
                        {"text": "Broncos", "answer_start": 7},
                    ]},
                    {"id": "q2", "question": "Who lost?", "answers": [], "is_impossible": True,
                     "plausible_answers": [{"text": "Broncos", "answer_start": 7}]},
                ],
            }
        ],
        version="v2.0",
    )
    f = write(tmp_path / "s.json", json.dumps(doc, indent=1))
    r = read_squad(f)
    assert len(r) == 2
    assert r[0].answers == (Answer("Denver Broncos", 0), Answer("Broncos", 7)) and not r[0].is_impossible
    assert r[0].answers[1].end == 14 and r[0].title == "T"
    assert r[1].is_impossible and r[1].answers == ()
    assert r[0].context == context and r[1].question == "Who lost?"


def test_squad_bad_input(tmp_path):
    context = "Denver Broncos won."
    doc = squad([{"context": context, "qas": [
        {"id": "ok", "question": "Who?", "answers": [{"text": "Denver", "answer_start": 0}]},
        {"id": "bad", "question": "Who?", "answers": [{"text": "Broncos", "answer_start": 8}]},
    ]}])
    f = write(tmp_path / "s.json", json.dumps(doc, indent=1))
    # The place names the line where the question id is, and the JSON path.
    with pytest.raises(
        UserError,
        match=r"s.json:\d+ \(data\[0\].paragraphs\[0\].qas\[1\], question id bad\): answer 'Broncos' does not"
        r" occur at offset 8 of the context \(found 'roncos.'\)",
    ):
        read_squad(f)
    text = f.read_text()
    line = text[: text.find('"bad"')].count("\n") + 1
    r = read_squad(f, on_bad="skip")
    assert [e.id for e in r] == ["ok"] and r.skipped[0].startswith(f"{f}:{line} (")

    no_answers = write(tmp_path / "n.json", json.dumps(squad([{"context": "c", "qas": [
        {"id": "x", "question": "q", "answers": []}]}])))
    with pytest.raises(UserError, match=r"an answerable question \(no 'is_impossible': true\) has no answers"):
        read_squad(no_answers)
    assert read_squad(no_answers, labeled=False)[0].answers == ()
    dup = write(tmp_path / "d.json", json.dumps(squad([{"context": "c", "qas": [
        {"id": "x", "question": "q", "answers": [{"text": "c", "answer_start": 0}]},
        {"id": "x", "question": "q2", "answers": [{"text": "c", "answer_start": 0}]}]}])))
    with pytest.raises(UserError, match=r"duplicate question id 'x'"):
        read_squad(dup)
    broken = write(tmp_path / "b.json", '{"data": [\n{"paragraphs": ]}')
    with pytest.raises(UserError, match=r"b.json:2: not valid JSON"):
        read_squad(broken)
    with pytest.raises(UserError, match=r"w.json: not SQuAD JSON: expected an object with a 'data' list"):
        read_squad(write(tmp_path / "w.json", "[1, 2]"))
    with pytest.raises(UserError, match=r"e.json: no questions found \(the file is empty\)"):
        read_squad(write(tmp_path / "e.json", ""))
    with pytest.raises(UserError, match=r"z.json: no questions found"):
        read_squad(write(tmp_path / "z.json", '{"data": []}'))


# --------------------------------------------------------------------------------------------
# Multiple choice
# --------------------------------------------------------------------------------------------


def test_multiple_choice_jsonl_and_swag(tmp_path):
    f = write(
        tmp_path / "c.jsonl",
        '{"query": "The man turned on the faucet, therefore", "gold": 1, "choices": ["a.", "b."]}\n'
        '{"query": "Q2", "choices": ["c.", "d."], "gold": 0}\n',
    )
    r = read_multiple_choice(f)
    assert [(e.query, e.choices, e.label) for e in r] == [
        ("The man turned on the faucet, therefore", ("a.", "b."), 1),
        ("Q2", ("c.", "d."), 0),
    ]
    swag = write(
        tmp_path / "s.csv",
        ",video-id,fold-ind,startphrase,sent1,sent2,gold-source,ending0,ending1,ending2,ending3,label\n"
        '0,v,1,"Members sit. A man","Members sit.","A man",gold,runs.,"sits, then stands.",eats.,waves.,1\n',
    )
    s = read_multiple_choice(swag)
    assert s[0].query == "Members sit."
    assert s[0].choices == ("A man runs.", "A man sits, then stands.", "A man eats.", "A man waves.")
    assert s[0].label == 1 and s[0].where == f"{swag}:2"
    unlabeled = read_multiple_choice(
        write(tmp_path / "u.jsonl", '{"query": "q", "choices": ["a", "b", "c"]}\n'), labeled=False
    )
    assert unlabeled[0].label is None and len(unlabeled[0].choices) == 3


def test_multiple_choice_bad_input(tmp_path):
    f = write(
        tmp_path / "c.jsonl",
        '{"query": "q1", "choices": ["a", "b", "c"], "gold": 0}\n'
        '{"query": "q2", "choices": ["a"], "gold": 0}\n'
        '{"query": "q3", "choices": ["a", "b"], "gold": 1}\n'
        '{"query": "q4", "choices": ["a", "b", "c"], "gold": 3}\n'
        '{"query": "q5", "choices": ["a", "b", "c"]}\n'
        '{"query": "q6", "choices": ["a", "b", "c"], "gold": 2}\n',
    )
    with pytest.raises(UserError, match=r"c.jsonl:2: needs at least 2 choices, found 1"):
        read_multiple_choice(f)
    r = read_multiple_choice(f, on_bad="skip")
    assert [e.query for e in r] == ["q1", "q6"]
    assert r.skipped == [
        f"{f}:2: needs at least 2 choices, found 1",
        f"{f}:3: has 2 choices but earlier examples have 3 (first at {f}:1); all examples of a file need the same number",
        f"{f}:4: gold 3 is not a choice index in [0, 2]",
        f"{f}:5: missing key(s) ['gold']",
    ]
    swag = write(tmp_path / "s.csv", "sent1,ending0,ending1,label\na,b,c,0\n")
    with pytest.raises(UserError, match=r"s.csv:1: SWAG CSV is missing column\(s\) \['sent2'\]"):
        read_multiple_choice(swag)
    swag2 = write(tmp_path / "t.csv", "sent1,sent2,ending0,ending1,label\na,b,c,d,x\n")
    with pytest.raises(UserError, match=r"t.csv:2: label 'x' is not an integer"):
        read_multiple_choice(swag2)
    with pytest.raises(UserError, match=r"e.jsonl: no examples found \(the file is empty\)"):
        read_multiple_choice(write(tmp_path / "e.jsonl", "\n"))


def test_read_examples_dispatch(tmp_path):
    f = write(tmp_path / "d.txt", "EU B-ORG\n")
    assert read_examples("ner", f)[0].words == ("EU",)
    with pytest.raises(UserError, match=r"unknown task 'summarization'"):
        read_examples("summarization", f)
    with pytest.raises(UserError, match=r"bad option for the token-classification reader: .*'text_column'"):
        read_examples("token-classification", f, text_column="x")


# --------------------------------------------------------------------------------------------
# The real data sets (counts from shared/data/README.md)
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_real_data_counts():
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is not beside this checkout")
    glue = SHARED_DATA / "glue"
    expected = {
        ("SST-2", "dev"): 6735, ("SST-2", "train"): 60614,
        ("MRPC", "dev"): 408, ("MRPC", "train"): 3668,
        ("STS-B", "dev"): 1500, ("STS-B", "train"): 5749,
        ("CoLA", "dev"): 527, ("CoLA", "train"): 8551,
    }  # fmt: skip
    presets = {"SST-2": "glue-sst2", "MRPC": "glue-mrpc", "STS-B": "glue-stsb", "CoLA": "glue-cola"}
    for (name, split), count in expected.items():
        path = glue / name / f"{split}.tsv"
        assert detect_sequence_format(path) == presets[name]
        result = read_sequence_classification(path)
        assert (len(result), result.num_skipped) == (count, 0), path
        if name != "STS-B":
            assert label_list_from(result) == ["0", "1"]
        else:
            assert all(0.0 <= e.label <= 5.0 for e in result)
    mrpc = read_sequence_classification(glue / "MRPC" / "dev.tsv")
    assert mrpc[0].text_pair.startswith('"The foodservice pie business')
    conll_train = read_conll(SHARED_DATA / "conll2003" / "train.txt")
    conll_dev = read_conll(SHARED_DATA / "conll2003" / "dev.txt")
    assert (len(conll_train), len(conll_dev)) == (14041, 3250)
    labels = label_list_from(conll_train)
    assert labels == ["B-LOC", "B-MISC", "B-ORG", "B-PER", "I-LOC", "I-MISC", "I-ORG", "I-PER", "O"]
    check_labels(conll_dev, labels)
    xquad = read_squad(SHARED_DATA / "qa" / "xquad.en.json")
    assert len(xquad) == 1190 and xquad.num_skipped == 0
    mc = SHARED_DATA / "multiple_choice"
    assert len(read_multiple_choice(mc / "copa.jsonl")) == 100
    assert len(read_multiple_choice(mc / "piqa.jsonl")) == 1838
    assert len(read_multiple_choice(mc / "openbook_qa.jsonl")) == 500
