"""The evaluation saved beside a checkpoint (app/quality/saved.py): read back from what `python -m app evaluate`
writes, and refused with the file and the problem named when malformed."""

from __future__ import annotations

import copy
import json
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import torch

from app.quality.saved import EVALUATION_FILE, METRICS, NOISE_FLOOR, load_evaluation
from app.tools import evaluate
from tests.conftest import DEMO
from tests.tools import test_evaluate as evaluate_tests

# the random tiny model and judges of evaluate's own tests, a fixture of this module too
tiny_setup = evaluate_tests.tiny_setup

SPACES = ("demo_classifier", "mixer_classifier")
DATE = "2026-12-06T19:02:11Z"


def space(i: int, j: int) -> dict[str, Any]:
    """A feature space's figures as evaluate writes them, distinct for record i and space j."""
    accuracy, fid, kid = 0.9 + i / 100 + j / 1000, 17.0 + i + j / 10, 0.6 + i / 100 + j / 1000
    return {
        "class_accuracy": accuracy,
        "fid": fid,
        "kid": kid,
        "kid_se": 0.007,
        "precision": 0.85,
        "recall": 0.33,
        "class_accuracy_ci": [accuracy - 0.01, accuracy + 0.01],
        "fid_ci": [fid - 1, fid + 1],
    }


def record(i: int, variant: str, seed_set: str = "main", images: int = 2000) -> dict[str, Any]:
    """A record in the shape `python -m app evaluate` writes (test_records_here_have_evaluates_shape checks it):
    verdicts on main-seed records only."""
    main = seed_set == "main"
    spaces = {name: space(i, j) | ({"verdict": "ok", "worse_in": {}} if main else {}) for j, name in enumerate(SPACES)}
    first = spaces[SPACES[0]]
    out = {"model": "demo", "variant": variant, "seed_set": seed_set, "images": images}
    out |= {k: first[k] for k in ("class_accuracy", "fid", "precision", "recall")}
    out |= {"spaces": spaces, "seconds": 100.0, "images_per_second": 20.0, "date": DATE}
    return out | ({"verdict": "ok"} if main else {})


def evaluation_records(variants: tuple[str, ...] = ("baseline", "litevar", "bf16", "fastest")) -> list[dict[str, Any]]:
    """The records of an evaluation of `variants`, the noise floor last, as evaluate orders them."""
    return [record(i, v) for i, v in enumerate(variants)] + [record(len(variants), "baseline", NOISE_FLOOR)]


def write(folder: Path, content: Any) -> Path:
    path = folder / EVALUATION_FILE
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


def expected_figures(records: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    """What the loader must return, read off the records directly: per record, space and metric."""
    return {
        (NOISE_FLOOR if r["seed_set"] == NOISE_FLOOR else r["variant"]): {
            name: {m: s[m] for m in METRICS if s[m] is not None} for name, s in r["spaces"].items()
        }
        for r in records
    }


@pytest.fixture(scope="module")
def evaluated(tiny_setup: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, datetime, datetime]:
    """`python -m app evaluate` on the tiny model in three feature spaces, the third an exported network without
    classes (no class accuracy); the JSON it wrote and the times just before and after the run."""
    out = tmp_path_factory.mktemp("saved")
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(32 * 32, 8))
    batch = torch.export.Dim("batch", min=2)
    program = torch.export.export(net, (torch.zeros(4, 1, 32, 32),), dynamic_shapes=({0: batch},))
    torch.export.save(program, out / "plain.pt2")
    features = f"{tiny_setup['cnn']},{tiny_setup['mixer']},{out / 'plain.pt2'}"
    argv = ["--model", str(tiny_setup["model"]), "--features", features, "--variants", "baseline,cfg-share"]
    argv += ["--reference", str(tiny_setup["root"] / "ref.safetensors"), "--images-per-class", "1"]
    argv += ["--greedy-per-class", "0", "--bootstrap", "0", "--kid-subsets", "2", "--kid-subset-size", "10"]
    argv += ["--json", str(out / EVALUATION_FILE), "--out-dir", str(out)]
    before = datetime.now(UTC).replace(microsecond=0)
    assert evaluate.main(argv) == 0
    return out / EVALUATION_FILE, before, datetime.now(UTC)


def test_the_loader_reads_what_evaluate_writes(evaluated: tuple[Path, datetime, datetime]) -> None:
    path = evaluated[0]
    records = json.loads(path.read_text())
    saved = load_evaluation(path)
    assert list(saved.figures) == ["baseline", "cfg-share", NOISE_FLOOR]
    assert saved.figures == expected_figures(records)
    assert list(saved.figures["baseline"]) == ["cnn", "mixer", "plain"]
    assert list(saved.figures["baseline"]["plain"]) == ["fid", "kid"]  # no classes there: no class accuracy
    assert saved.images == {"baseline": 10, "cfg-share": 10, NOISE_FLOOR: 10}
    assert all(r["date"] == saved.date for r in records)


