"""`make run`'s profile is recorded under the root and named in the report's header."""

from __future__ import annotations

import json

import pytest

from dala_model.report.document import document
from dala_model.report.render import to_html, to_markdown
from flows.main import PROFILES, _record_profile


def _header(root: str) -> tuple[str, str]:
    blocks = document(root, [], [], [], [])  # the header does not depend on the runs
    return to_markdown(blocks), to_html(blocks)


def test_the_report_header_names_the_profile(tmp_path):
    root = str(tmp_path / "root")
    quick = PROFILES["quick"]
    _record_profile(root, "quick", quick, synthetic=True, source="unused")
    record = json.loads((tmp_path / "root" / "profile.json").read_text())
    assert record["profile"] == "quick" and record["epochs"] == quick.epochs
    markdown, html = _header(root)
    assert (
        "Profile `quick`: a demonstration of the pipeline, not a measure of the model" in markdown
    )
    assert f"{quick.image_size} px, {quick.epochs} epochs, batch {quick.batch_size}" in markdown
    assert (
        f"synthetic BreakHis ({quick.synthetic_patients} slide folders x "
        f"{quick.synthetic_images_per_patient} images" in markdown
    )
    assert "Profile <code>quick</code>" in html


def test_a_root_made_by_another_profile_version_is_refused(tmp_path):
    root = str(tmp_path / "root")
    _record_profile(root, "quick", PROFILES["quick"], synthetic=True, source="unused")
    older = PROFILES["quick"].model_copy(update={"epochs": 2})
    with pytest.raises(SystemExit, match="different epochs.*--root"):
        _record_profile(root, "quick", older, synthetic=True, source="unused")
    # the same profile again is fine, and a root without a profile has no header line
    _record_profile(root, "quick", PROFILES["quick"], synthetic=True, source="unused")
    assert "Profile `" not in _header(str(tmp_path / "bare"))[0]
