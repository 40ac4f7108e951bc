"""Speech and transcription: POST /v1/audio/speech (and the seed's /v1/audio/generations),
POST /v1/audio/transcriptions, POST /v1/audio/translations, GET /v1/voices.

Usage goes through a UsageTracker like a text generation's, so the platform ledger bills it:
a transcription counts one prompt token per started second of audio, speech one per
character of input (the catalog prices them so; see k2serve.serving.catalog).
"""

from __future__ import annotations

import asyncio
import base64

from fastapi import APIRouter, Request
from fastapi.responses import (
    JSONResponse,
    PlainTextResponse,
    Response,
    StreamingResponse,
)
from pydantic import ValidationError
from starlette.datastructures import UploadFile

from k2serve.api.errors import ERROR_RESPONSES, json_body
from k2serve.api.generation import SSE_DONE, sse
from k2serve.api.models_lookup import registry_of
from k2serve.api.request_scope import request_scope
from k2serve.api.schemas.audio import SpeechRequest
from k2serve.api.usage import UsageTracker
from k2serve.audio.errors import AudioRequestError
from k2serve.audio.serving import Busy
from k2serve.errors import APIError, bad_request, overloaded

router = APIRouter(responses=ERROR_RESPONSES)

ENGLISH = ("en", "english")


def _audio_error(exc: AudioRequestError) -> APIError:
    return APIError(exc.status, exc.message, param=exc.param, code=exc.code)


def _backend(request: Request, model, endpoint: str, needed: str, action: str):
    """The backend for `model` if it serves `endpoint` (a `needed` model); a missing model
    means the one such model served here, when there is exactly one."""
    registry = registry_of(request)
    candidates = [s.id for s, _ in registry.serving(endpoint)]
    served = ", ".join(f"{s.id} ({s.type})" for s in registry.specs()) or "none"
    if model is None or model == "":
        if len(candidates) != 1:
            raise bad_request("Missing required parameter: 'model'.", param="model")
        model = candidates[0]
        key = request_scope(request).caller  # the platform saw no model to check
        if key is not None and not key.allows_model(model):
            raise APIError(403, f"The API key '{key.name}' may not use the model '{model}'.",
                           param="model", code="model_not_allowed")
    if not isinstance(model, str):
        raise bad_request("'model' must be a string.", param="model")
    entry = registry.get(model)
    if entry is None:
        raise APIError(404, f"The model '{model}' does not exist or is not served here. "
                            f"Served models: {served}.", param="model",
                       code="model_not_found")
    spec, backend = entry
    if not entry.serves(endpoint):
        hint = (f"use {', '.join(candidates)}" if candidates else
                f"this server has no {needed} model configured (`k2serve serve --families "
                f"audio` serves them)")
        article = "an" if spec.type[0] in "aeiou" else "a"
        raise APIError(400, f"The model '{model}' is {article} {spec.type} model and cannot "
                            f"{action}; "
                            f"{hint}. Served models: {served}.", param="model",
                       code="model_not_supported")
    return model, backend


# -- speech ------------------------------------------------------------------------------

