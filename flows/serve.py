"""Every flow as two deployments, `<flow>/local` and `<flow>/modal`, served from one process (no work pool); a flow
without a backend (publish reads a local data dir) as `<flow>/local` only."""

from __future__ import annotations

from prefect import serve

from flows.chunk import chunk
from flows.download import download
from flows.embed import embed
from flows.fetch import fetch
from flows.pipeline import pipeline
from flows.plan import plan
from flows.publish import publish
from flows.summarize import summarize
from flows.verify import verify

FLOWS = (pipeline, download, chunk, embed, summarize, verify, plan, publish, fetch)
BACKENDS = ("local", "modal")


def build_deployments() -> list:
    """One deployment per flow and backend; the backend is a default parameter the run form can still change."""
    return [
        flow.to_deployment(
            name=backend,
            parameters={"backend": backend} if "backend" in flow.parameters.properties else {},
            tags=["fineweb-modal", backend],
            description=flow.description,
        )
        for flow in FLOWS
        for backend in (BACKENDS if "backend" in flow.parameters.properties else ("local",))
    ]


def serve_all() -> None:
    """Serve every deployment from this process until interrupted."""
    serve(*build_deployments())
