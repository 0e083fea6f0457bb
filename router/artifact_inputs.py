"""At submit: every `{"$artifact": id}` in a plan's args must name an artifact the tenant may use."""

from __future__ import annotations

import re

from edgefleet.refs import RefError, find_artifacts
from edgefleet.schemas import ARTIFACT_ID_PATTERN, Plan
from edgefleet.store.artifacts import ArtifactStore

Problem = tuple[str, str]
ARTIFACT_ID = re.compile(ARTIFACT_ID_PATTERN)


def artifact_problems(artifacts: ArtifactStore, plan: Plan, tenant: str) -> list[Problem]:
    """(field, reason) of each `$artifact` that is malformed, unknown, or another tenant's (the
    same answer as unknown: ids are not an oracle)."""
    problems: list[Problem] = []
    found: list[tuple[str, str]] = []
    for i, subtask in enumerate(plan.subtasks):
        try:
            found += find_artifacts(subtask.args, f"steps.{i}.args")
        except RefError as exc:
            problems.append((exc.field, exc.reason))
    wanted = [artifact_id for _, artifact_id in found if ARTIFACT_ID.fullmatch(artifact_id)]
    usable = artifacts.visible(tenant, wanted)
    for field, artifact_id in found:
        if not ARTIFACT_ID.fullmatch(artifact_id):
            problems.append((field, "$artifact must be an artifact id: the sha256 (hex) POST /v1/artifacts answered"))
        elif artifact_id not in usable:
            problems.append((field, f"no artifact {artifact_id!r}; upload it with POST /v1/artifacts"))
    return problems
