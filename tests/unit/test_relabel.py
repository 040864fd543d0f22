"""review-export's Label Studio files and relabel's row-by-row reading of an export (no S3: the parts before it)."""

from __future__ import annotations

import json
import unicodedata
import xml.etree.ElementTree as ET

import pytest

from pipeline.adapters.storage import ObjectInfo
from pipeline.commands import relabel, review_export
from pipeline.core.errors import PipelineError

CLASSES = ["곰팡이", "오염", "창틀,문틀수정", 'a "quoted" & <odd> name']
PREFIX = "dacon/"


def test_labeling_config_offers_exactly_the_classes_whatever_their_characters():
    root = ET.fromstring(review_export.labeling_config(CLASSES))
    choices = root.find("Choices")
    assert choices.get("name") == review_export.FROM_NAME and choices.get("toName") == review_export.TO_NAME
    assert choices.get("choice") == "single"
    assert [c.get("value") for c in choices.findall("Choice")] == CLASSES
    assert root.find("Image").get("value") == "$image"
    # the choices above the photo: a photo scaled up to Label Studio's default 750 px pushed them below the fold
    assert [child.tag for child in root] == ["Header", "Choices", "Image"]


def test_suspects_are_the_flagged_rows_in_rank_order():
    rows = [
        {"rank": "3", "issue": "True", "path": "c"},
        {"rank": "1", "issue": "False", "path": "a"},
        {"rank": "2", "issue": "True", "path": "b"},
        {"rank": "", "issue": "False", "path": "d"},
        {"rank": "10", "issue": "True", "path": "e"},
    ]
    assert [r["path"] for r in review_export.suspects(rows, None)] == ["b", "c", "e"]
    assert [r["path"] for r in review_export.suspects(rows, 2)] == ["b", "c"]


def test_landing_index_maps_report_paths_to_nfd_keys_and_skips_unsafe_ones():
    nfd = unicodedata.normalize("NFD", "곰팡이")
    objs = [
        ObjectInfo(f"{PREFIX}{nfd}/1.png", "e1", 1),
        ObjectInfo(f"{PREFIX}오염/../x.png", "e2", 1),
        ObjectInfo(f"{PREFIX}loose.png", "e3", 1),
    ]
    index = review_export.landing_index(objs, PREFIX)
    assert list(index) == ["곰팡이/1.png"] and index["곰팡이/1.png"].key == f"{PREFIX}{nfd}/1.png"


def test_a_task_carries_what_relabel_checks_and_the_suggestion_as_prediction():
    row = {
        "rank": "1",
        "path": "오염/1.png",
        "given_class": "오염",
        "suggested_class": "창틀,문틀수정",
        "label_quality": "0.01",
    }
    task = review_export.build_task(
        row, ObjectInfo(f"{PREFIX}오염/1.png", "abc", 9), "landing", PREFIX, "http://x/y", "sha", "m", "3"
    )
    parsed = relabel.parse_task({**task, "id": 7}, 1)
    assert (parsed.action, parsed.key, parsed.etag, parsed.given) == (
        "unreviewed",
        f"{PREFIX}오염/1.png",
        "abc",
        "오염",
    )
    # accepting the pre-annotation in Label Studio copies it into an annotation: then it is a move
    accepted = {**task, "id": 7, "annotations": [{"result": task["predictions"][0]["result"]}]}
    row = relabel.parse_task(json.loads(json.dumps(accepted)), 1)
    assert (row.action, row.chosen, row.prefix) == ("move", "창틀,문틀수정", PREFIX)


def _task(key=f"{PREFIX}오염/1.png", choices=(("창틀,문틀수정",),), cancelled=(), **data):
    anns = [
        {
            "id": i,
            "was_cancelled": i in cancelled,
            "result": [{"from_name": "label", "to_name": "image", "type": "choices", "value": {"choices": list(c)}}],
        }
        for i, c in enumerate(choices)
    ]
    base = {"landing_bucket": "landing", "landing_prefix": PREFIX, "landing_key": key, "etag": "abc"}
    return {"id": 1, "data": {**base, **data}, "annotations": anns}


@pytest.mark.parametrize(
    "task, reason",
    [
        ("not a dict", "not a Label Studio task"),
        ({"id": 1}, "task has no data"),
        (_task(etag=""), "data lacks etag"),
        ({"id": 1, "data": {"image": "x"}}, "data lacks landing_bucket, landing_prefix, landing_key, etag"),
        (_task(key="other/오염/1.png"), "not under the landing prefix"),
        (_task(key=f"{PREFIX}오염/deep/1.png"), "nested folder"),
        (_task(key=f"{PREFIX}1.png"), "no class folder"),
        (_task(landing_prefix="dacon"), "does not end with '/'"),
        (_task(choices=(("곰팡이",), ("오염",))), "annotations disagree: 곰팡이 vs 오염"),
    ],
)
def test_malformed_rows_are_refused_with_their_reason(task, reason):
    row = relabel.parse_task(task, 1)
    assert row.action == "refused" and reason in row.reason


