"""What serves CLIP, as the API shows it: /health per tower, the stored vector of an image, the runtimes'
vectors standing in for each other, an impossible precision refused at startup, and the query cache."""

from __future__ import annotations

import uuid

import httpx
import numpy as np
import pytest

from backend.config import Settings
from backend.main import create_app
from ml.embedder import ClipEmbedder
from ml.inference import InferenceConfigError
from tests.conftest import AppRunner, app_context
from tests.helpers import upload_many


async def test_health_names_the_runtime_and_precision_of_each_tower(client: httpx.AsyncClient) -> None:
    await app_context(client).clip.get()  # loaded in the background at startup
    model = (await client.get("/health")).json()["model"]
    assert model["state"] == "loaded"
    assert model["towers"] == {
        "image": {"runtime": "onnx", "precision": "fp32"},
        "text": {"runtime": "onnx", "precision": "fp32"},
    }
    assert model["graphs"] in {"exported", "cache"}
    assert model["fallback"] is None


async def test_the_stored_vector_of_an_image(client: httpx.AsyncClient, settings: Settings) -> None:
    [image] = await upload_many(client, 1)
    response = await client.get(f"/images/{image['id']}/embedding")
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["model"], body["current"], body["precision"], body["runtime"]) == (
        settings.embedding_model,
        True,
        "fp32",
        "onnx",
    )
    vector = np.asarray(body["vector"], dtype=np.float32)
    assert body["dim"] == len(vector) == 16
    assert abs(float(np.linalg.norm(vector)) - 1.0) < 1e-5
    # It is the vector search uses: the image's text-search score is its dot product with the query's vector.
    query = await app_context(client).clip.get()
    hit = (await client.get("/search", params={"q": "a red square"})).json()["results"][0]
    assert abs(hit["score"] - float(vector @ query.embed_texts(["a red square"])[0])) < 1e-4
    missing = await client.get("/images/999/embedding")
    assert missing.status_code == 404


async def test_pytorch_and_onnx_runtime_vectors_are_one_model(run_app: AppRunner) -> None:
    """fp32 on either runtime is one model to the catalog: switching runtime re-embeds nothing and search
    still finds what the other runtime stored."""
    async with run_app(inference_runtime="onnx") as client:
        images = await upload_many(client, 3)
        stored = [(await client.get(f"/images/{i['id']}/embedding")).json()["vector"] for i in images]
    async with run_app(inference_runtime="torch") as client:
        await app_context(client).clip.get()  # loaded (it loads in the background from startup)
        health = (await client.get("/health")).json()
        assert health["model"]["towers"]["image"]["runtime"] == "torch"
        assert health["stale_embeddings"] == 0
        results = (await client.get("/search", params={"q": "a photo", "top_k": 10})).json()
        assert results["count"] == 3
        embedder = await app_context(client).clip.get()
        for image, vector in zip(images, stored, strict=True):
            similar = (await client.get(f"/images/{image['id']}/similar", params={"top_k": 2})).json()
            assert similar["count"] == 2
            assert np.asarray(vector).shape == (embedder.dim,)


async def test_an_impossible_precision_stops_the_start_with_the_reason(settings: Settings) -> None:
    app = create_app(settings.model_copy(update={"inference_precision": "int8"}))
    with pytest.raises(InferenceConfigError, match="fidelity bound"):
        async with app.router.lifespan_context(app):
            pass


async def test_a_repeated_query_skips_the_text_tower(
    client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    await upload_many(client, 2)
    calls: list[list[str]] = []
    original = ClipEmbedder.embed_texts

    def counting(self: ClipEmbedder, texts: list[str]) -> np.ndarray:
        calls.append(list(texts))
        return original(self, texts)

    monkeypatch.setattr(ClipEmbedder, "embed_texts", counting)
    # Sentences no other test asked for: the cache of query vectors outlives one app (it is the model's).
    lake, street = f"a quiet lake at dawn {uuid.uuid4().hex}", f"a busy street {uuid.uuid4().hex}"
    first = (await client.get("/search", params={"q": lake})).json()
    second = (await client.get("/search", params={"q": lake})).json()
    other = (await client.get("/search", params={"q": street})).json()
    assert calls == [[lake], [street]]
    assert first == second
    assert other["count"] == first["count"] == 2
