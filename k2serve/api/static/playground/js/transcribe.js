// Transcription: an uploaded file, a recording from the microphone (where the browser
// offers one), or the speech panel's last audio.

import { api } from "./api.js";
import { $, status } from "./dom.js";
import { lastSpeech } from "./speech.js";

const panel = $("#transcribe");
let recorder = null;

async function transcribe(blob, name) {
  const output = $(".output", panel);
  output.textContent = "";
  const form = new FormData();
  form.append("file", blob, name);
  form.append("model", $("[name=model]", panel).value);
  form.append("response_format", "json");
  try {
    status(panel, `transcribing ${name}…`);
    const body = await api("/v1/audio/transcriptions", { form });
    output.textContent = body.text;
    status(panel, body.usage ? `${body.usage.seconds} s of audio` : "done", "ok");
  } catch (err) {
    status(panel, err.message, "error");
  }
}

function fromFile() {
  const file = $("[name=file]", panel).files[0];
  if (file) transcribe(file, file.name);
  else status(panel, "Choose an audio file first.", "error");
}

function fromSpeech() {
  const audio = lastSpeech();
  if (audio) transcribe(audio.blob, audio.name);
  else status(panel, "Make some speech in the Speech tab first.", "error");
}

async function toggleRecording() {
  const button = $("[name=record]", panel);
  if (recorder) {
    recorder.stop();
    return;
  }
  try {
    const stream = await navigator.mediaDevices.getUserMedia({ audio: true });
    const chunks = [];
    recorder = new MediaRecorder(stream);
    recorder.addEventListener("dataavailable", (event) => chunks.push(event.data));
    recorder.addEventListener("stop", () => {
      stream.getTracks().forEach((track) => track.stop());
      recorder = null;
      button.textContent = "Record";
      transcribe(new Blob(chunks, { type: chunks[0]?.type || "audio/webm" }), "recording.webm");
    });
    recorder.start();
    button.textContent = "Stop recording";
    status(panel, "recording…");
  } catch (err) {
    status(panel, `Cannot record: ${err.message}`, "error");
  }
}

export function init() {
  $("[name=run]", panel).addEventListener("click", fromFile);
  $("[name=from_speech]", panel).addEventListener("click", fromSpeech);
  const record = $("[name=record]", panel);
  // getUserMedia exists only in secure contexts (https, localhost, 127.0.0.1)
  if (navigator.mediaDevices?.getUserMedia && window.MediaRecorder) {
    record.addEventListener("click", toggleRecording);
  } else {
    record.disabled = true;
    record.title = "This browser offers no microphone recording here (it needs https or localhost).";
  }
}