def test_cancelled_annotations_do_not_count_and_choices_are_nfc():
    nfd = unicodedata.normalize("NFD", "곰팡이")
    row = relabel.parse_task(_task(choices=(("오염",), (nfd,)), cancelled=(0,)), 1)
    assert (row.action, row.chosen) == ("move", "곰팡이")
    assert relabel.parse_task(_task(choices=(("오염",),)), 1).action == "keep"
    assert relabel.parse_task(_task(choices=(("오염",),), cancelled=(0,)), 1).action == "unreviewed"


def test_rows_of_one_export_that_claim_the_same_key_are_refused_and_the_exit_code_says_so(tmp_path):
    export = tmp_path / "export.json"
    export.write_text(
        json.dumps(
            [
                _task(choices=(("오염",),)),
                _task(choices=(("오염",),)),
                _task(key=f"{PREFIX}오염/2.png", choices=(("오염",),), landing_bucket="other"),
            ]
        )
    )
    lines = []
    code, summary = relabel.run_relabel(export, apply=False, landing_uri=f"s3://landing/{PREFIX}", out=lines.append)
    assert code == 1 and summary["keep"] == 1 and summary["refused"] == 2, summary
    assert "holds this landing key twice" in lines[1] and "is not the landing URI's ('landing')" in lines[2]


def test_rows_are_pinned_to_the_landing_uri_not_to_the_export(tmp_path):
    """An edited export cannot point relabel at another bucket or prefix (issue 32, finding 5)."""
    export = tmp_path / "export.json"
    export.write_text(json.dumps([_task(choices=(("오염",),))]))
    lines = []
    code, _ = relabel.run_relabel(export, apply=False, landing_uri="s3://landing/other/", out=lines.append)
    assert code == 1 and "landing prefix" in lines[0] and "is not the landing URI's ('other/')" in lines[0]
    params = tmp_path / "params.yaml"
    params.write_text("data:\n  landing_uri: s3://landing/elpv/\n")
    assert relabel.landing_uri_of(params) == "s3://landing/elpv/"
    params.write_text("data: {}\n")
    with pytest.raises(PipelineError, match="--landing-uri"):
        relabel.landing_uri_of(params)


def test_an_export_that_is_not_a_task_list_is_an_error(tmp_path):
    fp = tmp_path / "x.json"
    fp.write_text('{"tasks": []}')
    with pytest.raises(PipelineError, match="a list of tasks"):
        relabel.load_export(fp)
    fp.write_text("[{")
    with pytest.raises(PipelineError, match="not a JSON file"):
        relabel.load_export(fp)


def test_a_copy_matches_by_single_part_etag_and_never_by_size_alone():
    single = ObjectInfo("a", "abc", 5)
    assert relabel._is_copy_of("b", ObjectInfo("b", "abc", 5), single)  # an MD5 ETag: no need to read
    assert not relabel._is_copy_of("b", ObjectInfo("b", "fff", 6), ObjectInfo("a", "abc-2", 5))  # sizes differ
    # same size, multipart or differing ETags: the bytes decide (tests/integration/test_relabel.py, rows 9 and 11)


def test_an_unsure_prediction_becomes_an_unlabelled_task_and_a_move_into_the_landing_prefix():
    record = {
        "id": "a/p1.png",
        "label": "오염",
        "confidence": 0.31,
        "error": "",
        "model_name": "m",
        "model_version": "2",
    }
    task = review_export.prediction_task(
        record, ObjectInfo("incoming/a/p1.png", "e9", 5), "landing", PREFIX, "http://x/y", "m", "3"
    )
    assert task["data"]["given_class"] == "" and task["predictions"][0]["score"] == 0.31
    annotated = {
        **task,
        "id": 4,
        "annotations": [{"result": [{"from_name": "label", "type": "choices", "value": {"choices": ["오염"]}}]}],
    }
    row = relabel.parse_task(annotated, 1)
    assert (row.action, row.source, row.given, row.chosen) == ("move", "prediction", "", "오염")
    inside = json.loads(json.dumps(annotated))
    inside["data"]["landing_key"] = f"{PREFIX}오염/p1.png"
    assert "already under the landing prefix" in relabel.parse_task(inside, 1).reason
    hidden = json.loads(json.dumps(annotated))
    hidden["data"]["landing_key"] = "incoming/.p1.png"
    assert "hidden file" in relabel.parse_task(hidden, 1).reason