def test_every_record_evaluate_writes_carries_the_runs_utc_start(evaluated: tuple[Path, datetime, datetime]) -> None:
    path, before, after = evaluated
    dates = {r["date"] for r in json.loads(path.read_text())}
    assert len(dates) == 1
    date = dates.pop()
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", date)
    assert before <= datetime.fromisoformat(date) <= after


def test_records_here_have_evaluates_shape(evaluated: tuple[Path, datetime, datetime]) -> None:
    """The records the other tests build by hand have the keys evaluate writes, record and space alike."""
    written = json.loads(evaluated[0].read_text())
    built = evaluation_records(("baseline", "cfg-share"))
    for real, made in zip(written, built, strict=True):
        assert made.keys() == real.keys()
        assert [s.keys() for s in made["spaces"].values()] == [real["spaces"]["cnn"].keys()] * len(SPACES)


def test_figures_of_every_record_and_space(tmp_path: Path) -> None:
    records = evaluation_records()
    saved = load_evaluation(write(tmp_path, records))
    assert saved.figures == expected_figures(records)
    assert saved.figures["litevar"]["mixer_classifier"] == {"class_accuracy": 0.911, "fid": 18.1, "kid": 0.611}
    assert saved.date == DATE and saved.images == dict.fromkeys(saved.figures, 2000)


def broken(change: str) -> list[dict[str, Any]]:
    """The records of an evaluation with one thing wrong."""
    records = copy.deepcopy(evaluation_records())
    if change == "no date":
        del records[1]["date"]
    elif change == "two dates":
        records[2]["date"] = "2026-12-07T08:00:00Z"
    elif change == "bad date":
        records[0]["date"] = "yesterday"
    elif change == "no kid":
        del records[1]["spaces"]["mixer_classifier"]["kid"]
    elif change == "no accuracy":
        del records[4]["spaces"]["demo_classifier"]["class_accuracy"]
    elif change == "fid text":
        records[0]["spaces"]["demo_classifier"]["fid"] = "17.2"
    elif change == "twice":
        records[1]["variant"] = "baseline"
    elif change == "seed set":
        records[0]["seed_set"] = "other"
    elif change == "images":
        records[0]["images"] = True
    elif change == "no spaces":
        records[0]["spaces"] = {}
    return records


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ("{not json", "Expecting property name"),
        ({"variant": "baseline"}, "expected a non-empty JSON list of evaluation records"),
        ([], "expected a non-empty JSON list"),
        (["baseline"], "record 0 is not a JSON object"),
        (broken("no date"), "record 1 (litevar): field 'date' is missing"),
        (broken("two dates"), "records from several runs"),
        (broken("bad date"), "record 0 (baseline): date 'yesterday' is not ISO-8601"),
        (broken("no kid"), "record 1 (litevar): spaces.mixer_classifier.kid is missing"),
        (broken("no accuracy"), "record 4 (noise-floor): spaces.demo_classifier.class_accuracy is missing"),
        (broken("fid text"), "spaces.demo_classifier.fid is '17.2', expected a number"),
        (broken("twice"), "two records for 'baseline'"),
        (broken("seed set"), "record 0: seed_set 'other', expected 'main' or 'noise-floor'"),
        (broken("images"), "field 'images' is True, expected an integer"),
        (broken("no spaces"), "`spaces` holds no feature space"),
    ],
)
def test_a_malformed_file_names_itself_and_the_problem(tmp_path: Path, content: Any, problem: str) -> None:
    path = write(tmp_path, content)
    with pytest.raises(ValueError) as raised:
        load_evaluation(path)
    message = str(raised.value)
    assert message.startswith(f"{path}: ") and problem in message


def test_a_file_that_is_not_text_is_malformed(tmp_path: Path) -> None:
    path = tmp_path / EVALUATION_FILE
    path.write_bytes(b"\xff\xfe\x00[")
    with pytest.raises(ValueError, match=re.escape(str(path))):
        load_evaluation(path)


def test_the_demo_models_saved_evaluation_loads() -> None:
    saved = load_evaluation(DEMO / EVALUATION_FILE)
    assert {"baseline", "litevar", NOISE_FLOOR} <= saved.figures.keys()
    assert set(saved.figures["baseline"]) == set(SPACES)
    assert set(saved.images.values()) == {2000}
