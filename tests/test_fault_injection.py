"""Fault injection: SIGKILL the training process at random points, also during a checkpoint write, resume, and get
the uninterrupted run's weights bit for bit (`studies/crash_resume.py --quick`; the campaign's figure is in
`studies/results/crash_resume.md`)."""

from __future__ import annotations

import crash_resume
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def test_sigkill_then_resume_is_bit_exact(tmp_path):
    result = crash_resume.campaign(str(tmp_path), quick=True, seed=0)
    summary = result["summary"]
    assert summary["chains"] == 2
    assert summary["kills"] >= 2 and summary["kills_mid_write"] >= 1, result["chains"]
    # the kill during a write left an incomplete newest checkpoint, and the resume refused it and went one back
    assert summary["incomplete_checkpoints_refused"] >= 1
    assert summary["resumes_from_checkpoint"] >= 1
    assert summary["bit_exact_chains"] == 2, result["chains"]
