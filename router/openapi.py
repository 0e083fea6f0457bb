"""The OpenAPI document's additions: the JobRequest schema, which no route declares as a model."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from edgefleet.schemas import JobRequest

REF_TEMPLATE = "#/components/schemas/{model}"


def install_openapi(app: FastAPI) -> None:
    """POST /v1/jobs reads its body itself (size cap, strict JSON), so FastAPI never sees its model:
    JobRequest and the models it refers to are added to the schema's components, where the
    operation's `$ref` points, so that schema-driven clients and fuzzers can resolve them."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        # FastAPI's generator caches its result in app.openapi_schema: the components added here stay.
        schema = generate()
        job_request = JobRequest.model_json_schema(ref_template=REF_TEMPLATE)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for name, definition in {**job_request.pop("$defs", {}), "JobRequest": job_request}.items():
            components.setdefault(name, definition)
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