async def _speech(request: Request):
    from k2serve.audio.encoding import output_spec
    from k2serve.audio.speech import Busy as SpeechBusy
    from k2serve.audio.speech import SpeechJob, check_input, rate_for_speed
    from k2serve.audio.voices import find_voice, voice_list

    body = await json_body(request)
    model, backend = _backend(request, body.get("model"), "audio.speech", "audio",
                              "synthesize speech")
    try:
        req = SpeechRequest.model_validate(body)
    except ValidationError as exc:
        err = exc.errors()[0]
        param = ".".join(str(p) for p in err.get("loc", ())) or None
        if err.get("type") == "missing":
            raise bad_request(f"Missing required parameter: '{param}'.", param=param) from None
        raise bad_request(f"Invalid value for '{param}': {err.get('msg')}.", param=param) from None
    voice = find_voice(req.voice)
    if voice is None:
        names = ", ".join(f"{v['id']} ({v['name']})" for v in voice_list())
        raise bad_request(f"Unknown voice '{req.voice}' for {model}. Voices: {names} "
                          f"(GET /v1/voices).", param="voice", code="voice_not_found")
    if req.language and req.language.lower().split("-")[0] != voice.language:
        raise bad_request(f"The voice '{voice.id}' speaks '{voice.language}', not "
                          f"'{req.language}'; pick a voice for that language from "
                          f"GET /v1/voices.", param="language")
    sse_events = req.stream or req.stream_format == "sse"
    try:
        text = check_input(req.input)
        rate = rate_for_speed(req.speed)
        spec = output_spec(req.response_format, req.response_encoding, req.sample_rate,
                           req.bit_rate, sse_events)
    except AudioRequestError as exc:
        raise _audio_error(exc) from None
    engine = await backend.model.get()
    try:
        job = SpeechJob(engine, text, voice, rate, spec)
    except SpeechBusy as exc:
        raise overloaded(str(exc)) from None
    tracker = UsageTracker(request, model, "audio.speech", len(text), 1)
    headers = {"x-audio-sample-rate": str(spec.sample_rate), "x-audio-encoding": spec.encoding}
    chunks = job.chunks()

    if not sse_events:
        try:
            audio = b"".join([chunk async for chunk in chunks])
        except BaseException as exc:
            tracker.finish("client_closed" if isinstance(exc, asyncio.CancelledError)
                           else "error", str(exc) or type(exc).__name__)
            raise
        tracker.finish("ok")
        return Response(audio, media_type=spec.media_type, headers=headers)

    openai_style = req.stream_format == "sse"

    async def events():
        status, error = "client_closed", None
        try:
            async for chunk in chunks:
                data = base64.b64encode(chunk).decode()
                yield sse({"type": "speech.audio.delta", "audio": data} if openai_style else
                          {"object": "audio.tts.chunk", "model": model, "b64": data})
            status = "ok"
            if openai_style:
                yield sse({"type": "speech.audio.done", "usage": {
                    "input_tokens": len(text), "output_tokens": 0,
                    "total_tokens": len(text)}})
            yield SSE_DONE
        except Exception as exc:  # in-band, as Stainless SDKs read it
            status, error = "error", str(exc)
            yield sse({"error": {"message": f"Speech synthesis failed: {exc}",
                                 "type": "server_error", "param": None, "code": None}})
        finally:
            tracker.finish(status, error)  # first: a cancelled stream may not get past an await
            await chunks.aclose()

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"cache-control": "no-cache", **headers})


# The route reads its body itself (the model is checked before the fields); the schema says
# what it takes and what it answers.
_SPEECH_OPENAPI = {"requestBody": {"required": True, "content": {"application/json": {
    "schema": SpeechRequest.model_json_schema()}}}}
_SPEECH_RESPONSES = {200: {"description": "The audio, or SSE events with base64 audio",
                           "content": {media: {} for media in (
                               "audio/wav", "audio/mpeg", "audio/flac", "audio/ogg",
                               "audio/aac", "audio/pcm", "text/event-stream")}}}
router.add_api_route("/v1/audio/speech", _speech, methods=["POST"],
                     summary="Synthesize speech (eSpeak NG)", openapi_extra=_SPEECH_OPENAPI,
                     responses=_SPEECH_RESPONSES)
router.add_api_route("/v1/audio/generations", _speech, methods=["POST"],
                     summary="Synthesize speech (the seed's path; same as /v1/audio/speech)",
                     openapi_extra=_SPEECH_OPENAPI, responses=_SPEECH_RESPONSES)


@router.get("/v1/voices")
async def voices(request: Request, model: str | None = None):
    """Together's shape: {data: [{model, voices: [{id, name}]}]} for each speech model."""
    from k2serve.audio.voices import voice_list

    registry = registry_of(request)
    data = [{"model": s.id, "voices": voice_list()} for s, _ in registry.serving("audio.speech")
            if model in (None, s.id)]
    return JSONResponse({"object": "list", "data": data})


# -- transcription -----------------------------------------------------------------------

def _form_value(form, name: str) -> str | None:
    value = form.get(name)
    if value is None or isinstance(value, UploadFile):
        return None
    return value


async def _upload_bytes(form, max_bytes: int) -> bytes:
    upload = form.get("file")
    if upload is None:
        raise bad_request("Missing required parameter: 'file' (send the audio as a "
                          "multipart/form-data file part).", param="file")
    if not isinstance(upload, UploadFile):
        if upload.strip().lower().startswith(("http://", "https://")):
            raise bad_request("This server does not fetch audio from URLs; upload the file "
                              "itself as the 'file' part.", param="file")
        raise bad_request("'file' must be an uploaded file (a multipart/form-data file "
                          "part).", param="file")
    data = await upload.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise APIError(413, f"The audio file is larger than this server's limit of "
                            f"{max_bytes} bytes.", param="file", code="file_too_large")
    return data


def _temperature(value: str | None) -> float:
    if value is None or value == "":
        return 0.0
    try:
        temperature = float(value)
    except ValueError:
        raise bad_request(f"temperature must be a number, not '{value}'.",
                          param="temperature") from None
    if not 0.0 <= temperature <= 1.0:
        raise bad_request("temperature must be between 0 and 1.", param="temperature")
    return temperature


def _check_language(language: str | None, task: str, model: str) -> None:
    lang = (language or "en").strip().lower()
    if task == "transcribe" and lang not in (*ENGLISH, "auto"):
        raise bad_request(f"{model} transcribes English speech only; language '{language}' is "
                          f"not supported (send 'en', 'auto' or no language).",
                          param="language", code="unsupported_language")
    if task == "translate" and lang not in ENGLISH:
        raise bad_request(f"{model} is English-only: translations produce English text from "
                          f"English speech, so the target language must be 'en', not "
                          f"'{language}'.", param="language", code="unsupported_language")


async def _transcribe(request: Request, task: str):
    from k2serve.audio.decoding import SAMPLE_RATE, decode_audio
    from k2serve.audio.formats import (
        billed_seconds,
        check_granularities,
        check_response_format,
        render,
    )

    try:
        form = await request.form()
    except Exception as exc:  # malformed multipart
        raise bad_request(f"Could not read the multipart/form-data body: {exc}") from None
    action = "transcribe audio" if task == "transcribe" else "translate audio"
    model, backend = _backend(request, _form_value(form, "model"), f"audio.{task}",
                              "transcribe", action)
    if (_form_value(form, "diarize") or "").lower() == "true":
        raise bad_request(f"{model} does not do speaker diarization.", param="diarize")
    if (_form_value(form, "stream") or "").lower() == "true":  # OpenAI's gpt-4o-transcribe field
        raise bad_request(f"stream=true is not supported: {model} answers with the whole "
                          f"transcript.", param="stream")
    _check_language(_form_value(form, "language"), task, model)
    try:
        fmt = check_response_format(_form_value(form, "response_format"))
        granularities = check_granularities(
            [v for key in ("timestamp_granularities", "timestamp_granularities[]")
             for v in form.getlist(key) if isinstance(v, str)])
    except AudioRequestError as exc:
        raise _audio_error(exc) from None
    temperature = _temperature(_form_value(form, "temperature"))
    prompt = _form_value(form, "prompt")
    data = await _upload_bytes(form, backend.max_bytes)
    whisper = await backend.model.get()
    try:
        async with backend.gate.slot():
            try:
                audio = await asyncio.to_thread(decode_audio, data, backend.max_seconds)
            except AudioRequestError as exc:
                raise _audio_error(exc) from None
            tracker = UsageTracker(request, model, f"audio.{task}",
                                   billed_seconds(len(audio) / SAMPLE_RATE), 1)
            try:
                transcript = await asyncio.to_thread(
                    whisper.transcribe, audio, prompt=prompt, temperature=temperature,
                    word_timestamps="word" in granularities and fmt == "verbose_json")
            except BaseException as exc:
                tracker.finish("client_closed" if isinstance(exc, asyncio.CancelledError)
                               else "error", str(exc) or type(exc).__name__)
                raise
            tracker.finish("ok")
    except Busy as exc:
        raise overloaded(str(exc)) from None
    body, media_type = render(transcript, fmt, granularities,
                              "transcribe" if task == "transcribe" else "translate")
    if isinstance(body, dict):
        return JSONResponse(body)
    return PlainTextResponse(body, media_type=media_type)


async def _transcribe_closing_files(request: Request, task: str):
    try:
        return await _transcribe(request, task)
    finally:
        await request.close()  # closes the parsed form's spooled upload


# The multipart form, as OpenAI's and Together's SDKs send it (read by _transcribe).
_TRANSCRIBE_OPENAPI = {"requestBody": {"required": True, "content": {"multipart/form-data": {
    "schema": {"type": "object", "required": ["file"], "properties": {
        "file": {"type": "string", "format": "binary"}, "model": {"type": "string"},
        "language": {"type": "string"}, "prompt": {"type": "string"},
        "response_format": {"type": "string"}, "temperature": {"type": "number"},
        "timestamp_granularities": {"type": "array", "items": {"type": "string"}}}}}}}}
_TRANSCRIBE_RESPONSES = {200: {"description": "The transcript", "content": {
    "application/json": {}, "text/plain": {}, "text/vtt": {}}}}


@router.post("/v1/audio/transcriptions", summary="Transcribe audio (Whisper tiny.en)",
             openapi_extra=_TRANSCRIBE_OPENAPI, responses=_TRANSCRIBE_RESPONSES)
async def transcriptions(request: Request):
    return await _transcribe_closing_files(request, "transcribe")


@router.post("/v1/audio/translations",
             summary="Translate audio into English (tiny.en: English speech only)",
             openapi_extra=_TRANSCRIBE_OPENAPI, responses=_TRANSCRIBE_RESPONSES)
async def translations(request: Request):
    return await _transcribe_closing_files(request, "translate")
